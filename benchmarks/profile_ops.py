"""Where a training step or a generation spends its time, by operator category, for both sides of a scaling point.

    python -m benchmarks.profile_ops [--points text-1024,text-8192,images-8,gen_batch-8,prompt-4096] [--size small]
                                     [--out benchmarks/results/scaling_profile.json]

Each point is built as `benchmarks.scaling` builds it (same model, same inputs) and each side runs alone in a child
process: a warm-up repetition, then one repetition under ``torch.profiler`` (CPU activities). Operators are summed
by their self time into categories (`CATEGORIES`: matrix products, attention, the softmax and cross-entropy, the
optimizer, the rest), and the JSON holds per side the total, each category and the top operators. ``bound``: the
largest throughput ratio mmhub could reach over the peer if everything but its matrix products and attention took no
time at all (peer total / mmhub's matmul + attention): where it is below a target, no amount of overhead removed
reaches the target at the same arithmetic.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

# operator name fragments -> category (first match wins; names as torch's profiler reports them)
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("attention", ("scaled_dot_product", "flash_attention", "_efficient_attention", "attention")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul")),
    ("softmax_loss", ("softmax", "nll_loss", "cross_entropy", "log_softmax")),
    ("optimizer", ("_foreach", "adam", "lerp", "addcdiv", "addcmul")),
]


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def profile_call(fn: Callable[[], Any], top: int = 12) -> dict[str, Any]:
    """Run `fn` once under the profiler: wall seconds, self CPU seconds per category and the top operators."""
    from torch.profiler import ProfilerActivity, profile

    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    wall = time.perf_counter() - t0
    cats: dict[str, float] = defaultdict(float)
    ops = []
    for ev in prof.key_averages():
        secs = ev.self_cpu_time_total / 1e6
        cats[category(ev.key)] += secs
        ops.append((secs, ev.key, ev.count))
    ops.sort(reverse=True)
    total = sum(cats.values())
    return {"wall_s": round(wall, 4), "self_cpu_s": round(total, 4),
            "categories_s": {k: round(v, 4) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
            "top_ops": [{"op": k, "s": round(s, 4), "calls": c} for s, k, c in ops[:top]]}


def run(points: list[str], size: str, threads: int) -> dict[str, Any]:
    import torch

    from benchmarks.common import environment
    from benchmarks.scaling import build_models, point_inputs

    workdir = Path(tempfile.mkdtemp(prefix="mmhub-profile-"))
    built = build_models(size, workdir)
    out: dict[str, Any] = {"environment": environment(torch.float32), "size": size, "points": {}}
    for name in points:
        axis, value = name.rsplit("-", 1)
        inputs = point_inputs(built, axis, int(value), seed=int(value))
        inputs["image_tokens"] = built["image_tokens"]
        torch.save(inputs, workdir / f"{name}.pt")
        row: dict[str, Any] = {}
        for side in ("mmhub", "transformers"):
            cmd = [sys.executable, "-m", "benchmarks.scaling", "--child", side, "--workdir", str(workdir),
                   "--point", name, "--rounds", "1", "--threads", str(threads), "--profile"]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
            if proc.returncode != 0:
                raise SystemExit(f"{name} {side} failed:\n{proc.stderr[-3000:]}")
            row[side] = json.loads(proc.stdout.strip().splitlines()[-1])
        mine, peer = row["mmhub"], row["transformers"]
        arithmetic = mine["categories_s"].get("matmul", 0) + mine["categories_s"].get("attention", 0)
        row["ratio_now"] = round(peer["self_cpu_s"] / mine["self_cpu_s"], 3)
        row["bound"] = round(peer["self_cpu_s"] / arithmetic, 3) if arithmetic else None
        out["points"][name] = row
        print(name, json.dumps({"ratio_now": row["ratio_now"], "bound": row["bound"],
                                "mmhub": mine["categories_s"], "transformers": peer["categories_s"]}), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(prog="python -m benchmarks.profile_ops", description=__doc__.splitlines()[0])
    ap.add_argument("--points", default="text-1024,text-8192,images-8,gen_batch-8,prompt-4096")
    ap.add_argument("--size", default="small")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default="benchmarks/results/scaling_profile.json")
    a = ap.parse_args(argv)
    from mmhub.atomic import write_text_atomic

    result = run(a.points.split(","), a.size, a.threads)
    write_text_atomic(Path(a.out), json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
