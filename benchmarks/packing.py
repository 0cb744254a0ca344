"""Forward+backward time and padding of right-padded vs packed batches (mmhub.packing); prints JSON.

    .venv/bin/python -m benchmarks.packing [--runs 7] [--images] [--threads N]

Samples have text lengths drawn uniformly from [--min-len, --max-len] tokens (random ids; the first
quarter of each sample is prompt with label -100), batches of --batch-size samples. For each batch the
model (a tiny-ish Llama: hidden 256, 4 layers, 4 heads, random weights, every weight trained) runs
forward+backward on (a) the batch right-padded to its longest sample (`MMProcessor.collate`) and (b)
the same samples packed with `pack` into rows of at most --pack-len tokens (`collate_packed`). Timings
are medians over --runs repetitions of every batch, the conditions interleaved. Also reports the
padding fraction of random vs length-grouped batches (`length_grouped_order`) without packing.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Any

import numpy as np
import torch

from mmhub import build
from mmhub.packing import collate_packed, length_grouped_order, pack, spliced_length
from mmhub.processor import Encoded
from mmhub.splice import IGNORE

BACKBONE = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 300, "max_position_embeddings": 4096}
IMAGE = {"encoders": {"image": {"type": "open_clip", "arch": None, "embed_dim": 64,
                                "vision_cfg": {"image_size": 32, "patch_size": 8, "layers": 2, "width": 64,
                                               "head_width": 16}}},
         "projectors": {"image": {"type": "mlp", "depth": 2}}}


def model_for(images: bool) -> Any:
    spec = {"name": "bench-packing", "backbone": {"type": "hf_causal_lm", "config": BACKBONE, "tokenizer": "byte"},
            "template": "chatml", **(IMAGE if images else {})}
    model = build(spec)
    model.requires_grad_(True)
    return model.train()


def samples(model: Any, n: int, lo: int, hi: int, images: bool, rng: np.random.Generator) -> list[Encoded]:
    out = []
    for _ in range(n):
        length = int(rng.integers(lo, hi + 1))
        ids = rng.integers(0, 256, length).tolist()
        labels = [IGNORE] * (length // 4) + ids[length // 4:]
        media = {}
        if images:  # one image right after the first token
            ids[1], labels[1] = model.processor.placeholder_ids["image"], IGNORE
            pixels = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
            media = {"image": [model.processor.preprocess["image"](pixels)]}
        out.append(Encoded(ids, labels, media))
    return out


def padding(lengths: list[int], rows: list[list[int]]) -> tuple[int, int]:
    """(real tokens, tokens processed) of right-padded rows."""
    return sum(lengths), len(rows) * max(sum(lengths[i] for i in r) for r in rows)


def step(model: Any, batch: dict[str, Any]) -> float:
    model.zero_grad(set_to_none=True)
    t = time.perf_counter()
    model(**batch, return_logits=False).loss.backward()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--batches", type=int, default=4, help="distinct batches timed")
    ap.add_argument("--runs", type=int, default=7, help="repetitions of each batch per condition")
    ap.add_argument("--min-len", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--pack-len", type=int, nargs="+", default=[256, 512], help="row budgets for packing")
    ap.add_argument("--images", action="store_true", help="one 32x32 image per sample (tiny open_clip + MLP)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = model_for(args.images)
    tokens_of = spliced_length(model)

    batches = [samples(model, args.batch_size, args.min_len, args.max_len, args.images, rng)
               for _ in range(args.batches)]
    conditions: dict[str, list[dict[str, Any]]] = {"padded": [model.processor.collate(b) for b in batches]}
    stats: dict[str, dict[str, Any]] = {"padded": {"rows": [], "real": 0, "processed": 0}}
    for b in batches:
        lengths = [tokens_of(s) for s in b]
        real, processed = padding(lengths, [[i] for i in range(len(b))])
        stats["padded"]["rows"].append(len(b))
        stats["padded"]["real"] += real
        stats["padded"]["processed"] += processed
    for budget in args.pack_len:
        name = f"packed_{budget}"
        conditions[name], stats[name] = [], {"rows": [], "real": 0, "processed": 0}
        for b in batches:
            lengths = [tokens_of(s) for s in b]
            rows = pack(b, budget, tokens_of)
            conditions[name].append(collate_packed(model.processor, b, rows))
            real, processed = padding(lengths, rows)
            stats[name]["rows"].append(len(rows))
            stats[name]["real"] += real
            stats[name]["processed"] += processed

    # check once that packing changes nothing (same loss), then time
    with torch.no_grad():
        model.eval()
        losses = {k: [float(model(**c, return_logits=False).loss) for c in v] for k, v in conditions.items()}
        model.train()
    times: dict[str, list[float]] = {k: [] for k in conditions}
    for k in conditions:  # warm-up
        step(model, conditions[k][0])
    for _ in range(args.runs):
        for i in range(len(batches)):
            for k in conditions:
                times[k].append(step(model, conditions[k][i]))

    base = statistics.median(times["padded"])
    report: dict[str, Any] = {
        "setup": {"backbone": {k: BACKBONE[k] for k in ("model_type", "hidden_size", "num_hidden_layers",
                                                        "num_attention_heads")},
                  "params": sum(p.numel() for p in model.parameters()), "images": args.images,
                  "batch_size": args.batch_size, "batches": args.batches, "runs": args.runs,
                  "text_len": [args.min_len, args.max_len],
                  "attention": model.backbone.model.config._attn_implementation,
                  "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
                  "torch": torch.__version__},
        "conditions": {},
    }
    for k in conditions:
        med = statistics.median(times[k])
        report["conditions"][k] = {
            "median_fwd_bwd_s": round(med, 4),
            "min_fwd_bwd_s": round(min(times[k]), 4),
            "speedup_vs_padded": round(base / med, 3),
            "rows_per_batch": stats[k]["rows"],
            "padding_fraction": round(1 - stats[k]["real"] / stats[k]["processed"], 4),
            "max_abs_loss_diff_vs_padded": max(abs(a - b) for a, b in zip(losses[k], losses["padded"], strict=True)),
        }
    # length-grouped batching (no packing): padding of random vs grouped batches over a larger pool
    pool = rng.integers(args.min_len, args.max_len + 1, 50 * args.batch_size * 4).tolist()
    bs = args.batch_size

    def pad_frac(order: list[int]) -> float:
        batches_ = [order[i:i + bs] for i in range(0, len(order), bs)]
        real = sum(pool)
        return 1 - real / sum(len(b) * max(pool[i] for i in b) for b in batches_)

    random_order = rng.permutation(len(pool)).tolist()
    grouped_order = length_grouped_order(pool, bs, args.seed)
    report["length_grouped"] = {"pool": len(pool), "padding_fraction_random": round(pad_frac(random_order), 4),
                                "padding_fraction_grouped": round(pad_frac(grouped_order), 4)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
