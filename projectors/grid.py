"""Token-grid helpers shared by the projectors that treat encoder tokens as a 2D grid.

The cross-attention resampler (Qwen-VL), the C-Abstractor (Honeybee) and the LDP
(MobileVLM) all read a ViT's patch tokens as a square ``side x side`` grid; this
module holds the square check (one error message for all three) and the
(N, T, C) <-> (N, C, side, side) reshapes.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def grid_side(in_tokens: int, who: str, what: str = "input tokens") -> int:
    """Side of the square grid that `in_tokens` tokens form; ValueError naming the count and the fix otherwise."""
    side = math.isqrt(in_tokens) if in_tokens > 0 else 0
    if in_tokens <= 0 or side * side != in_tokens:
        lo, hi = side * side, (side + 1) ** 2
        near = f"{lo} ({side}x{side}) or {hi} ({side + 1}x{side + 1})" if lo else f"{hi} ({side + 1}x{side + 1})"
        raise ValueError(f"{who} reads its {what} as a square grid, but {in_tokens} is not a perfect square "
                         f"(nearest: {near}); fix: give it a square count, e.g. drop the CLS token "
                         f"(encoder `drop_cls: true`) so a ViT's patch grid is left")
    return side


def to_grid(x: torch.Tensor, side: int) -> torch.Tensor:
    """(N, side*side, C) tokens (row-major) -> (N, C, side, side) feature map."""
    N, T, C = x.shape
    return x.transpose(1, 2).reshape(N, C, side, side)


def from_grid(x: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) feature map -> (N, h*w, C) tokens (row-major)."""
    return x.flatten(2).transpose(1, 2)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of each position of an (N, C, H, W) map (ConvNeXt/timm style)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
