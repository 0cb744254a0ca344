"""mmhub's attention inside transformers models: the ``attn_implementation`` a spec's backend maps to.

`hf_attn_implementation` turns a spec's ``attention:`` choice into the name a transformers backbone or tower is
built with. ``xformers`` (and ``auto`` on a CUDA machine with xformers) registers `hf_xformers_attention` as
transformers' ``mmhub_xformers`` attention; packed rows (`packed_sequences`) run there as one
``BlockDiagonalCausalMask`` sequence. Elsewhere a packing backbone's SDPA is ``mmhub_sdpa`` (`hf_sdpa_attention`):
over packed rows it runs each sample's segment as its own causal SDPA call (`segment_sdpa`), so packing costs no
attention over other samples or padding. The kernels themselves are `mmhub.attention`'s.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F

from mmhub import attention as core  # through the module, so its switches can be patched

HF_XFORMERS = "mmhub_xformers"  # the name mmhub registers its xformers attention under in transformers
_packed_seqlens: ContextVar[tuple[int, ...] | None] = ContextVar("mmhub_packed_seqlens", default=None)
# attention keywords that only transformers' own SDPA path handles (position biases, soft-capping, sinks, weights)
_SPECIAL = ("position_bias", "softcap", "s_aux", "sinks", "output_attentions")


def hf_attn_implementation(backend: str, packed: bool = False) -> str:
    """The transformers ``attn_implementation`` matching a spec's backend.

    ``eager`` -> ``eager``; ``xformers``, and ``auto`` where CUDA and xformers are there, ->
    ``mmhub_xformers`` (`hf_xformers_attention`, registered on first use: xformers kernels on CUDA
    tensors, segment-wise SDPA elsewhere); everything else -> ``sdpa``, or with `packed` (a backbone
    that takes packed rows) ``mmhub_sdpa`` (`hf_sdpa_attention`: transformers' SDPA, segment by segment
    over packed rows).
    """
    if backend == "eager":
        return "eager"
    if backend == "xformers" or (backend == "auto" and torch.cuda.is_available() and core.xformers_importable()):
        return _register(HF_XFORMERS, hf_xformers_attention)
    return _register(HF_SDPA, hf_sdpa_attention) if packed else "sdpa"


def _register(name: str, fn: Any) -> str:
    """Register `fn` as transformers attention `name` (masks built as for SDPA); returns `name`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, _packed_or_sdpa_mask(sdpa_mask))  # the masks transformers builds are SDPA's
    return name


def _packed_or_sdpa_mask(sdpa_mask: Any) -> Any:
    """SDPA's mask builder, except over packed rows (`packed_sequences` active, self-attention covering the whole
    batch): no mask then, since every segment runs its own causal call; building the (L, L) mask of a packed row
    costs O(L^2) time and memory (at 16k positions: 1.5 s and 256 MiB) for a mask nothing reads."""
    def build(batch_size: int, q_length: int, kv_length: int, *args: Any, **kwargs: Any) -> Any:
        seqlens = _packed_seqlens.get()
        if seqlens is not None and q_length == kv_length > 1 and sum(seqlens) == batch_size * kv_length:
            return None
        return sdpa_mask(batch_size, q_length, kv_length, *args, **kwargs)

    return build


@contextmanager
def packed_sequences(seqlens: Sequence[int]) -> Iterator[None]:
    """While active, `hf_xformers_attention` treats a (B, L) batch with sum(seqlens) == B*L as one packed
    sequence of these segments (xformers' ``BlockDiagonalCausalMask``) instead of reading the 4D mask."""
    token = _packed_seqlens.set(tuple(int(n) for n in seqlens))
    try:
        yield
    finally:
        _packed_seqlens.reset(token)


