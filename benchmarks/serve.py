"""`mmhub serve` vs `transformers serve` on the same LLaVA-shaped model and request mix; JSON + chart.

    .venv/bin/python -m benchmarks.serve [--size tiny|default] [--levels 1,4,16] [--requests 16]
                                         [--min-new 64] [--max-new 256] [--transformers-mode auto|cb|plain]
                                         [--out benchmarks/results/serve.json] [--chart benchmarks/results/serve.png]

One model is built in mmhub (`benchmarks.llava_models`: CLIP tower, MLP projector, Llama; random weights, fp32) and
saved twice: as an mmhub folder and, through `export_hf_llava`, as a transformers LLaVA folder. Both servers run at
once, each in its own process group on loopback (both on `--device`): ``mmhub serve FOLDER --max-batch 16`` and
``transformers serve FOLDER`` (with ``--continuous-batching`` when it runs the model: `--transformers-mode auto` tries
it first and says in the JSON which mode ran). Levels are paired: at each level one side runs, then the other, while
the idle one waits (it uses no CPU), and who goes first alternates from level to level, so a drift in the machine's
speed does not fall on one side. The same load generator, built on
the official `openai` client, drives both: at each level C, C client threads each send `--requests` / C requests one
after another (at least one each), every request one random 224 px image (32 px for tiny) + 8..64 random words,
greedy, `max_tokens` drawn from [--min-new, --max-new], streamed, so the time to the first content chunk is the
TTFT.

Reported per level and side: output tokens/s over the level's wall time (tokens from each stream's usage chunk,
or counted chunks where a server sends none), TTFT p50/p95, end-to-end latency p50/p95; per side, memory over the
server's whole process tree (`TreeMemory`: `transformers serve` loads its model in a spawned child process): the
peak of the tree's summed PSS, sampled every 0.25 s, the sum of each process's VmHWM, and the launched process's
own VmHWM. Ratios are mmhub / transformers (throughput: higher is better; latency and memory: lower is better).
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


class TreeMemory:
    """Samples a server's whole process tree: `transformers serve` runs its model in a spawned child process, so
    the launched process's own peak misses the model. Every `interval` s it sums PSS (proportional set size: pages
    shared between the processes, e.g. libtorch, counted once in all) over the process and its descendants and
    keeps the peak; `stop()` also records each process's own VmHWM."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        import psutil

        self.root, self.interval = psutil.Process(pid), interval
        self.peak_pss_mib = 0.0
        self.hwm: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree(self) -> list:
        import psutil

        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return []

    def sample(self) -> None:
        import psutil

        total = 0.0
        for proc in self._tree():
            try:
                total += proc.memory_full_info().pss / 2**20
                self.hwm[f"{proc.pid} {' '.join(proc.cmdline())[:120]}"] = _vmhwm_mib(proc.pid)
            except (psutil.Error, OSError):
                continue
        self.peak_pss_mib = max(self.peak_pss_mib, total)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def stop(self) -> dict[str, Any]:
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join()
            try:
                self.sample()
            except Exception:  # noqa: BLE001 - the server already exited: the samples taken stand
                pass
        return {"peak_tree_pss_mib": self.peak_pss_mib, "sum_vmhwm_mib": sum(self.hwm.values()),
                "processes_vmhwm_mib": dict(self.hwm)}


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


