"""The one attention function behind every attention mmhub itself implements.

Q-Former, perceiver resampler, cross-attention resampler and gated cross-attention
all call `attention(q, k, v, mask, backend)`. The backend is chosen per spec
(``attention: auto|xformers|sdpa|eager``):

* ``xformers``: ``xformers.ops.memory_efficient_attention``; its kernels exist only
  for CUDA tensors, so asking for it elsewhere is an error that says so;
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``;
* ``eager``: the plain softmax(QK^T/sqrt(d))V, for debugging and as the reference;
* ``auto``: xformers where it runs (CUDA tensors and an xformers whose C++/CUDA extensions
  loaded), SDPA otherwise, and SDPA also for inputs this xformers build has no kernel for;
  each fallback is logged once.

xformers counts only when its extensions loaded: a wheel built for another torch imports without
them (`mmhub.xformers_probe.xformers_status` finds out once and logs one line with the fix,
``make install XFORMERS=1``). Which kernel actually ran is counted: ``with attention_kernels() as
ran: ...`` gives e.g. ``{"sdpa": 12}``, and the first run of each (requested, kernel, device) is
logged once (``attention: auto on cuda ran xformers``).

Inside transformers backbones and towers the same choice goes through `mmhub.hf_attention.hf_attn_implementation`:
``xformers`` (and ``auto`` on a CUDA machine with xformers) registers `hf_xformers_attention` as
transformers' ``mmhub_xformers`` attention; packed rows (`packed_sequences`) run there as one
``BlockDiagonalCausalMask`` sequence. Elsewhere a backbone's SDPA is ``mmhub_sdpa``
(`hf_sdpa_attention`): over packed rows it runs each sample's segment as its own causal SDPA call
(`segment_sdpa`, the varlen attention of flash-attn done segment by segment), so packing costs no
attention over other samples or padding and rows may be as long as the batch.

All backends take the same layout, ``(B, heads, L, head_dim)``, and the same mask
(boolean, True = attend; broadcastable to ``(B, heads, Lq, Lk)``), and agree
numerically (tested).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator, Literal

import torch
import torch.nn.functional as F

from mmhub.errors import MMHubError
from mmhub.xformers_probe import FIX, XformersStatus, xformers_status

Backend = Literal["auto", "xformers", "sdpa", "eager"]
BACKENDS: tuple[str, ...] = ("auto", "xformers", "sdpa", "eager")
log = logging.getLogger(__name__)


class AttentionBackendError(MMHubError):
    """The requested attention backend cannot run on these tensors."""


def xformers_importable() -> bool:
    """True when xformers imports with its C++/CUDA extensions loaded (`xformers_status`, imported once, lazily:
    importing it is slow). A wheel built for another torch imports without them and counts as not importable."""
    return xformers_status().usable


def xformers_runs(device: torch.device) -> bool:
    """True when xformers' memory-efficient kernels run on `device` (CUDA only; no CPU kernels)."""
    return device.type == "cuda" and xformers_importable()


_kernels: ContextVar[Counter[str] | None] = ContextVar("mmhub_attention_kernels", default=None)


@contextmanager
def attention_kernels() -> Iterator[Counter[str]]:
    """Count the attention kernels that actually run inside the block: ``xformers``, ``sdpa``, ``eager`` and
    ``segment_sdpa`` (`hf_sdpa_attention` over packed rows), one count per call of `attention`,
    `hf_xformers_attention` or `hf_sdpa_attention` (transformers' own ``sdpa``/``eager`` are not seen)."""
    ran: Counter[str] = Counter()
    token = _kernels.set(ran)
    try:
        yield ran
    finally:
        _kernels.reset(token)


def _ran(kernel: str, requested: str, device: torch.device) -> None:
    """Record that `kernel` ran for a call that asked for `requested`; the first of each kind is logged once."""
    ran = _kernels.get()
    if ran is not None:
        ran[kernel] += 1
    _log_once(f"ran: {requested} {kernel} {device.type}", "attention: %s on %s ran %s", requested, device.type,
              kernel)


_warned: set[str] = set()
# (device type, dtype, head dim, masked) combinations xformers has no operator for: `auto` uses SDPA for them
_xformers_unsupported: set[tuple[str, torch.dtype, int, bool]] = set()


def _log_once(key: str, msg: str, *args: object) -> None:
    if key not in _warned:
        _warned.add(key)
        log.info(msg, *args)


def select_backend(requested: str, device: torch.device) -> str:
    """The backend that runs for `requested` on `device`; raises when an explicit choice cannot run."""
    if requested not in BACKENDS:
        raise AttentionBackendError(f"unknown attention backend {requested!r}; use one of {', '.join(BACKENDS)}")
    if requested == "auto":
        if xformers_runs(device):
            return "xformers"
        # only a CUDA device needs xformers imported to explain the fallback (importing it is slow and noisy)
        why = f"xformers has no {device.type} kernels" if device.type != "cuda" else "xformers is not importable"
        _log_once(device.type, "attention: auto -> sdpa on %s (%s)", device.type, why)
        return "sdpa"
    if requested == "xformers" and not xformers_runs(device):
        if device.type != "cuda":
            why = (f"xformers' memory_efficient_attention has kernels for CUDA only and these tensors are on "
                   f"{device.type}")
        else:
            why = f"xformers is not installed or fails to import, or its C++/CUDA kernels did not load ({_why_not()})"
        raise AttentionBackendError(f"attention backend 'xformers' cannot run here: {why}. "
                                    "Set `attention: auto` (uses xformers where it runs, SDPA otherwise) "
                                    "or `attention: sdpa`.")
    return requested