def hf_xformers_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function (query (B, h, Lq, d), key/value (B, h_kv, Lk, d) -> (B, Lq, h, d)) over
    xformers' memory-efficient kernels; transformers' SDPA where xformers cannot run (not CUDA, no kernel for
    these inputs, position biases, logit soft-capping, attention sinks)."""
    special = [k for k in (*_SPECIAL, "cache") if kwargs.get(k) is not None and kwargs.get(k) is not False]
    key_ = (query.device.type, query.dtype, query.shape[-1], attention_mask is not None)
    if special or not core.xformers_runs(query.device):
        why = f"xformers takes no {', '.join(special)}" if special else f"xformers has no {query.device.type} kernels"
        core._log_once(f"hf: {why}", "attention: mmhub_xformers -> sdpa (%s)", why)
    elif key_ not in core._xformers_unsupported:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        try:
            out = _hf_xformers(query, key, value, attention_mask, dropout, scaling, causal)
            core._ran("xformers", HF_XFORMERS, query.device)
            return out, None
        except NotImplementedError as exc:
            core._xformers_unsupported.add(key_)
            core.log.info("attention: mmhub_xformers -> sdpa for %s (xformers has no kernel for these inputs: %s)",
                          key_, str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
    return hf_sdpa_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                             is_causal=is_causal, **kwargs)


HF_SDPA = "mmhub_sdpa"  # the name of mmhub's SDPA attention in transformers: segment-wise over packed rows


def hf_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, except over packed rows (`packed_sequences` active, self-attention over the
    whole batch): there every sample's segment is its own causal SDPA call, with no mask. A packed row then costs
    in attention what its samples cost unpacked, whatever its length, and the causal kernel runs instead of the
    masked one; so a batch can be packed into rows as long as itself, with no padding at all."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    seqlens = _packed_seqlens.get()
    B, h, L, d = query.shape
    if (seqlens is None or key.shape[2] != L or L == 1 or sum(seqlens) != B * L
            or any(kwargs.get(k) is not None and kwargs.get(k) is not False for k in _SPECIAL)):
        core._ran("sdpa", HF_SDPA, query.device)
        if attention_mask is None and seqlens is not None and key.shape[2] == L > 1 and sum(seqlens) == B * L:
            attention_mask = block_mask(seqlens, B, L, query.device)  # packed rows on the masked path after all
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    core._ran("segment_sdpa", HF_SDPA, query.device)
    return segment_sdpa(query, key, value, seqlens, dropout, scaling), None


def block_mask(seqlens: Sequence[int], B: int, L: int, device: Any) -> torch.Tensor:
    """(B, 1, L, L) bool, True = attend: causal within each run of `seqlens` over the flattened (B*L) positions."""
    ids = torch.repeat_interleave(torch.arange(len(seqlens), device=device),
                                  torch.tensor(list(seqlens), device=device)).view(B, L)
    idx = torch.arange(L, device=device)
    return ((ids[:, :, None] == ids[:, None, :]) & (idx[None, :, None] >= idx[None, None, :]))[:, None]


def segment_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, seqlens: Sequence[int],
                 dropout: float = 0.0, scaling: float | None = None) -> torch.Tensor:
    """Causal attention within each run of `seqlens` (row by row over the flattened (B*L) positions; runs never
    cross rows). query (B, h, L, d), key/value (B, h_kv, L, d), h a multiple of h_kv -> (B, L, h, d)."""
    B, h, L, d = query.shape
    rep = h // key.shape[1]
    if rep > 1:  # grouped-query heads, repeated as transformers' SDPA path does
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    rows: list[list[torch.Tensor]] = [[] for _ in range(B)]
    at = 0
    for n in seqlens:
        b, s = divmod(at, L)
        if s + n > L:
            raise ValueError(f"segment of {n} positions at {s} crosses the end of row {b} (length {L})")
        seg = slice(s, s + n)
        rows[b].append(F.scaled_dot_product_attention(query[b:b + 1, :, seg], key[b:b + 1, :, seg],
                                                      value[b:b + 1, :, seg],
                                                      dropout_p=dropout, is_causal=True, scale=scaling))
        at += n
    return torch.cat([torch.cat(r, dim=2) for r in rows]).transpose(1, 2)


def _hf_xformers(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                 dropout: float, scaling: float | None, causal: bool) -> torch.Tensor:
    import xformers.ops as xops
    from xformers.ops.fmha import attn_bias as xbias

    B, h, Lq, d = query.shape
    Lk, rep = key.shape[2], h // key.shape[1]
    # xformers layout (B, L, heads, d); grouped-query heads are repeated like transformers' SDPA path does
    q = query.transpose(1, 2)
    k, v = (t.repeat_interleave(rep, dim=1).transpose(1, 2) if rep > 1 else t.transpose(1, 2) for t in (key, value))
    seqlens = _packed_seqlens.get()
    if seqlens is not None and Lq == Lk and sum(seqlens) == B * Lq:  # packed rows: one block per sample
        bias = xbias.BlockDiagonalCausalMask.from_seqlens(list(seqlens), device=query.device)
        out = xops.memory_efficient_attention(q.reshape(1, B * Lq, h, d), k.reshape(1, B * Lk, h, d),
                                              v.reshape(1, B * Lk, h, d), attn_bias=bias, p=dropout, scale=scaling)
        return out.reshape(B, Lq, h, d)
    if mask is None:
        bias = None if not causal or Lq == 1 else (xbias.LowerTriangularMask() if Lq == Lk
                                                   else xbias.LowerTriangularFromBottomRightMask())
    else:  # an additive bias whose storage is aligned to 8 in the last dim; rows with nothing to attend attend all
        pad = (8 - Lk % 8) % 8
        bias = torch.zeros(B, h, Lq, Lk + pad, dtype=q.dtype, device=q.device)[..., :Lk]
        if mask.dtype == torch.bool:
            bias.masked_fill_(~(mask | ~mask.any(-1, keepdim=True)).expand(B, h, Lq, Lk), float("-inf"))
        else:
            bias.add_(mask.to(q.dtype).expand(B, h, Lq, Lk))
    return xops.memory_efficient_attention(q, k, v, attn_bias=bias, p=dropout, scale=scaling)