class Server:
    """One server (`side` mmhub or transformers, `mode`) started in its own process group on loopback, ready and
    warmed up; its process tree's memory sampled (`TreeMemory`) until `close`."""

    def __init__(self, side: str, workdir: Path, mode: str, device: str, warm: dict) -> None:
        port = _port()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
        if side == "mmhub":
            cmd = [str(Path(sys.executable).parent / "mmhub"), "serve", str(workdir / "mmhub"), "--port", str(port),
                   "--max-batch", "16", "--max-queue", "256", "--allow-path", str(workdir), "--served-name", "bench",
                   "--device", device]
            self.name = "bench"
        else:
            cmd = [str(Path(sys.executable).parent / "transformers"), "serve", str(workdir / "hf-llava"), "--port",
                   str(port), "--device", device] + (["--continuous-batching"] if mode == "cb" else [])
            self.name = str(workdir / "hf-llava")
        self.side, self.mode, self.base = side, mode, f"http://127.0.0.1:{port}"
        self.log_path = workdir / f"{side}-{mode}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed by close()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.memory = TreeMemory(self.proc.pid)
        self.report: dict[str, Any] = {"side": side, "mode": mode, "command": " ".join(cmd), "levels": []}
        try:
            _wait_ready(port, self.proc)
            self.report["warmup_s"] = one_request(self.base, self.name, {**warm, "max_tokens": 8})["latency"]
        except BaseException:
            self.close()
            raise

    def level(self, reqs: list[dict], clients: int) -> None:
        res = run_level(self.base, self.name, reqs, clients)
        if res["errors"] and not res["requests"]:
            raise RuntimeError(f"{self.side} ({self.mode}) failed every request at {clients} clients: "
                               f"{res['errors'][0]}")
        self.report["levels"].append(res)
        print(f"[{self.side}/{self.mode}] {clients:>2} clients: {res['throughput_tok_s']:.1f} tok/s, ttft p95 "
              f"{res['ttft_p95_s']:.3f} s, errors {len(res['errors'])}", flush=True)

    def finish(self) -> dict[str, Any]:
        self.report["peak_rss_mib"] = _vmhwm_mib(self.proc.pid)  # the launched process alone
        self.report["memory"] = self.memory.stop()
        return self.report

    def close(self) -> None:
        self.memory.stop()
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()


def ratios(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"peak_tree_pss": ours["memory"]["peak_tree_pss_mib"] / theirs["memory"]["peak_tree_pss_mib"],
                           "sum_vmhwm": ours["memory"]["sum_vmhwm_mib"] / theirs["memory"]["sum_vmhwm_mib"],
                           "peak_rss_launched_process": ours["peak_rss_mib"] / theirs["peak_rss_mib"], "levels": []}
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
        attempts = {"auto": ["cb", "plain"], "cb": ["cb"], "plain": ["plain"]}[args.transformers_mode]
        theirs, failures = None, {}
        for mode in attempts:
            try:
                theirs = Server("transformers", workdir, mode, args.device, reqs[0])
                break
            except RuntimeError as exc:
                tail = (workdir / f"transformers-{mode}.log").read_text()[-3000:]
                failures[mode] = {"error": str(exc), "log_tail": tail}
                print(f"[transformers/{mode}] did not run: {exc}", flush=True)
        if theirs is None:
            raise SystemExit(f"transformers serve ran in no mode: {json.dumps(failures)[:2000]}")
        try:
            ours = Server("mmhub", workdir, "continuous", args.device, reqs[0])
        except BaseException:
            theirs.close()
            raise
        try:  # both servers stay up (idle while the other runs); who goes first alternates from level to level
            for i, c in enumerate(levels):
                for server in ((ours, theirs) if i % 2 == 0 else (theirs, ours)):
                    server.level(reqs, c)
            reports = ours.finish(), theirs.finish()
        finally:
            ours.close()
            theirs.close()
        ours_r, theirs_r = reports
    report = {"benchmark": "benchmarks.serve", "command": " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
              "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "environment": environment(torch.float32), "size": args.size, "levels": levels, "device": args.device,
              "requests_per_level": len(reqs), "max_new_tokens": [args.min_new, args.max_new],
              "sides": [ours_r, theirs_r], "transformers_failed_modes": failures,
              "ratios_mmhub_over_transformers": ratios(ours_r, theirs_r)}
    write_json(report, args.out)
    chart(report, Path(args.chart))
    print(json.dumps(report["ratios_mmhub_over_transformers"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
