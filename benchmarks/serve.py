"""`mmhub serve` vs `transformers serve` on the same LLaVA-shaped model and request mix; JSON + chart.

    .venv/bin/python -m benchmarks.serve [--size tiny|default] [--levels 1,4,16] [--requests 16]
                                         [--min-new 64] [--max-new 256] [--transformers-mode auto|cb|plain]
                                         [--out benchmarks/results/serve.json] [--chart benchmarks/results/serve.png]

One model is built in mmhub (`benchmarks.llava_models`: CLIP tower, MLP projector, Llama; random weights, fp32) and
saved twice: as an mmhub folder and, through `export_hf_llava`, as a transformers LLaVA folder. Each server runs in
its own process on loopback, one after the other on the same cores (both on `--device`): ``mmhub serve FOLDER --max-
batch 16`` and ``transformers serve FOLDER`` (with ``--continuous-batching`` when it runs the model:
`--transformers-mode auto` tries it first and says in the JSON which mode ran). The same load generator, built on
the official `openai` client, drives both: at each level C, C client threads each send `--requests` / C requests one
after another (at least one each), every request one random 224 px image (32 px for tiny) + 8..64 random words,
greedy, `max_tokens` drawn from [--min-new, --max-new], streamed, so the time to the first content chunk is the
TTFT.

Reported per level and side: output tokens/s over the level's wall time (tokens from each stream's usage chunk,
or counted chunks where a server sends none), TTFT p50/p95, end-to-end latency p50/p95; per side, the server
process's peak RSS (VmHWM) after all levels. Ratios are mmhub / transformers (throughput: higher is better;
latency and memory: lower is better).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import environment, write_json

ROOT = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(port: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before answering")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server did not answer on port {port} within {timeout:.0f} s")


def _vmhwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def requests_mix(n: int, image_size: int, vocab_words: int, lo: int, hi: int, seed: int = 0) -> list[dict]:
    """`n` chat requests: one random image + 8..64 random words, max_tokens in [lo, hi]."""
    from PIL import Image

    sys.path.insert(0, str(ROOT / "tests" / "helpers"))
    from live_server import data_uri

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = Image.fromarray(rng.integers(0, 255, (image_size, image_size, 3), dtype=np.uint8))
        words = " ".join(f"w{int(i)}" for i in rng.integers(0, vocab_words, int(rng.integers(8, 65))))
        content = [{"type": "image_url", "image_url": {"url": data_uri(img)}}, {"type": "text", "text": words}]
        out.append({"messages": [{"role": "user", "content": content}],
                    "max_tokens": int(rng.integers(lo, hi + 1))})
    return out


def one_request(base: str, model: str, req: dict) -> dict[str, float]:
    """Stream one request; TTFT = first chunk with content; tokens from the usage chunk (else content chunks)."""
    from openai import OpenAI

    client = OpenAI(base_url=base + "/v1", api_key="bench", max_retries=0, timeout=900)
    t0 = time.perf_counter()
    ttft, chunks, usage = None, 0, None
    stream = client.chat.completions.create(model=model, messages=req["messages"], max_tokens=req["max_tokens"],
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    for ch in stream:
        if ch.choices and ch.choices[0].delta.content:
            chunks += 1
            if ttft is None:
                ttft = time.perf_counter() - t0
        if getattr(ch, "usage", None) is not None:
            usage = ch.usage.completion_tokens
    end = time.perf_counter() - t0
    return {"ttft": ttft if ttft is not None else end, "latency": end,
            "tokens": float(usage if usage is not None else chunks), "counted": float(usage is None)}


def run_level(base: str, model: str, reqs: list[dict], clients: int) -> dict[str, Any]:
    per_client = [reqs[i::clients] for i in range(clients)]
    results: list[dict[str, float]] = []
    errors: list[str] = []
    lock = threading.Lock()

    def worker(mine: list[dict]) -> None:
        for r in mine:
            try:
                res = one_request(base, model, r)
            except Exception as exc:  # noqa: BLE001 - recorded, the level goes on
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}"[:300])
                continue
            with lock:
                results.append(res)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(m,)) for m in per_client if m]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)

    def pct(key: str, q: float) -> float | None:
        vals = sorted(r[key] for r in results)
        return float(np.percentile(vals, q)) if vals else None

    return {"clients": clients, "requests": len(results), "errors": errors, "wall_s": wall,
            "output_tokens": tokens, "throughput_tok_s": tokens / wall if wall > 0 else None,
            "ttft_p50_s": pct("ttft", 50), "ttft_p95_s": pct("ttft", 95),
            "latency_p50_s": pct("latency", 50), "latency_p95_s": pct("latency", 95),
            "tokens_counted_from_chunks": bool(any(r["counted"] for r in results))}


def serve_side(side: str, workdir: Path, levels: list[int], reqs: list[dict], mode: str,
               device: str = "cpu") -> dict[str, Any]:
    port = _port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    if side == "mmhub":
        cmd = [str(Path(sys.executable).parent / "mmhub"), "serve", str(workdir / "mmhub"), "--port", str(port),
               "--max-batch", "16", "--max-queue", "256", "--allow-path", str(workdir), "--served-name", "bench",
               "--device", device]
        name = "bench"
    else:
        cmd = [str(Path(sys.executable).parent / "transformers"), "serve", str(workdir / "hf-llava"), "--port",
               str(port), "--device", device] + (["--continuous-batching"] if mode == "cb" else [])
        name = str(workdir / "hf-llava")
    log = open(workdir / f"{side}-{mode}.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait_ready(port, proc)
        base = f"http://127.0.0.1:{port}"
        warm = one_request(base, name, {**reqs[0], "max_tokens": 8})  # first-call costs out of the levels
        out = {"side": side, "mode": mode, "command": " ".join(cmd), "warmup_s": warm["latency"], "levels": []}
        for c in levels:
            res = run_level(base, name, reqs, c)
            if res["errors"] and not res["requests"]:
                raise RuntimeError(f"{side} ({mode}) failed every request at {c} clients: {res['errors'][0]}")
            out["levels"].append(res)
            print(f"[{side}/{mode}] {c:>2} clients: {res['throughput_tok_s']:.1f} tok/s, ttft p95 "
                  f"{res['ttft_p95_s']:.3f} s, errors {len(res['errors'])}", flush=True)
        out["peak_rss_mib"] = _vmhwm_mib(proc.pid)
        return out
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def ratios(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"peak_rss": ours["peak_rss_mib"] / theirs["peak_rss_mib"], "levels": []}
    for a, b in zip(ours["levels"], theirs["levels"], strict=True):
        div = lambda x, y: (x / y) if x is not None and y else None  # noqa: E731
        out["levels"].append({"clients": a["clients"],
                              "throughput": div(a["throughput_tok_s"], b["throughput_tok_s"]),
                              "ttft_p95": div(a["ttft_p95_s"], b["ttft_p95_s"]),
                              "ttft_p50": div(a["ttft_p50_s"], b["ttft_p50_s"]),
                              "latency_p95": div(a["latency_p95_s"], b["latency_p95_s"])})
    return out


def chart(report: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for side in report["sides"]:
        xs = [lv["clients"] for lv in side["levels"]]
        label = f"{side['side']} ({side['mode']})"
        axes[0].plot(xs, [lv["throughput_tok_s"] for lv in side["levels"]], marker="o", label=label)
        axes[1].plot(xs, [lv["ttft_p95_s"] for lv in side["levels"]], marker="o", label=label)
    axes[0].set(xlabel="concurrent clients", ylabel="output tokens/s", xscale="log", title="throughput")
    axes[1].set(xlabel="concurrent clients", ylabel="TTFT p95 (s)", xscale="log", yscale="log", title="TTFT p95")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="default", choices=["tiny", "default"])
    p.add_argument("--levels", default="1,4,16")
    p.add_argument("--requests", type=int, default=16, help="requests per level (split over the clients)")
    p.add_argument("--min-new", type=int, default=64)
    p.add_argument("--max-new", type=int, default=256)
    p.add_argument("--transformers-mode", default="auto", choices=["auto", "cb", "plain"])
    p.add_argument("--device", default="cpu", help="both servers' device (cpu, cuda)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve.json"))
    p.add_argument("--chart", default=str(ROOT / "benchmarks" / "results" / "serve.png"))
    args = p.parse_args(argv)
    import torch

    from benchmarks.llava_models import N_SPECIALS, SIZES, build_pair

    levels = [int(x) for x in args.levels.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        pair = build_pair(args.size, workdir)
        del pair  # the servers load their own copies
        reqs = requests_mix(max(args.requests, max(levels)), SIZES[args.size]["clip"]["image_size"],
                            SIZES[args.size]["llama"]["vocab_size"] - N_SPECIALS, args.min_new, args.max_new)
        ours = serve_side("mmhub", workdir, levels, reqs, "continuous", args.device)
        attempts = {"auto": ["cb", "plain"], "cb": ["cb"], "plain": ["plain"]}[args.transformers_mode]
        theirs, failures = None, {}
        for mode in attempts:
            try:
                theirs = serve_side("transformers", workdir, levels, reqs, mode, args.device)
                break
            except RuntimeError as exc:
                log = (workdir / f"transformers-{mode}.log").read_text()[-3000:]
                failures[mode] = {"error": str(exc), "log_tail": log}
                print(f"[transformers/{mode}] did not run: {exc}", flush=True)
        if theirs is None:
            raise SystemExit(f"transformers serve ran in no mode: {json.dumps(failures)[:2000]}")
    report = {"benchmark": "benchmarks.serve", "command": " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
              "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "environment": environment(torch.float32), "size": args.size, "levels": levels, "device": args.device,
              "requests_per_level": len(reqs), "max_new_tokens": [args.min_new, args.max_new],
              "sides": [ours, theirs], "transformers_failed_modes": failures,
              "ratios_mmhub_over_transformers": ratios(ours, theirs)}
    write_json(report, args.out)
    chart(report, Path(args.chart))
    print(json.dumps(report["ratios_mmhub_over_transformers"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
