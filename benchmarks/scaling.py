"""How cost grows with the work: mmhub against transformers' LLaVA along four axes, each point in its own processes.

    python -m benchmarks.scaling [--size small] [--rounds 2] [--axes text,images,gen_batch,prompt]
                                 [--out benchmarks/results/scaling.json] [--chart benchmarks/results/scaling.png]

One model (CLIP tower -> MLP -> Llama, fp32, random weights from configs; `SCALING_SIZES`) is built in mmhub,
exported with `export_hf_llava` and loaded back in transformers' `LlavaForConditionalGeneration` (same weights). For
every point of every axis each side runs alone in a child process (`--child`), on the same inputs (saved by the
parent, read back with the weights-only loader): one warm-up, then `--rounds` timed repetitions; the child reports
the median seconds and its peak RSS (VmHWM), so a point's memory is that workload's alone. Sides alternate which
runs first from point to point.

Axes (the training steps train the projector and the language model, AdamW included; mmhub reads cached encoder
features, as its trainer does, and packs each batch into one row; transformers takes right-padded rows):

* ``text``: text tokens per sample 256 -> 1k -> 4k -> 8k, batch 2, one image each: training step;
* ``images``: images per sample 1 -> 2 -> 4 -> 8, 256 text tokens, batch 2: training step;
* ``gen_batch``: generation batch 1 -> 8 -> 32 (one image + 32 prompt tokens, 16 new tokens): tokens/s;
* ``prompt``: prompt length 256 -> 1k -> 4k at batch 1 (one image): time to first token;
* ``image_prefill``: images per sample 1 -> 2 -> 4 -> 8 at batch 1 (256 text tokens): time to first token.

With ``--checkpointing`` the training axes also run the memory variants (`MMHUB_VARIANTS`: ``mmhub_ckpt`` with the
spec's ``runtime.activation_checkpointing``, ``mmhub_chunk`` with ``runtime.loss_chunk`` 1024, ``mmhub_lean`` with
both; ``transformers_ckpt``: transformers' ``gradient_checkpointing_enable``), and the text axis reports each side's
peak-RSS growth per extra training token between its two longest points (``memory_per_token_kib``) and, per memory
cap in `CAPS_MIB`, the longest text each side trained within it (peak RSS, VmHWM; ``longest_under_cap``).
``--long`` adds a 16k-token point to the text axis. ``--compile`` adds ``mmhub_compile`` (``runtime.compile``: each
block compiled with torch.compile; the warm-up repetition holds the compile) on every axis.

The JSON holds per point both sides' seconds, throughput and peak RSS, the ratios (mmhub throughput over the
peer's; peak RSS mmhub over the peer's) and per axis each side's growth: the slope of log(seconds) against
log(axis value). The chart plots seconds and peak RSS per axis, both sides.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.llava_models import SIZES

ROOT = Path(__file__).resolve().parents[1]
SCALING_SIZES: dict[str, dict[str, Any]] = {
    # ~3M-parameter CLIP tower (49 patches), ~9M-parameter Llama with an 8,000-word vocabulary and room for 16k tokens
    "small": {
        "clip": {"model_type": "clip_vision_model", "hidden_size": 192, "intermediate_size": 768,
                 "num_hidden_layers": 4, "num_attention_heads": 4, "image_size": 224, "patch_size": 32},
        "llama": {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 8000,
                  "max_position_embeddings": 32768},
    },
    # benchmarks.llava's toy, with room for the longest text point
    "tiny": {"clip": SIZES["tiny"]["clip"], "llama": {**SIZES["tiny"]["llama"], "max_position_embeddings": 16384}},
}
AXES: dict[str, list[int]] = {"text": [256, 1024, 4096, 8192], "images": [1, 2, 4, 8], "gen_batch": [1, 8, 32],
                              "prompt": [256, 1024, 4096], "image_prefill": [1, 2, 4, 8]}
TRAIN_BATCH, NEW_TOKENS, GEN_PROMPT = 2, 16, 32
LONG_TEXT = 16384  # --long: one more text point
CAPS_MIB = (2048, 3072, 4096)
# sides: each library as it comes, and (--checkpointing, training axes) the memory variants: mmhub's runtime options
# (activation checkpointing per block, chunked loss, both) and transformers' gradient_checkpointing_enable
MMHUB_VARIANTS: dict[str, dict[str, Any]] = {
    "mmhub_ckpt": {"activation_checkpointing": True, "loss_chunk": 0},  # checkpointing alone (no auto loss chunks)
    "mmhub_chunk": {"loss_chunk": 1024},
    "mmhub_lean": {"activation_checkpointing": True, "loss_chunk": 1024},
}
COMPILED = {"mmhub_compile": {"compile": True}}  # --compile: every axis, beside mmhub as it comes
SIDE_BASE = {"mmhub": "mmhub", "transformers": "transformers", "transformers_ckpt": "transformers",
             **{v: "mmhub" for v in (*MMHUB_VARIANTS, *COMPILED)}}
CKPT_SIDES = (*MMHUB_VARIANTS, "transformers_ckpt")
VARIANT_SIDES = (*CKPT_SIDES, *COMPILED)
TRAIN_AXES = ("text", "images")


def build_models(size: str, workdir: Path) -> dict[str, Any]:
    """The mmhub model (up to 8 images a sample) saved and exported to transformers' LLaVA in `workdir`."""
    from benchmarks.llava_models import spec_for, word_list
    from mmhub import build
    from mmhub.export import export_hf_llava

    torch.manual_seed(0)
    cfg = SCALING_SIZES[size]
    words = word_list(workdir, cfg["llama"]["vocab_size"])
    spec = spec_for("tiny", words)
    spec["name"] = f"bench-scaling-{size}"
    spec["encoders"]["image"]["config"] = cfg["clip"]
    spec["backbone"]["config"] = cfg["llama"]
    spec["max_items"] = {"image": max(AXES["images"])}
    model = build(spec)
    model.save_pretrained(workdir / "mmhub")
    # the same model with each variant's runtime options (same weights; runtime options change no output)
    plain = model.spec.runtime.model_dump()
    for variant, options in {**MMHUB_VARIANTS, **COMPILED}.items():
        for key, value in options.items():
            setattr(model.spec.runtime, key, value)
        model.save_pretrained(workdir / variant)
        for key in options:
            setattr(model.spec.runtime, key, plain[key])
    out = export_hf_llava(model, workdir / "hf-llava")
    return {"model": model, "hf_dir": out, "image_tokens": model.plan.tokens_per_item("image"),
            "image_size": cfg["clip"]["image_size"], "vocab": cfg["llama"]["vocab_size"]}


