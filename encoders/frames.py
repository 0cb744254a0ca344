"""Helpers shared by the frame-sequence (audio) encoders: choosing a block and pooling over time."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def block_index(select_layer: int, n: int) -> int:
    """``select_layer`` -> how many of the `n` blocks to run (1..n): -1 is the last, k >= 1 is block k."""
    k = n + 1 + select_layer if select_layer < 0 else select_layer
    if not 1 <= k <= n:
        raise ValueError(f"select_layer {select_layer} is outside the encoder's {n} blocks (use 1..{n} or -{n}..-1)")
    return k


def pool_time(x: torch.Tensor, pool: int) -> torch.Tensor:
    """(N, T, C) -> (N, T // pool, C) by averaging non-overlapping groups of `pool` frames (a leftover is dropped)."""
    if pool <= 1:
        return x
    return F.avg_pool1d(x.transpose(1, 2), pool, pool).transpose(1, 2)
