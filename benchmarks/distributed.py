"""Training throughput on one process against two (DDP, FSDP2 with the language model sharded, DeepSpeed ZeRO-2).

    python -m benchmarks.distributed [--steps 12] [--warmup 3] [--global-batch 16] \
        [--out benchmarks/results/distributed.json]

Each mode runs in its own launch (`torchrun --nproc_per_node 2` for the two-process ones) of this file's worker,
which trains a small LLaVA-shaped model (a 4-layer ViT -> MLP -> a 4-layer, 256-wide Llama; projector and language
model trained in full) for ``warmup + steps`` steps on synthetic pictures with one-line answers, every process using
``cores / processes`` threads. Throughput is the median samples/s of the measured steps over all processes (the
trainer logs the main process's; every process takes the same share of each step). The JSON holds each mode's
samples/s and its ratio to one process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

# mode -> (processes, placement: shard the language model, DeepSpeed ZeRO stage or None); same global batch in each
MODES: dict[str, tuple[int, bool, int | None]] = {
    "1 process": (1, False, None), "2 processes, DDP": (2, False, None),
    "2 processes, FSDP2 (language model sharded)": (2, True, None),
    "2 processes, DeepSpeed ZeRO-2": (2, False, 2),
}


def spec(batch: int, steps: int, shard: bool) -> dict[str, Any]:
    llama = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
             "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 300, "max_position_embeddings": 512,
             "tie_word_embeddings": False}
    stage = {"name": "tune", "train": {"projectors": "full", "backbone": "full"}, "batch_size": batch,
             "max_steps": steps, "lr": 1e-4, "log_every": 1, "warmup_ratio": 0.0, "cache_features": False}
    if shard:
        stage["placement"] = {"backbone": "shard"}
    return {"name": "dist-bench", "seed": 0,
            "encoders": {"image": {"type": "open_clip", "arch": None, "embed_dim": 128,
                                   "vision_cfg": {"image_size": 64, "patch_size": 8, "layers": 4, "width": 128,
                                                  "head_width": 32}}},
            "projectors": {"image": {"type": "mlp", "depth": 2}},
            "backbone": {"type": "hf_causal_lm", "config": llama, "tokenizer": "byte"}, "template": "chatml",
            "stages": [stage]}


def dataset(n: int) -> list[Any]:
    from PIL import Image

    from mmhub.data import Sample

    colours = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 220, 40)]
    out = []
    for i in range(n):
        img = Image.new("RGB", (64, 64), colours[i % 4])
        img.putpixel((i % 64, (7 * i) % 64), (i * 13 % 255, 0, 0))
        out.append(Sample(str(i), [{"role": "user", "content": "<image>\nDescribe the picture in one sentence."},
                                   {"role": "assistant", "content": f"A plain square in colour number {i % 4}."}],
                          {"image": [img]}))
    return out


def worker(out: str, batch: int, steps: int, shard: bool) -> None:
    import torch

    from mmhub.train.run import train

    procs = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // procs))
    data = dataset(batch * procs * (steps + 1))
    train(spec(batch, steps, shard), out=out, datasets={"tune": data}, progress_bar=False)


def measure(mode: str, procs: int, shard: bool, zero: int | None, global_batch: int, steps: int,
            warmup: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        args = [__file__, "--worker", str(run), str(global_batch // procs), str(steps + warmup), str(int(shard))]
        cmd = [sys.executable, *args] if procs == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                          "--nproc_per_node", str(procs), *args]
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        if zero is not None:  # accelerate's DeepSpeed plugin, as `accelerate launch` with a DeepSpeed config sets it
            env |= {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(zero)}
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            raise SystemExit(f"{mode} failed:\n{r.stderr[-3000:]}")
        lines = [json.loads(x) for x in (run / "tune" / "metrics.jsonl").read_text().splitlines()]
        rates = [x["samples_per_s"] * procs for x in lines if "samples_per_s" in x and x["step"] > warmup]
    return {"processes": procs, "sharded": shard, "zero_stage": zero,
            "samples_per_s": round(statistics.median(rates), 2), "steps_measured": len(rates)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        worker(argv[1], int(argv[2]), int(argv[3]), bool(int(argv[4])))
        return 0
    ap = argparse.ArgumentParser(prog="python -m benchmarks.distributed", description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--out", default="benchmarks/results/distributed.json")
    a = ap.parse_args(argv)
    import torch

    from benchmarks.common import environment

    rows = {mode: measure(mode, procs, shard, zero, a.global_batch, a.steps, a.warmup)
            for mode, (procs, shard, zero) in MODES.items()}
    base = rows["1 process"]["samples_per_s"]
    for row in rows.values():
        row["ratio_to_1_process"] = round(row["samples_per_s"] / base, 3)
    result = {"environment": environment(torch.float32), "global_batch": a.global_batch, "steps": a.steps,
              "warmup": a.warmup, "rows": rows}
    from mmhub.atomic import write_text_atomic

    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(a.out), json.dumps(result, indent=1) + "\n")
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
