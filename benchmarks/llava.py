"""mmhub vs transformers' LlavaForConditionalGeneration on the same weights; writes JSON and a ratio chart.

    .venv/bin/python -m benchmarks.llava [--size tiny|default] [--rounds 5] [--warmup 1] [--threads N]
                                         [--out benchmarks/results/latest.json] [--chart benchmarks/results/latest.png]

One model is built in mmhub (CLIP tower, 2-layer MLP projector, Llama; fp32, random weights from configs), exported
with `export_hf_llava`, and loaded back with transformers. Every round times each measurement on both sides,
alternating which side goes first, on the same batch (random token ids and pixels):

* stage 1 (projector trained; ~12-token captions; batch 8): mmhub reads precomputed encoder features, as its
  trainer does with `cache_features`; transformers runs the vision tower each step. AdamW step included.
* stage 2 (projector + LLM trained; 32..256 text tokens per sample, 1 image each; batch 8): mmhub packs the
  batch into rows of `--pack-len` tokens (by default one row: no padding; attention runs per sample) and
  projects logits only at labelled positions; transformers takes right-padded rows.
* generation (1 image + 32-token prompt, `--new-tokens` greedy tokens with the KV cache, batch 1 and 8): tokens/s
  over the whole call (prefill included), and time to first token = the time of a 1-new-token generate.
* peak memory: each side's workload (2 steps of each stage, one batch-8 generation) in its own child process
  (this module with `--child`), reading its VmHWM.
* MFU per stage (see `llava_steps.FLOPS_FORMULA`) against this machine's fp32 matmul peak.
* ablations: mmhub's optimisations switched off one at a time (feature cache, packing, label-only logits,
  sdpa attention -> eager, column-major wide weights -> row-major) and the chunked cross-entropy (off by
  default) switched on, each timed in every round next to mmhub's default; the attention and layout
  variants in generation too.
* bf16: in the last `--bf16-rounds` rounds both sides' training steps again under CPU bf16 autocast, with MFU
  against the bf16 matmul peak.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from benchmarks.common import environment, matmul_peak_flops, paired, peak_rss_mib, summary, timed, write_json
from benchmarks.llava_models import SIZES, Pair, build_pair, hf_batch, load_side, samples, spec_for
from benchmarks.llava_steps import (
    FLOPS_FORMULA,
    full_logits_target,
    hf_generate,
    hf_step,
    mmhub_batch,
    mmhub_generate,
    mmhub_step,
    optimizer,
    parameter_counts,
    set_trainable_hf,
    set_trainable_mmhub,
    useful_flops,
)
from mmhub.processor import Encoded

ROOT = Path(__file__).resolve().parents[1]  # the children run `-m benchmarks.llava` from here
RATIO_NOTES = ("every ratio is mmhub / transformers of the raw value: for *_samples_per_s and *_tokens_per_s higher "
               "is better for mmhub (>1 = mmhub faster); for ttft_b1 and peak_memory lower is better for mmhub "
               "(<1 = mmhub faster / smaller). `median` is the median of the per-round paired ratios, `best` the "
               "ratio of each "
               "side's best value (max throughput, min time or memory).")
VARIANT_SPECS = {"eager_attention": {"attention": "eager"}, "row_layout": {"weight_layout": "row"}}
TARGETS = {"stage2_samples_per_s": (">=", 1.5), "stage1_samples_per_s": (">=", 2.0),
           "generate_tokens_per_s_b1": (">=", 1.2),
           "generate_tokens_per_s_b8": (">=", 1.0), "ttft_b1": ("<=", 1.0), "peak_memory": ("<=", 1.0)}


def data(pair: Pair, args: argparse.Namespace, rounds: int, rng: np.random.Generator) -> dict[str, list[Any]]:
    """Per round: a stage-1 batch, a stage-2 batch and generation prompts (batch 8; batch 1 is its first row)."""
    m = pair.mmhub
    mk = lambda lo, hi, labelled=True: samples(m, args.batch_size, lo, hi, pair.image_size, pair.text_vocab, rng,  # noqa: E731
                                               labelled=labelled)
    return {"stage1": [mk(args.caption_len, args.caption_len) for _ in range(rounds)],
            "stage2": [mk(args.min_len, args.max_len) for _ in range(rounds)],
            "prompt": [mk(args.prompt_len, args.prompt_len, labelled=False) for _ in range(rounds)]}


def bf16(fn: Callable[[], None]) -> None:
    """Run a training step under CPU bf16 autocast (matmuls in bf16, weights and optimizer state fp32)."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fn()


