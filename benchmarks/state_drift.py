"""How far a fine-tune moved a model's hidden states from a reference's, per block, at media and at text positions.

    python -m benchmarks.state_drift runs/skills-base/align/model \\
        runs/skills-shape-color-longer/more/model runs/skills-yes-no-lora-looks-replay/keep/model \\
        runs/skills-yes-no-keep-states/states/model --questions color --limit 60 \\
        --out benchmarks/results/state_drift.json

For each model and each of the first ``--limit`` easy-VQA test questions of the chosen types (asked with their image,
no answer), the relative distance ``||h - h_ref|| / ||h_ref||`` of every block's output to the reference's (the first
model named), averaged over the image's token positions and, apart, over the text positions. A specialist whose update
rewrites the image tokens' states (a large media drift) changes what a model it is merged into reads off its images
(docs/merging.md, "Specialists that keep the base's hidden states").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from mmhub.atomic import write_text_atomic


@torch.no_grad()
def block_states(model: Any, samples: list[Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per sample: every block's output (blocks, L', H) and the media positions (L',)."""
    from mmhub import inputs
    from mmhub.train.keep_states import blocks_of

    blocks = blocks_of(model)
    seen: list[torch.Tensor] = []
    handles = [b.register_forward_hook(lambda _m, _a, o: seen.append(o[0] if isinstance(o, tuple) else o))
               for b in blocks]
    out = []
    try:
        for s in samples:
            batch = model.processor.collate([model.processor.encode(s.messages[:1], s.media)])
            sp = inputs.prepare(model, batch["input_ids"], batch["attention_mask"], None, batch["media"],
                                "right").spliced
            seen.clear()
            model.backbone(sp.inputs_embeds, sp.attention_mask, sp.position_ids)
            out.append((torch.stack([x[0] for x in seen]), sp.media_positions[0].clone()))
    finally:
        for h in handles:
            h.remove()
    return out


def drift(states: list[tuple[torch.Tensor, torch.Tensor]], ref: list[tuple[torch.Tensor, torch.Tensor]]
          ) -> dict[str, list[float]]:
    """{media, text}: per block, the mean relative distance to the reference over the samples."""
    rows: dict[str, list[torch.Tensor]] = {"media": [], "text": []}
    for (x, media), (r, _) in zip(states, ref, strict=True):
        for key, at in (("media", media), ("text", ~media)):
            rows[key].append(((x[:, at] - r[:, at]).norm(dim=-1) / r[:, at].norm(dim=-1)).mean(-1))
    return {k: [round(float(v), 4) for v in torch.stack(v).mean(0)] for k, v in rows.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reference", help="the model the others are compared to (a saved folder or preset)")
    ap.add_argument("models", nargs="+", help="saved folders or presets")
    ap.add_argument("--questions", default="color", help="easy-VQA question types, comma separated")
    ap.add_argument("--limit", type=int, default=60)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    from mmhub.data import load_dataset
    from mmhub.loading import load

    data = load_dataset({"type": "easy_vqa", "split": "test", "task": "qa",
                         "question_types": args.questions.split(",")})
    samples = [data[i] for i in range(min(args.limit, len(data)))]
    ref = block_states(load(args.reference).eval(), samples)
    result: dict[str, Any] = {"reference": args.reference, "questions": args.questions, "n": len(samples),
                              "models": {}}
    for name in args.models:
        d = drift(block_states(load(name).eval(), samples), ref)
        result["models"][name] = d
        inner = {k: sum(v[:-1]) / (len(v) - 1) for k, v in d.items()}  # the last block's output feeds logits only
        print(f"{name}: mean over blocks 0..L-2: media {inner['media']:.3f}, text {inner['text']:.3f}")
    if args.out:
        write_text_atomic(args.out, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
