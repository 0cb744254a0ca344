"""Batch surgery on a transformers KV cache, for continuous batching: keep rows, join two batches, drop dead columns.

A running batch is left-padded: row b's cached positions sit at the right end of the sequence axis and its
attention mask is 0 over the padding on the left. Joining a freshly prefilled batch pads the shorter of the two on
the left (zeros under a 0 mask) and concatenates along the batch axis; dropping finished rows selects the others;
columns that every remaining row masks out are cut off the left. Positions travel per row (``position_ids``), so a
row's padding never shifts its rotary positions, and the attention a row sees is exactly the attention it would
see alone (up to the float summation order of a longer masked row).

Only caches made of plain per-layer key/value tensors qualify (`mergeable`): transformers' ``DynamicCache`` with
``DynamicLayer``s (5.x) or its ``key_cache``/``value_cache`` lists (4.x). Sliding-window, quantized, static or
recurrent caches are not: the engine serves such models one request at a time.
"""

from __future__ import annotations

from typing import Any

import torch


def _layers(cache: Any) -> list[Any] | None:
    layers = getattr(cache, "layers", None)
    if layers is None:
        return None
    from transformers.cache_utils import DynamicLayer

    return layers if all(type(layer) is DynamicLayer for layer in layers) else None


def mergeable(cache: Any) -> bool:
    """Whether `cache` is a plain per-layer key/value cache the functions here can edit."""
    if _layers(cache) is not None:
        return True
    return isinstance(getattr(cache, "key_cache", None), list) and isinstance(getattr(cache, "value_cache", None), list)


def _pairs(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    layers = _layers(cache)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))


def _set(cache: Any, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    layers = _layers(cache)
    if layers is not None:
        for layer, (k, v) in zip(layers, pairs, strict=True):
            layer.keys, layer.values = k, v
        return
    cache.key_cache[:] = [k for k, _ in pairs]
    cache.value_cache[:] = [v for _, v in pairs]


def select_rows(cache: Any, mask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Keep (or repeat) the batch rows `rows` of `cache`, in place; returns the mask (B, L) rows to match."""
    index = torch.tensor(rows, dtype=torch.long, device=mask.device)
    _set(cache, [(k.index_select(0, index.to(k.device)), v.index_select(0, index.to(v.device)))
                 for k, v in _pairs(cache)])
    return mask.index_select(0, index)


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    """(B, H, L, D) -> (B, H, n + L, D), zeros first."""
    if n == 0:
        return t
    return torch.cat([t.new_zeros(*t.shape[:-2], n, t.shape[-1]), t], dim=-2)


def join(cache: Any, mask: torch.Tensor, other: Any, other_mask: torch.Tensor) -> torch.Tensor:
    """Append `other`'s rows to `cache` (in place), left-padding the shorter; returns the joined mask (B1 + B2, L)."""
    a, b = _pairs(cache), _pairs(other)
    if len(a) != len(b):
        raise ValueError(f"cannot join caches of {len(a)} and {len(b)} layers")
    la, lb = mask.shape[1], other_mask.shape[1]
    length = max(la, lb)
    _set(cache, [(torch.cat([_pad_left(ka, length - la), _pad_left(kb, length - lb)], 0),
                  torch.cat([_pad_left(va, length - la), _pad_left(vb, length - lb)], 0))
                 for (ka, va), (kb, vb) in zip(a, b, strict=True)])
    pad = lambda m, n: torch.cat([m.new_zeros(m.shape[0], n), m], 1)  # noqa: E731
    return torch.cat([pad(mask, length - la), pad(other_mask.to(mask.dtype), length - lb)], 0)


def trim_left(cache: Any, mask: torch.Tensor) -> torch.Tensor:
    """Cut the leading columns no row attends to (after long rows left); returns the trimmed mask."""
    used = mask.bool().any(0)
    if not bool(used.any()):
        return mask
    first = int(used.nonzero()[0])
    if first == 0:
        return mask
    _set(cache, [(k[..., first:, :], v[..., first:, :]) for k, v in _pairs(cache)])
    return mask[:, first:]