def chunked(model: Any, chunk: int, fn: Callable[[], None]) -> None:
    """Run `fn` with the model's chunked cross-entropy on (``loss_chunk`` positions per chunk)."""
    before = model.spec.runtime.loss_chunk
    model.spec.runtime.loss_chunk = chunk
    try:
        fn()
    finally:
        model.spec.runtime.loss_chunk = before


def mm_prompt(pair: Pair, encs: list[Any]) -> dict[str, Any]:
    """Generation prompts as mmhub takes them: left-padded ids + media."""
    return pair.mmhub.processor.collate(encs, padding_side="left")


def run_rounds(pair: Pair, args: argparse.Namespace) -> dict[str, Any]:
    """All paired timings and the ablations; returns raw per-round lists."""
    rounds = args.warmup + args.rounds
    d = data(pair, args, rounds, np.random.default_rng(args.seed))
    m, hf, pid = pair.mmhub, pair.hf, pair.mmhub.processor.placeholder_ids["image"]
    params = parameter_counts(m)
    variant_models: dict[str, Any] = {}  # mmhub built with one optimisation off, same weights
    if not args.no_ablations:
        from mmhub import build

        words = Path(args.workdir) / "words.txt"
        for name, setting in VARIANT_SPECS.items():
            variant_models[name] = build(spec_for(args.size, words, **setting))
            variant_models[name].load_state_dict(m.state_dict())
    times: dict[str, dict[str, list[float]]] = {}
    optimizers: dict[tuple[str, int], torch.optim.Optimizer] = {}

    def opt_for(key: tuple[str, int], params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        """One AdamW per side and stage, kept across rounds (its state is allocated in the warm-up, not timed)."""
        if key not in optimizers:
            optimizers[key] = optimizer(params)
        return optimizers[key]

    flops: dict[str, list[float]] = {"stage1": [], "stage2": []}

    def record(name: str, side: str, value: float, r: int) -> None:
        if r >= args.warmup:
            times.setdefault(name, {}).setdefault(side, []).append(value)

    for r in range(rounds):
        order = ["mmhub", "transformers"] if r % 2 == 0 else ["transformers", "mmhub"]
        for stage in (1, 2):
            encs = d[f"stage{stage}"][r]
            if r >= args.warmup:
                flops[f"stage{stage}"].append(useful_flops(params, encs, pair.image_tokens, pid, stage))
            mm_opt = opt_for(("mmhub", stage), set_trainable_mmhub(m, stage))
            hf_opt = opt_for(("transformers", stage), set_trainable_hf(hf, stage))
            kw = mmhub_batch(m, encs, args.pack_len if stage == 2 else None, cache_features=True)
            hb = hf_batch(pair, encs, "right")
            run: dict[str, Callable[[], None]] = {"mmhub": partial(mmhub_step, m, mm_opt, kw),
                                                  "transformers": partial(hf_step, hf, hf_opt, hb)}
            for side in order:
                record(f"stage{stage}_step_s", side, timed(run[side]), r)
            if r >= rounds - args.bf16_rounds:  # the same steps under bf16 autocast (fp32 master weights), both sides
                for side in order:
                    record(f"stage{stage}_bf16_step_s", side, timed(partial(bf16, run[side])), r)
            if variant_models:  # ablations, mmhub only, next to the default just timed
                variants: dict[str, Callable[[], None]] = {}
                kw_media = mmhub_batch(m, encs, args.pack_len if stage == 2 else None, cache_features=False)
                variants["no_feature_cache"] = partial(mmhub_step, m, mm_opt, kw_media)
                for name, vm in variant_models.items():
                    v_opt = opt_for((name, stage), set_trainable_mmhub(vm, stage))
                    variants[name] = partial(mmhub_step, vm, v_opt, kw)
                if stage == 2:
                    kw_pad = mmhub_batch(m, encs, None, cache_features=True)
                    target = full_logits_target(m, kw)
                    variants["no_packing"] = partial(mmhub_step, m, mm_opt, kw_pad)
                    variants["full_logits"] = partial(mmhub_step, m, mm_opt, kw, target)
                    variants["chunked_ce"] = partial(chunked, m, args.loss_chunk, partial(mmhub_step, m, mm_opt, kw))
                for name, fn in variants.items():
                    record(f"ablation_stage{stage}_step_s", name, timed(fn), r)
        for b in (1, 8):
            encs = d["prompt"][r][:b]
            mb, hb = mm_prompt(pair, encs), hf_batch(pair, encs, "left")
            pad = m.processor.pad_id
            gen = {"mmhub": partial(mmhub_generate, m, mb, args.new_tokens),
                   "transformers": partial(hf_generate, hf, hb, args.new_tokens, pad)}
            first = {"mmhub": partial(mmhub_generate, m, mb, 1), "transformers": partial(hf_generate, hf, hb, 1, pad)}
            for side in order:
                t = time.perf_counter()
                n = gen[side]()
                dt = time.perf_counter() - t
                if n != b * args.new_tokens:
                    raise RuntimeError(f"{side} generated {n} tokens, expected {b * args.new_tokens}")
                record(f"generate_tokens_per_s_b{b}", side, n / dt, r)
                if b == 1:
                    record("ttft_b1_s", side, timed(first[side]), r)
            for name, vm in variant_models.items():
                t = time.perf_counter()
                n = mmhub_generate(vm, mb, args.new_tokens)
                record(f"ablation_generate_b{b}_tokens_per_s", name, n / (time.perf_counter() - t), r)
    return {"times": times, "flops": flops, "params": params,
            "attention": {"mmhub": m.backbone.model.config._attn_implementation,
                          "transformers": hf.config.get_text_config()._attn_implementation}}


def child(args: argparse.Namespace) -> None:
    """Peak-memory child: one side alone runs 2 steps of each stage and one batch-8 generation; prints JSON."""
    workdir = Path(args.workdir)
    # the restricted (weights-only) unpickler, allowing only mmhub's Encoded record besides tensors and containers
    with torch.serialization.safe_globals([Encoded]):
        inputs = torch.load(workdir / f"memory_{args.child}.pt", weights_only=True)
    model = load_side(args.child, workdir)
    for stage in (1, 2):
        if args.child == "mmhub":
            opt = optimizer(set_trainable_mmhub(model, stage))
            for encs in inputs[f"stage{stage}"]:
                mmhub_step(model, opt, mmhub_batch(model, encs, args.pack_len if stage == 2 else None, True))
        else:
            opt = optimizer(set_trainable_hf(model, stage))
            for hb in inputs[f"stage{stage}"]:
                hf_step(model, opt, hb)
        del opt
    if args.child == "mmhub":
        mmhub_generate(model, inputs["prompt"], args.new_tokens)
    else:
        hf_generate(model, inputs["prompt"], args.new_tokens, inputs["pad_id"])
    print(json.dumps({"side": args.child, "peak_rss_mib": peak_rss_mib()}))


def memory(pair: Pair, args: argparse.Namespace) -> dict[str, list[float]]:
    """Peak RSS (MiB) of each side's workload in its own process, alternating sides, `--memory-rounds` times."""
    workdir = Path(args.workdir)
    rng = np.random.default_rng(args.seed + 1)
    d = data(pair, args, 2, rng)
    torch.save({"stage1": d["stage1"], "stage2": d["stage2"], "prompt": mm_prompt(pair, d["prompt"][0])},
               workdir / "memory_mmhub.pt")
    torch.save({"stage1": [hf_batch(pair, e, "right") for e in d["stage1"]],
                "stage2": [hf_batch(pair, e, "right") for e in d["stage2"]],
                "prompt": hf_batch(pair, d["prompt"][0], "left"), "pad_id": pair.mmhub.processor.pad_id},
               workdir / "memory_transformers.pt")
    out: dict[str, list[float]] = {"mmhub": [], "transformers": []}
    for r in range(args.memory_rounds):
        for side in (["mmhub", "transformers"] if r % 2 == 0 else ["transformers", "mmhub"]):
            cmd = [sys.executable, "-m", "benchmarks.llava", "--child", side, "--workdir", str(workdir),
                   "--size", args.size, "--new-tokens", str(args.new_tokens), "--pack-len", str(args.pack_len),
                   "--threads", str(torch.get_num_threads())]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                raise RuntimeError(f"memory child for {side} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
            out[side].append(float(json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mib"]))
    return out


def report(pair: Pair, args: argparse.Namespace, raw: dict[str, Any], mem: dict[str, list[float]],
           peak: dict[str, Any]) -> dict[str, Any]:
    """The JSON report: environment, setup, per-measurement summaries and paired ratios, MFU, ablations."""
    t = raw["times"]
    bs = args.batch_size
    per_side: dict[str, dict[str, list[float]]] = {
        "stage1_samples_per_s": {s: [bs / x for x in t["stage1_step_s"][s]] for s in t["stage1_step_s"]},
        "stage2_samples_per_s": {s: [bs / x for x in t["stage2_step_s"][s]] for s in t["stage2_step_s"]},
        "generate_tokens_per_s_b1": t["generate_tokens_per_s_b1"],
        "generate_tokens_per_s_b8": t["generate_tokens_per_s_b8"],
        "ttft_b1": t["ttft_b1_s"],
        "peak_memory": mem,
    }
    for stage in ("stage1", "stage2"):
        if f"{stage}_bf16_step_s" in t:
            per_side[f"{stage}_bf16_samples_per_s"] = {s: [bs / x for x in t[f"{stage}_bf16_step_s"][s]]
                                                       for s in t[f"{stage}_bf16_step_s"]}
    units = {"stage1_bf16_samples_per_s": "samples/s (bf16 autocast)",
             "stage2_bf16_samples_per_s": "samples/s (bf16 autocast)",
             "stage1_samples_per_s": "samples/s", "stage2_samples_per_s": "samples/s",
             "generate_tokens_per_s_b1": "tokens/s",
             "generate_tokens_per_s_b8": "tokens/s", "ttft_b1": "s", "peak_memory": "MiB (VmHWM of a child process)"}
    higher = {k: k.endswith("_per_s") or "_per_s_" in k for k in per_side}
    measurements, ratios = {}, {}
    for k, v in per_side.items():
        ratio = paired(v["mmhub"], v["transformers"], higher[k])
        measurements[k] = {"unit": units[k], "higher_is_better": higher[k], "mmhub": summary(v["mmhub"]),
                           "transformers": summary(v["transformers"]), "per_round": v, "paired_ratio": ratio}
        ratios[k] = {"median": ratio["median"], "best": ratio["best"]}
    mfu: dict[str, Any] = {"formula": FLOPS_FORMULA, "peak_flops_per_s": peak["float32"]["flops_per_s"]}
    for stage in ("stage1", "stage2"):
        mfu[stage] = mfu_of(raw["flops"][stage], t[f"{stage}_step_s"], peak["float32"]["flops_per_s"])
    if "stage1_bf16_step_s" in t:
        mfu["bf16"] = {"peak_flops_per_s": peak["bfloat16"]["flops_per_s"],
                       "note": "the same steps under torch.autocast(cpu, bfloat16), against the bf16 matmul peak"}
        for stage in ("stage1", "stage2"):
            mfu["bf16"][stage] = mfu_of(raw["flops"][stage], t[f"{stage}_bf16_step_s"], peak["bfloat16"]["flops_per_s"])
    ablations: dict[str, Any] = {"note": "mmhub only, each variant timed in every round next to the default; training: "
                                         "default_over_variant = default step time / variant step time, generation: "
                                         "variant_over_default = variant tokens/s / default tokens/s; in both a value "
                                         "< 1 means the variant is slower by that factor (for an optimisation switched "
                                         "off: what it contributes; for chunked_ce, off by default and switched on "
                                         "here: what it costs)",
                                 "chunked_ce": f"loss_chunk = {args.loss_chunk} labelled positions per chunk (stage 2)"}
    for stage in ("stage1", "stage2"):
        key = f"ablation_{stage}_step_s"
        if key in t:
            base = t[f"{stage}_step_s"]["mmhub"]
            ablations[stage] = {"default_step_s": summary(base)}
            for name, vals in t[key].items():
                ablations[stage][name] = {"step_s": summary(vals),
                                          "default_over_variant": paired(base, vals, higher_is_better=False)["median"]}
    for b in (1, 8):
        key = f"ablation_generate_b{b}_tokens_per_s"
        if key in t:
            base = t[f"generate_tokens_per_s_b{b}"]["mmhub"]
            ablations[f"generate_b{b}"] = {"default_tokens_per_s": summary(base)}
            for name, vals in t[key].items():
                ablations[f"generate_b{b}"][name] = {
                    "tokens_per_s": summary(vals),
                    "variant_over_default": paired(vals, base, higher_is_better=True)["median"]}
    met = {k: (ratios[k]["median"] >= v if op == ">=" else ratios[k]["median"] <= v) for k, (op, v) in TARGETS.items()}
    met["training_mfu_60pct"] = min(mfu["stage1"]["mmhub"]["median"], mfu["stage2"]["mmhub"]["median"]) >= 0.6
    return {
        "benchmark": "benchmarks.llava", "command": " ".join(sys.argv),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": environment(torch.float32),
        "setup": {"size": args.size, "configs": SIZES[args.size], "params": raw["params"],
                  "image_tokens": pair.image_tokens,
                  "batch_size": bs, "caption_len": args.caption_len, "stage2_text_len": [args.min_len, args.max_len],
                  "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "pack_len": args.pack_len,
                  "rounds": args.rounds, "warmup": args.warmup, "memory_rounds": args.memory_rounds,
                  "attention": raw["attention"], "optimizer": "AdamW(lr=1e-5), torch defaults",
                  "mmhub": "stage 1 with cached encoder features; stage 2 packed + logits at labelled positions only",
                  "transformers": "vision tower every step, right padding, model's own loss (full logits)",
                  "loss_note": "the exported LM head has one extra row (the <image> token), so transformers' loss is "
                               "over vocab+1 classes; logits of the shared rows are identical"},
        "matmul_peak": peak, "measurements": measurements, "mfu": mfu, "ablations": ablations,
        "ratios": ratios, "ratio_notes": RATIO_NOTES, "targets": {k: f"{op} {v}" for k, (op, v) in TARGETS.items()},
        "targets_met": met,
    }


def mfu_of(flops: list[float], step_s: dict[str, list[float]], peak: float) -> dict[str, Any]:
    """Per side: summary of useful FLOPs / step time / `peak` over the rounds; plus the FLOPs per step. Step times
    of only the last rounds (the bf16 ones) pair with the FLOPs of those rounds."""
    n = len(step_s["mmhub"])
    flops = flops[-n:]
    out: dict[str, Any] = {s: summary([f / x / peak for f, x in zip(flops, step_s[s], strict=True)])
                           for s in ("mmhub", "transformers")}
    out["useful_flops_per_step"] = summary(flops)
    return out


def chart(rep: dict[str, Any], path: str | Path) -> Path:
    """A bar chart of the median paired ratios (best as dots) with a line at 1.0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rep["ratios"])
    med = [rep["ratios"][k]["median"] for k in names]
    best = [rep["ratios"][k]["best"] for k in names]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    colors = ["tab:green" if (m >= 1) == rep["measurements"][k]["higher_is_better"] else "tab:red"
              for k, m in zip(names, med, strict=True)]
    ax.bar(range(len(names)), med, color=colors, label="median paired ratio")
    ax.plot(range(len(names)), best, "ko", label="best / best")
    ax.axhline(1.0, color="black", linewidth=1)
    ax.set_xticks(range(len(names)), [n + ("\n(lower better)" if not rep["measurements"][n]["higher_is_better"] else "")
                                      for n in names], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("mmhub / transformers")
    env = rep["environment"]
    ax.set_title(f"mmhub vs transformers LLaVA ({rep['setup']['size']}, {env['torch_threads']} threads, "
                 f"{env['dtype']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=list(SIZES), default="default")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (each side measured once per round)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    ap.add_argument("--memory-rounds", type=int, default=1, help="child-process pairs for peak memory")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--caption-len", type=int, default=12, help="stage-1 caption tokens")
    ap.add_argument("--min-len", type=int, default=32, help="stage-2 shortest text")
    ap.add_argument("--max-len", type=int, default=256, help="stage-2 longest text")
    ap.add_argument("--pack-len", type=int, default=4096,
                    help="mmhub's packed row budget (stage 2); the default holds the whole batch in one row")
    ap.add_argument("--loss-chunk", type=int, default=256, help="chunk size of the chunked cross-entropy ablation")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (both sides)")
    ap.add_argument("--no-ablations", action="store_true")
    ap.add_argument("--bf16-rounds", type=int, default=None,
                    help="the last N timed rounds (default 1, at most --rounds) also time both sides' training "
                         "steps under bf16 autocast (0: none); "
                         "few by default: a CPU without bf16 matmul units runs them several times slower than fp32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/latest.json")
    ap.add_argument("--chart", default="benchmarks/results/latest.png")
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=["mmhub", "transformers"], default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0 or args.memory_rounds < 1:
        ap.error("--rounds and --memory-rounds must be >= 1, --warmup >= 0")
    if args.bf16_rounds is None:
        args.bf16_rounds = min(1, args.rounds)
    if not 0 <= args.bf16_rounds <= args.rounds:
        ap.error(f"--bf16-rounds must be between 0 and --rounds ({args.rounds}), got {args.bf16_rounds}")
    if args.min_len > args.max_len:
        ap.error(f"--min-len {args.min_len} > --max-len {args.max_len}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        child(args)
        return {}
    with tempfile.TemporaryDirectory(prefix="mmhub-bench-llava-") as tmp:
        args.workdir = tmp
        pair = build_pair(args.size, Path(tmp), args.seed)
        peak = {"float32": matmul_peak_flops(), "bfloat16": matmul_peak_flops(2048, 3, torch.bfloat16)}
        raw = run_rounds(pair, args)
        mem = memory(pair, args)
        rep = report(pair, args, raw, mem, peak)
    out = write_json(rep, args.out)
    png = chart(rep, args.chart)
    print(json.dumps({"ratios": rep["ratios"], "targets_met": rep["targets_met"],
                      "mfu_mmhub": {s: rep["mfu"][s]["mmhub"]["median"] for s in ("stage1", "stage2")}}, indent=2))
    print(f"wrote {out} and {png}")
    return rep


if __name__ == "__main__":
    main()
