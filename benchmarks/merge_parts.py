"""Which part of a specialist's update costs the other skill: task arithmetic with one specialist's update kept only
on some of the backbone's tensors.

    python -m benchmarks.merge_parts --base runs/skills-base/align/model \
        --keep runs/skills-shape-color/skill/model --part runs/skills-yes-no-lora-looks-replay/keep/model \
        --keep-weight 1.5 --part-weights 1 --parts all,none,self_attn,mlp,layers:0-14,layers:15-29 \
        --split train --limit 200 --out runs/merge-parts.json

Both specialists' LoRA adapters are folded into their weights (as `mmhub merge` does), their updates over the base's
backbone taken, and for every part the backbone set to ``base + keep_weight * d_keep + part_weight * d_part * [tensor
in part]``; each model is scored with ``easy_vqa_balanced`` (strict, per question type) on the split given (the train
split by default: the part is a choice, and the test split must not make it). A part is ``all``, ``none``, a substring
of the tensor names (``self_attn``, ``mlp``), or ``layers:A-B`` (decoder layers A to B, inclusive). Writes one JSON row
per (part, weight) to ``--out`` and prints them.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mmhub.atomic import write_text_atomic


def part_filter(part: str) -> Callable[[str], bool]:
    """The tensors a part keeps, by name."""
    if part == "all":
        return lambda name: True
    if part == "none":
        return lambda name: False
    if part.startswith("layers:"):
        lo, _, hi = part[len("layers:"):].partition("-")
        if not (lo.isdigit() and hi.isdigit()):
            raise SystemExit(f"--parts: {part!r} is not layers:A-B (e.g. layers:0-14)")

        def in_layers(name: str) -> bool:
            m = re.search(r"\blayers\.(\d+)\.", name)
            return m is not None and int(lo) <= int(m.group(1)) <= int(hi)
        return in_layers
    return lambda name: part in name


def backbone_updates(base: Any, model: Any) -> dict[str, torch.Tensor]:
    """``model``'s backbone minus ``base``'s, per floating-point tensor (adapters folded first)."""
    from mmhub.merge.run import fold_adapters

    fold_adapters({"model": model})
    theirs = model.backbone.state_dict()
    return {k: theirs[k] - v for k, v in base.backbone.state_dict().items() if v.is_floating_point()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--keep", required=True, help="the specialist whose whole update is added")
    ap.add_argument("--part", required=True, help="the specialist whose update is added only on each part")
    ap.add_argument("--keep-weight", type=float, default=1.0)
    ap.add_argument("--part-weights", default="1", help="comma-separated weights of the part's update")
    ap.add_argument("--parts", default="all,none,self_attn,mlp")
    ap.add_argument("--split", default="train")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.split == "test":
        raise SystemExit("--split test: the parts are a choice; score them on another split (train)")

    from mmhub.evaluation import evaluate
    from mmhub.loading import load

    base = load(args.base)
    d_keep = backbone_updates(base, load(args.keep))
    d_part = backbone_updates(base, load(args.part))
    start = {k: v.clone() for k, v in base.backbone.state_dict().items() if k in d_keep}
    rows: list[dict[str, Any]] = []
    for part in args.parts.split(","):
        keep = part_filter(part)
        for w in (float(x) for x in args.part_weights.split(",")):
            with torch.no_grad():
                live = base.backbone.state_dict()
                for k, t in start.items():
                    live[k].copy_(t + args.keep_weight * d_keep[k] + (w * d_part[k] if keep(k) else 0))
            base.eval()
            r = evaluate(base, "easy_vqa_balanced", split=args.split, limit=args.limit, batch_size=args.batch_size)
            per_type = {t: round(float(v["accuracy"] if isinstance(v, dict) else v), 4)
                        for t, v in (r.get("per_type") or {}).items()}
            rows.append({"part": part, "keep_weight": args.keep_weight, "part_weight": w,
                         "tensors": sum(map(keep, start)), "per_type": per_type, "n": args.limit,
                         "split": args.split})
            print(json.dumps(rows[-1]), flush=True)
    write_text_atomic(args.out, json.dumps({"base": args.base, "keep": args.keep, "part": args.part, "rows": rows},
                                           indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