def _samples(model: Any, n: int, text: int, images: int, image_size: int, vocab: int, rng: np.random.Generator,
             labelled: bool) -> list[Any]:
    """`n` samples of `text` tokens with `images` placeholders spread through the first quarter."""
    from benchmarks.llava_models import N_SPECIALS
    from mmhub.processor import Encoded
    from mmhub.splice import IGNORE

    pid = model.processor.placeholder_ids["image"]
    out = []
    for _ in range(n):
        ids = rng.integers(N_SPECIALS, vocab, text).tolist()
        ids[0] = model.tokenizer.bos_token_id
        cut = max(2, text // 4)
        labels = ([IGNORE] * cut + ids[cut:]) if labelled else [IGNORE] * text
        for k in range(images):
            at = 1 + k * max(1, (cut - 1) // max(1, images))
            ids.insert(at, pid)
            labels.insert(at, IGNORE)
        pix = [model.processor.preprocess["image"](rng.integers(0, 255, (image_size, image_size, 3), dtype=np.uint8))
               for _ in range(images)]
        out.append(Encoded(ids, labels, {"image": pix}))
    return out


def point_inputs(built: dict[str, Any], axis: str, value: int, seed: int) -> dict[str, Any]:
    """Both sides' inputs for one point of an axis."""
    from benchmarks.llava_models import llava_inputs

    model, rng = built["model"], np.random.default_rng(seed)
    image_id = int(json.loads((built["hf_dir"] / "config.json").read_text())["image_token_index"])
    args = dict(image_size=built["image_size"], vocab=built["vocab"], rng=rng)
    if axis in ("text", "images"):
        text, images = (value, 1) if axis == "text" else (256, value)
        encs = _samples(model, TRAIN_BATCH, text, images, labelled=True, **args)
        return {"kind": "train", "mmhub": encs,
                "hf": llava_inputs(model.processor, image_id, built["image_tokens"], encs, "right")}
    batch, prompt, images = {"gen_batch": (value, GEN_PROMPT, 1), "prompt": (1, value, 1),
                             "image_prefill": (1, 256, value)}[axis]
    encs = _samples(model, batch, prompt, images, labelled=False, **args)
    mm = model.processor.collate(list(encs), padding_side="left")
    return {"kind": "generate", "new_tokens": NEW_TOKENS if axis == "gen_batch" else 1,
            "mmhub": {"input_ids": mm["input_ids"], "attention_mask": mm["attention_mask"], "media": mm["media"]},
            "hf": llava_inputs(model.processor, image_id, built["image_tokens"], encs, "left"),
            "pad_id": model.processor.pad_id}


def child(side: str, workdir: Path, point: str, rounds: int, threads: int, profile: bool = False) -> None:
    """One side alone on one point: a warm-up, then `rounds` timed repetitions; prints JSON. With `profile`, one
    repetition under torch's profiler instead: its time per operator category (`benchmarks.profile_ops`)."""
    import time

    from benchmarks.common import peak_rss_mib, rss_mib
    from benchmarks.llava_models import load_side
    from benchmarks.llava_steps import (
        hf_generate,
        hf_step,
        mmhub_batch,
        mmhub_generate,
        mmhub_step,
        optimizer,
        set_trainable_hf,
        set_trainable_mmhub,
    )
    from mmhub.processor import Encoded

    torch.set_num_threads(threads)
    with torch.serialization.safe_globals([Encoded]):
        inputs = torch.load(workdir / f"{point}.pt", weights_only=True)
    started_mib = rss_mib()
    model = load_side(SIDE_BASE[side], workdir, variant=side if side in VARIANT_SIDES else None)
    loaded_mib = rss_mib()
    if inputs["kind"] == "train":
        if SIDE_BASE[side] == "mmhub":
            opt = optimizer(set_trainable_mmhub(model, 2))
            total = sum(len(e.input_ids) + (inputs["image_tokens"] - 1) * len(e.media["image"])
                        for e in inputs["mmhub"])
            kw = mmhub_batch(model, inputs["mmhub"], total, True)

            def work() -> None:
                mmhub_step(model, opt, kw)
        else:
            opt = optimizer(set_trainable_hf(model, 2))

            def work() -> None:
                hf_step(model, opt, inputs["hf"])
    else:
        model.eval()
        if SIDE_BASE[side] == "mmhub":
            def work() -> None:
                mmhub_generate(model, inputs["mmhub"], inputs["new_tokens"])
        else:
            def work() -> None:
                hf_generate(model, inputs["hf"], inputs["new_tokens"], inputs["pad_id"])
    work()
    if profile:
        from benchmarks.profile_ops import profile_call

        memory = {"rss_before_load_mib": round(started_mib, 1), "rss_loaded_mib": round(loaded_mib, 1)}
        print(json.dumps(profile_call(work) | memory | {"peak_rss_mib": round(peak_rss_mib(), 1)}))
        return
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        work()
        times.append(time.perf_counter() - t)
    print(json.dumps({"seconds": float(np.median(times)), "all_seconds": times, "peak_rss_mib": peak_rss_mib()}))


def _slope(xs: list[float], ys: list[float]) -> float | None:
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x > 0 and y and y > 0]
    if len(pts) < 2:
        return None
    return round(float(np.polyfit([p[0] for p in pts], [p[1] for p in pts], 1)[0]), 3)


def memory_per_token(points: list[dict[str, Any]], sides: list[str]) -> dict[str, Any]:
    """Per side, the peak-RSS growth per extra training token between the two longest points both ran (KiB per
    token of the batch: TRAIN_BATCH samples), and the peer's over each side's (how many times less mmhub grows)."""
    out: dict[str, Any] = {}
    for side in sides:
        ran = [p for p in points if "peak_rss_mib" in p.get(side, {})]
        if len(ran) >= 2:
            a, b = ran[-2], ran[-1]
            extra = (b["value"] - a["value"]) * TRAIN_BATCH
            out[side] = {"from": a["value"], "to": b["value"],
                         "kib": round((b[side]["peak_rss_mib"] - a[side]["peak_rss_mib"]) * 1024 / extra, 2)}
    peer = out.get("transformers", {}).get("kib")
    for side, row in out.items():
        if peer and row["kib"] > 0 and side != "transformers":
            row["peer_over_this"] = round(peer / row["kib"], 2)
    return out


def longest_under_cap(points: list[dict[str, Any]], sides: list[str]) -> dict[str, dict[str, int | None]]:
    """Per memory cap (MiB of peak RSS), per side: the longest text point it trained within the cap (None: none)."""
    out: dict[str, dict[str, int | None]] = {}
    for cap in CAPS_MIB:
        out[str(cap)] = {}
        for side in sides:
            fits = [p["value"] for p in points if p.get(side, {}).get("peak_rss_mib", float("inf")) <= cap]
            out[str(cap)][side] = max(fits) if fits else None
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.common import environment
    from mmhub.processor import Encoded  # noqa: F401  (the saved inputs hold Encoded records)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="mmhub-scaling-"))
    workdir.mkdir(parents=True, exist_ok=True)
    built = build_models(args.size, workdir)
    result: dict[str, Any] = {"environment": environment(torch.float32), "size": args.size, "rounds": args.rounds,
                              "threads": args.threads, "model": {"image_tokens": built["image_tokens"],
                                                                 "config": SCALING_SIZES[args.size]}, "axes": {}}
    flip = False
    for axis in args.axes.split(","):
        points = []
        for value in AXES[axis] + ([LONG_TEXT] if axis == "text" and args.long else []):
            name = f"{axis}-{value}"
            inputs = point_inputs(built, axis, value, seed=value)
            inputs["image_tokens"] = built["image_tokens"]
            torch.save(inputs, workdir / f"{name}.pt")
            row: dict[str, Any] = {"value": value}
            sides = ["mmhub", "transformers"] + (list(CKPT_SIDES) if args.checkpointing and axis in TRAIN_AXES else [])
            sides += list(COMPILED) if args.compile else []
            for side in (sides[::-1] if flip else sides):
                cmd = [sys.executable, "-m", "benchmarks.scaling", "--child", side, "--workdir", str(workdir),
                       "--point", name, "--rounds", str(args.rounds), "--threads", str(args.threads)]
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                if proc.returncode != 0:  # a point a side cannot run (out of memory, a limit): recorded, not fatal
                    row[side] = {"error": proc.stderr.strip().splitlines()[-1][:300] if proc.stderr else "failed"}
                    continue
                row[side] = json.loads(proc.stdout.strip().splitlines()[-1])
            flip = not flip
            work = (TRAIN_BATCH if axis in ("text", "images") else value * NEW_TOKENS if axis == "gen_batch" else 1)
            unit = {"text": "samples/s", "images": "samples/s", "gen_batch": "tokens/s", "prompt": "1/TTFT",
                    "image_prefill": "1/TTFT"}[axis]
            row["unit"] = unit
            both = all("seconds" in row.get(s, {}) for s in ("mmhub", "transformers"))
            for side in sides:
                if "seconds" in row.get(side, {}):
                    row[side]["throughput"] = round(work / row[side]["seconds"], 3)
            if both:
                row["throughput_ratio"] = round(row["mmhub"]["throughput"] / row["transformers"]["throughput"], 3)
                row["memory_ratio"] = round(row["mmhub"]["peak_rss_mib"] / row["transformers"]["peak_rss_mib"], 3)
            for side in VARIANT_SIDES:  # each variant against the peer as it comes
                mine, peer = row.get(side, {}), row.get("transformers", {})
                if "seconds" in mine and "seconds" in peer:
                    row[f"{side}_throughput_ratio"] = round(mine["throughput"] / peer["throughput"], 3)
                    row[f"{side}_memory_ratio"] = round(mine["peak_rss_mib"] / peer["peak_rss_mib"], 3)
            points.append(row)
            print(axis, json.dumps(row), flush=True)
        growth = {side: _slope([p["value"] for p in points], [p.get(side, {}).get("seconds") for p in points])
                  for side in sides}
        result["axes"][axis] = {"points": points, "growth_slope": growth}
        if axis == "text":
            result["axes"][axis]["memory_per_token_kib"] = memory_per_token(points, sides)
            result["axes"][axis]["longest_under_cap"] = longest_under_cap(points, sides)
    return result


def chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes = list(result["axes"])
    fig, grid = plt.subplots(2, len(axes), figsize=(4 * len(axes), 6.5), squeeze=False)
    for j, axis in enumerate(axes):
        pts = result["axes"][axis]["points"]
        for side, colour in (("mmhub", "#e69138"), ("transformers", "#3d85c6"), ("mmhub_ckpt", "#b45f06"),
                             ("mmhub_chunk", "#f6b26b"), ("mmhub_lean", "#783f04"), ("transformers_ckpt", "#0b5394"),
                             ("mmhub_compile", "#6aa84f")):
            if not any("seconds" in p.get(side, {}) for p in pts):
                continue
            xs = [p["value"] for p in pts if "seconds" in p.get(side, {})]
            grid[0][j].plot(xs, [p[side]["seconds"] for p in pts if "seconds" in p.get(side, {})], "o-",
                            color=colour, label=side)
            grid[1][j].plot(xs, [p[side]["peak_rss_mib"] for p in pts if "seconds" in p.get(side, {})], "o-",
                            color=colour, label=side)
        for i, what in enumerate(("seconds", "peak RSS (MiB)")):
            grid[i][j].set_xscale("log", base=2)
            grid[i][j].set_yscale("log") if i == 0 else None
            grid[i][j].set_xlabel(axis)
            grid[i][j].set_ylabel(what)
            grid[i][j].legend(fontsize=7)
    fig.suptitle(f"mmhub vs transformers LLaVA, size {result['size']}: cost per point (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small", choices=list(SCALING_SIZES))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--axes", default=",".join(AXES))
    ap.add_argument("--out", default="benchmarks/results/scaling.json")
    ap.add_argument("--chart", default="benchmarks/results/scaling.png")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--checkpointing", action="store_true",
                    help="also run the memory variants (activation checkpointing, chunked loss) on the training axes")
    ap.add_argument("--long", action="store_true", help=f"add a {LONG_TEXT}-token point to the text axis")
    ap.add_argument("--compile", action="store_true",
                    help="also run mmhub with runtime.compile (torch.compile per block) on every axis")
    ap.add_argument("--child", choices=list(SIDE_BASE), default=None)
    ap.add_argument("--point", default=None)
    ap.add_argument("--profile", action="store_true", help="(with --child) profile one repetition by operator")
    a = ap.parse_args(argv)
    if a.child:
        child(a.child, Path(a.workdir), a.point, a.rounds, a.threads, a.profile)
        return 0
    from mmhub.atomic import write_text_atomic

    result = run(a)
    write_text_atomic(Path(a.out), json.dumps(result, indent=1) + "\n")
    chart(result, Path(a.chart))
    return 0


if __name__ == "__main__":
    sys.exit(main())
