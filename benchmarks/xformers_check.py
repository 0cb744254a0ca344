"""xformers against SDPA on a CUDA machine: outputs, gradients and time for padded, packed and KV-cache masks; JSON.

    .venv/bin/python -m benchmarks.xformers_check [--out benchmarks/results/xformers_check.json]
                                                  [--dtype bf16|fp16] [--runs 20]

Needs a CUDA GPU and an xformers whose C++/CUDA extensions load beside this torch (`make install XFORMERS=1`
pairs them); without CUDA it exits 2, without xformers' kernels 3, both with a message that says what is missing.

Every case runs mmhub's xformers path and its SDPA path on the same random inputs (batch 4, 8 heads, head dim
64, --dtype) and compares both, outputs and the gradients of q, k and v, with a float32 softmax reference
(`mmhub.attention._eager` on explicit boolean masks). A case passes when the xformers error is at most twice the
SDPA error plus 1e-3 (both kernels round in --dtype; the bound says xformers adds no error of its own):

* ``padded``: `mmhub.attention.attention` (Q-Former-style layers) with a causal mask and right-padded keys, rows
  of 512, 384, 200 and 77 valid tokens; ``xformers`` against ``sdpa``;
* ``packed``: `hf_xformers_attention` under `packed_sequences` (one ``BlockDiagonalCausalMask`` sequence)
  against `hf_sdpa_attention` (causal SDPA segment by segment), 4 rows of 512 holding 11 samples;
* ``kv_cache_step`` / ``kv_cache_chunk``: 1 and 16 new queries against a 512-position cache with no mask
  (xformers' bottom-right causal mask) against SDPA with the explicit mask;
* ``kv_cache_left_padded``: 16 new queries, a 4D boolean mask with left padding (the mask transformers builds).

Times are medians of --runs forward+backward passes (CUDA events, after 3 warm-up passes), per kernel.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

import torch

B, H, D, L = 4, 8, 64, 512
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class _Layer(torch.nn.Module):
    """What transformers' attention functions read off the calling layer."""

    is_causal = True
    num_key_value_groups = 1


def _inputs(Lq: int, Lk: int, dtype: torch.dtype, device: torch.device, seed: int) -> list[torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(B, H, n, D, generator=g).to(device=device, dtype=dtype).requires_grad_()
            for n in (Lq, Lk, Lk)]


def _causal(Lq: int, Lk: int, device: torch.device) -> torch.Tensor:
    """Bottom-right aligned causal mask (Lq, Lk), True = attend: query i sees keys up to Lk - Lq + i."""
    return torch.ones(Lq, Lk, dtype=torch.bool, device=device).tril(Lk - Lq)


def _block_causal(seqlens: list[int], device: torch.device) -> torch.Tensor:
    """(B, 1, L, L) mask of rows packed with `seqlens` (segments never cross rows): causal within each segment."""
    mask = torch.zeros(B, 1, L, L, dtype=torch.bool, device=device)
    at = 0
    for n in seqlens:
        b, s = divmod(at, L)
        mask[b, 0, s:s + n, s:s + n] = _causal(n, n, device)
        at += n
    return mask


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """float32 softmax attention, (B, h, Lq, d)."""
    from mmhub.attention import _eager

    return _eager(q.float(), k.float(), v.float(), mask, 0.0)


def _grads(out: torch.Tensor, tensors: list[torch.Tensor], upstream: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, tensors, upstream))


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())