def _why_not(status: XformersStatus | None = None) -> str:
    """Why xformers' kernels are not there, with the fix."""
    st = status or xformers_status()
    if not st.installed:
        return "no xformers package: `pip install xformers` on a Linux x86_64 CUDA machine"
    if st.kernels:
        return f"xformers {st.version} loaded its kernels, but not in this check"
    built = f"built for torch {st.built_for}" if st.built_for else "built for another torch"
    return f"xformers {st.version} was {built}, this is torch {st.torch}; `{FIX}` installs the torch it was built for"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              backend: str = "auto", dropout_p: float = 0.0) -> torch.Tensor:
    """Scaled dot-product attention. q: (B, h, Lq, d); k, v: (B, h, Lk, d); mask: bool, True = attend.

    Returns (B, h, Lq, d). A query row whose mask is all False returns zeros (not NaN)
    on every backend.
    """
    chosen = select_backend(backend, q.device)
    empty_rows = None
    if mask is not None:
        mask = mask.to(torch.bool)
        empty_rows = ~mask.any(-1, keepdim=True)  # (B|1, h|1, Lq, 1)
        if bool(empty_rows.any()):
            mask = mask | empty_rows  # avoid softmax over nothing; the rows are zeroed below
        else:
            empty_rows = None
    out = _xformers_or_none(q, k, v, mask, dropout_p, backend) if chosen == "xformers" else None
    kernel = "xformers"
    if out is None:
        kernel = "eager" if chosen == "eager" else "sdpa"
        if chosen == "eager":
            out = _eager(q, k, v, mask, dropout_p)
        else:  # sdpa, or auto where this xformers build has no kernel for these inputs
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    _ran(kernel, backend, q.device)
    if empty_rows is not None:
        out = out.masked_fill(empty_rows, 0.0)
    return out


def _xformers_or_none(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout_p: float,
                      backend: str) -> torch.Tensor | None:
    """xformers' output, or None under ``auto`` when this build has no kernel for these inputs (then SDPA runs).

    An importable xformers can still lack kernels (a build for another torch/CUDA loads without its
    C++ extensions; some dtypes/head dims have no operator): it raises NotImplementedError
    ("No operator found"). ``auto`` remembers the combination and uses SDPA; an explicit
    ``xformers`` turns it into an `AttentionBackendError` with the fix.
    """
    key = (q.device.type, q.dtype, q.shape[-1], mask is not None)
    if backend == "auto" and key in _xformers_unsupported:
        return None
    try:
        return _xformers(q, k, v, mask, dropout_p)
    except NotImplementedError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if backend != "auto":
            raise AttentionBackendError(
                f"attention backend 'xformers' has no kernel for these inputs ({q.dtype}, head dim {q.shape[-1]}): "
                f"{first}. Set `attention: auto` (falls back to SDPA) or `attention: sdpa`.") from exc
        _xformers_unsupported.add(key)
        log.info("attention: auto -> sdpa for %s (xformers has no kernel for these inputs: %s)", key, first)
        return None


def _eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           dropout_p: float) -> torch.Tensor:
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, h, Lq, Lk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(-1)
    if dropout_p:
        probs = F.dropout(probs, dropout_p)
    return probs @ v


def _xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              dropout_p: float) -> torch.Tensor:
    import xformers.ops as xops

    B, h, Lq, d = q.shape
    Lk = k.shape[2]
    bias = None
    if mask is not None:
        # xformers wants an additive bias whose storage is aligned to 8 in the last dim
        pad = (8 - Lk % 8) % 8
        # (fill in place: an out-of-place masked_fill would return a fresh, unaligned tensor)
        bias = torch.zeros(B, h, Lq, Lk + pad, dtype=q.dtype, device=q.device)[..., :Lk]
        bias.masked_fill_(~mask.expand(B, h, Lq, Lk), float("-inf"))
    # xformers layout is (B, L, h, d)
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias,
                                          p=dropout_p)
    return out.transpose(1, 2)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, h*d) -> (B, h, L, d)."""
    B, L, D = x.shape
    if D % heads:
        raise ValueError(f"width {D} is not divisible by {heads} heads")
    return x.reshape(B, L, heads, D // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, h, L, d) -> (B, L, h*d)."""
    B, h, L, d = x.shape
    return x.transpose(1, 2).reshape(B, L, h * d)


class MultiheadAttention(torch.nn.Module):
    """Multi-head (cross-)attention through `attention`: q/k/v/out projections, any key width."""

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None, backend: str = "auto", bias: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        kv_dim = kv_dim or dim
        self.heads, self.backend, self.dropout = heads, backend, dropout
        self.q = torch.nn.Linear(dim, dim, bias=bias)
        self.k = torch.nn.Linear(kv_dim, dim, bias=bias)
        self.v = torch.nn.Linear(kv_dim, dim, bias=bias)
        self.out = torch.nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                value: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, Lq, dim); context: (B, Lk, kv_dim) (self-attention when None); mask (B, Lk) or (B, Lq, Lk),
        True = attend.

        `value` (B, Lk, kv_dim), when given, feeds the values instead of `context` (which then
        feeds only the keys): Qwen-VL's resampler adds positional embeddings to the keys only.
        """
        context = x if context is None else context
        value = context if value is None else value
        if mask is not None:
            mask = mask[:, None, None, :] if mask.ndim == 2 else mask[:, None]
        q, k, v = (split_heads(f(t), self.heads) for f, t in ((self.q, x), (self.k, context), (self.v, value)))
        out = attention(q, k, v, mask, self.backend, self.dropout if self.training else 0.0)
        return self.out(merge_heads(out))
