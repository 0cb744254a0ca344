"""``python -m benchmarks.fuzz [--cases N] [--seed S]``: run every fuzz family and write the counts.

Writes benchmarks/results/fuzz.json (every case's ending) and the table in docs/reliability.md. `--cases` is the
number of mutated specs; folders get N/10, uploads N/5 and API bodies N/4 (at least one pass over every
corruption, file and body kind).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from benchmarks.fuzz.cases import run_family
from benchmarks.fuzz.outcome import FAILURES, OK, REFUSED

ROOT = Path(__file__).resolve().parents[2]
COLUMNS = (OK, REFUSED) + FAILURES


def table(results: dict[str, list]) -> str:
    lines = ["| family | cases | " + " | ".join(COLUMNS) + " |", "|---|---:|" + "---:|" * len(COLUMNS)]
    for family, outcomes in results.items():
        counts = Counter(o.result for o in outcomes)
        lines.append(f"| {family} | {len(outcomes)} | " + " | ".join(str(counts.get(c, 0)) for c in COLUMNS) + " |")
    return "\n".join(lines)


def failures(results: dict[str, list]) -> str:
    rows = [f"- {o.family} `{o.case}`: **{o.result}**: {o.detail}" for outs in results.values() for o in outs
            if o.failed]
    return "\n".join(rows[:60]) if rows else "None."


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.fuzz", description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=1000, help="mutated specs (folders get N/10, uploads N/5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--families", default="specs,hostile_specs,folders,uploads,api")
    ap.add_argument("--memory-gb", type=int, default=12, help="address-space limit of this process")
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite docs/reliability.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    # a case that allocates without bound gets a MemoryError (counted as a traceback) instead of the OOM killer
    resource.setrlimit(resource.RLIMIT_AS, (args.memory_gb << 30, resource.RLIM_INFINITY))
    sizes = {"specs": args.cases, "hostile_specs": 0, "folders": max(args.cases // 10, 40),
             "uploads": max(args.cases // 5, 30), "api": max(args.cases // 4, 40)}
    results, seconds = {}, {}
    for family in args.families.split(","):
        t0 = time.perf_counter()
        results[family] = run_family(family, sizes[family], seed=args.seed)
        seconds[family] = round(time.perf_counter() - t0, 1)
        print(f"{family}: {len(results[family])} cases in {seconds[family]} s", file=sys.stderr)
    out = ROOT / "benchmarks" / "results" / "fuzz.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"seed": args.seed, "cases": args.cases, "seconds": seconds,
                               "machine": platform.processor() or platform.machine(),
                               "outcomes": {f: [vars(o) for o in outs] for f, outs in results.items()}}, indent=1))
    body = (f"Command: `python -m benchmarks.fuzz --cases {args.cases} --seed {args.seed}`; "
            f"time per family (s): {seconds}.\n\n{table(results)}\n\n### Failures\n\n{failures(results)}\n")
    print(body)
    if not args.no_docs:
        doc = ROOT / "docs" / "reliability.md"
        head = doc.read_text().split("<!-- fuzz table -->")[0] if doc.is_file() else ""
        doc.write_text(head + "<!-- fuzz table -->\n" + body)
    return 1 if any(o.failed for outs in results.values() for o in outs) else 0


if __name__ == "__main__":
    raise SystemExit(main())