def _time(fn: Callable[[], torch.Tensor], tensors: list[torch.Tensor], runs: int) -> float:
    """Median milliseconds of forward+backward."""
    times = []
    for i in range(runs + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        torch.autograd.grad(out.float().sum(), tensors)
        end.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def _compare(name: str, tensors: list[torch.Tensor], mask: torch.Tensor, kernels: dict[str, Callable[[], torch.Tensor]],
             layout: str, runs: int) -> dict[str, Any]:
    """Run each kernel, compare its output and q/k/v gradients with the float32 reference, time it."""
    ref_inputs = [t.detach().float().requires_grad_() for t in tensors]
    ref = _reference(*ref_inputs, mask)  # (B, h, Lq, d)
    if layout == "bLhd":
        ref = ref.transpose(1, 2)
    g = torch.Generator(device="cpu").manual_seed(7)
    upstream = torch.randn(ref.shape, generator=g).to(ref.device)
    ref_grads = _grads(ref, ref_inputs, upstream)
    case: dict[str, Any] = {"shape_q": list(tensors[0].shape), "shape_k": list(tensors[1].shape)}
    for kernel, fn in kernels.items():
        out = fn()
        grads = _grads(out, tensors, upstream.to(out.dtype))
        case[kernel] = {"out_err": _err(out, ref),
                        "grad_err": max(_err(a, b) for a, b in zip(grads, ref_grads, strict=True)),
                        "ms_fwd_bwd": round(_time(fn, tensors, runs), 4) if runs else None}
    x, s = case["xformers"], case["sdpa"]
    case["pass"] = (x["out_err"] <= 2 * s["out_err"] + 1e-3) and (x["grad_err"] <= 2 * s["grad_err"] + 1e-3)
    if runs:
        case["speedup_xformers"] = round(s["ms_fwd_bwd"] / x["ms_fwd_bwd"], 3)
    print(f"{name}: {json.dumps(case)}", file=sys.stderr)
    return case


def run_checks(device: torch.device, dtype: torch.dtype, runs: int) -> dict[str, Any]:
    """Every case on `device` (see the module docstring); `runs` 0 skips the timing."""
    from mmhub.attention import attention
    from mmhub.hf_attention import hf_sdpa_attention, hf_xformers_attention, packed_sequences

    layer = _Layer()
    cases: dict[str, Any] = {}

    # padded: causal self-attention, right padding, through mmhub's own attention function
    q, k, v = _inputs(L, L, dtype, device, 0)
    valid = torch.tensor([512, 384, 200, 77], device=device)
    keys = torch.arange(L, device=device)[None, :] < valid[:, None]  # (B, L)
    mask = _causal(L, L, device)[None, None] & keys[:, None, None, :]  # (B, 1, L, L)
    cases["padded"] = _compare("padded", [q, k, v], mask, {
        "xformers": lambda: attention(q, k, v, mask, "xformers"),
        "sdpa": lambda: attention(q, k, v, mask, "sdpa")}, "bhLd", runs)

    # packed: 11 samples in 4 rows of 512, through the transformers attention functions
    seqlens = [300, 212, 100, 150, 262, 512, 64, 64, 128, 128, 128]
    q, k, v = _inputs(L, L, dtype, device, 1)

    def packed(fn: Callable[..., Any]) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            with packed_sequences(seqlens):
                return fn(layer, q, k, v, None, is_causal=True)[0]
        return call

    cases["packed"] = _compare("packed", [q, k, v], _block_causal(seqlens, device), {
        "xformers": packed(hf_xformers_attention), "sdpa": packed(hf_sdpa_attention)}, "bLhd", runs)

    # KV cache: new queries against a cache of 512 positions (their own included)
    for name, Lq in (("kv_cache_step", 1), ("kv_cache_chunk", 16)):
        q, k, v = _inputs(Lq, L, dtype, device, 2 + Lq)
        mask = _causal(Lq, L, device)[None, None].expand(B, 1, Lq, L)
        cases[name] = _compare(name, [q, k, v], mask, {
            "xformers": lambda q=q, k=k, v=v: hf_xformers_attention(layer, q, k, v, None, is_causal=True)[0],
            "sdpa": lambda q=q, k=k, v=v, mask=mask: hf_sdpa_attention(layer, q, k, v, mask, is_causal=False)[0]},
            "bLhd", runs)

    # KV cache with left padding: the 4D boolean mask transformers builds for SDPA
    Lq = 16
    q, k, v = _inputs(Lq, L, dtype, device, 40)
    pad = torch.tensor([0, 13, 100, 300], device=device)
    keys = torch.arange(L, device=device)[None, :] >= pad[:, None]
    mask = _causal(Lq, L, device)[None, None] & keys[:, None, None, :]
    cases["kv_cache_left_padded"] = _compare("kv_cache_left_padded", [q, k, v], mask, {
        "xformers": lambda: hf_xformers_attention(layer, q, k, v, mask, is_causal=False)[0],
        "sdpa": lambda: hf_sdpa_attention(layer, q, k, v, mask, is_causal=False)[0]}, "bLhd", runs)
    return cases


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/xformers_check.json")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--runs", type=int, default=20, help="timed forward+backward passes per kernel (0: no timing)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"benchmarks/xformers_check.py needs a CUDA GPU: torch.cuda.is_available() is False here (torch "
              f"{torch.__version__}). xformers has kernels for CUDA tensors only, so there is nothing to check; run "
              f"it on a CUDA machine after `make install XFORMERS=1`. Nothing was written.", file=sys.stderr)
        return 2
    from mmhub.xformers_probe import xformers_status

    status = xformers_status()
    if not status.usable:
        print(f"benchmarks/xformers_check.py: {status.line()}. Nothing was written.", file=sys.stderr)
        return 3
    import transformers

    cases = run_checks(torch.device("cuda"), DTYPES[args.dtype], args.runs)
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
              "xformers": status.version, "xformers_built_for": status.built_for,
              "transformers": transformers.__version__, "python": platform.python_version(), "dtype": args.dtype,
              "batch": B, "heads": H, "head_dim": D, "length": L, "runs": args.runs, "cases": cases,
              "all_pass": all(c["pass"] for c in cases.values())}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"out": str(out), "all_pass": report["all_pass"]}))
    return 0 if report["all_pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
