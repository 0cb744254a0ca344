"""Shared benchmark helpers: environment facts, timing summaries, paired ratios, the matmul peak, peak RSS, JSON out."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch


def environment(dtype: torch.dtype) -> dict[str, Any]:
    """CPU model, core count, library versions, torch threads and the dtype measured."""
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads(), "dtype": str(dtype).replace("torch.", "")}


def timed(fn: Callable[[], Any]) -> float:
    """Wall seconds of one call."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def summary(values: list[float]) -> dict[str, float]:
    """median / min / max / n of a list of measurements."""
    if not values:
        raise ValueError("no measurements to summarise")
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def paired(ours: list[float], theirs: list[float], higher_is_better: bool) -> dict[str, Any]:
    """Per-round ratios ours/theirs, their median, and `best`: the ratio of the best value of each side."""
    if len(ours) != len(theirs) or not ours:
        raise ValueError(f"paired measurements need equal, non-empty lists, got {len(ours)} and {len(theirs)}")
    per_round = [a / b for a, b in zip(ours, theirs, strict=True)]
    best = (max(ours) / max(theirs)) if higher_is_better else (min(ours) / min(theirs))
    return {"median": statistics.median(per_round), "best": best, "per_round": per_round}


def matmul_peak_flops(n: int = 4096, repeats: int = 5, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """This machine's matmul throughput in `dtype`: best of `repeats` (n x n) @ (n x n)^T products through
    ``F.linear`` (the op every linear layer runs), in FLOP/s. Through ``F.linear`` because the kernels differ: on a
    CPU without bf16 matmul units a bf16 ``a @ b`` takes a slow generic path (~1 GFLOP/s here) while ``F.linear``
    reaches oneDNN (~13 GFLOP/s); in fp32 both are the same MKL GEMM."""
    import torch.nn.functional as F

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    F.linear(a, b)  # warm-up
    best = min(timed(lambda: F.linear(a, b)) for _ in range(repeats))
    return {"flops_per_s": 2 * n ** 3 / best, "matrix": n, "repeats": repeats, "threads": torch.get_num_threads(),
            "dtype": str(dtype).replace("torch.", ""), "op": "torch.nn.functional.linear"}


def rss_mib() -> float:
    """This process's resident set size now (VmRSS) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return peak_rss_mib()


def peak_rss_mib() -> float:
    """This process's peak resident set size (VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_json(report: dict[str, Any], path: str | Path) -> Path:
    """Write `report` as indented JSON, creating the folder."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return out
