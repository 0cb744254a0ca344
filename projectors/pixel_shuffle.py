"""Pixel-shuffle input projector (Idefics3, SmolVLM): fold each s x s block of the square token grid into one token,
then one linear map.

A ViT's T patch tokens form a row-major sqrt(T) x sqrt(T) grid. Each non-overlapping ``scale_factor`` x
``scale_factor`` block (s = ``scale_factor``) becomes one token whose channels are the block's tokens concatenated
row by row, left to right (``[r0c0 | r0c1 | ... | r1c0 | ...]``, in_dim * s^2 channels); the blocks keep the grid's
row-major order. One linear layer (no bias in Idefics3's connector) maps that to the LLM width, so the LLM sees T / s^2
tokens at no loss of information. This is Idefics3's ``Idefics3Connector`` (``pixel_shuffle`` then
``modality_projection``); MiniGPT-v2's 1D merge of consecutive tokens is `token_merge`.

Token count: ``in_tokens / scale_factor^2``; the tokens must form a square grid whose side ``scale_factor`` divides,
else the error names both numbers.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from mmhub.interfaces import BuildContext, ComponentConfig, Projector, ProjectorConfig, TextContext


class PixelShuffleConfig(ProjectorConfig):
    """Settings of `PixelShuffleProjector`: the block side (Idefics3: 2, SmolVLM: 3 or 4), the linear's bias."""

    scale_factor: int = Field(2, ge=1)
    bias: bool = False


def grid_side(in_tokens: int, scale_factor: int, who: str = "pixel_shuffle") -> int:
    """The side of the square token grid; raises naming the numbers when `in_tokens` is not a square whose side
    `scale_factor` divides."""
    side = math.isqrt(in_tokens)
    if in_tokens < 1 or side * side != in_tokens:
        raise ValueError(f"{who}: {in_tokens} input tokens are not a square grid (the tower must give side x side "
                         "patch tokens, with no CLS token: set drop_cls: true on the encoder)")
    if side % scale_factor:
        fits = [s for s in range(1, side + 1) if side % s == 0]
        raise ValueError(f"{who}: the {side} x {side} token grid does not split into {scale_factor} x {scale_factor} "
                         f"blocks; fix: set scale_factor to a divisor of {side} ({', '.join(map(str, fits))}) or an "
                         f"image size whose patch grid it divides")
    return side


class PixelShuffleProjector(Projector):
    """Each scale_factor x scale_factor block of the token grid folded into the channels, then one linear (Idefics3)."""

    name: ClassVar[str] = "pixel_shuffle"
    Config: ClassVar[type[ComponentConfig]] = PixelShuffleConfig
    tokens_doc: ClassVar[str] = "in_tokens / scale_factor^2 (a square grid whose side scale_factor divides)"
    example_settings: ClassVar[dict[str, Any]] = {"scale_factor": 2}

    @classmethod
    def num_tokens(cls, config: PixelShuffleConfig, in_tokens: int) -> int:
        side = grid_side(in_tokens, config.scale_factor, cls.name)
        return (side // config.scale_factor) ** 2

    def __init__(self, config: PixelShuffleConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        assert config.in_dim is not None and config.out_dim is not None, "in_dim/out_dim are filled in by validation"
        self.proj = nn.Linear(config.in_dim * config.scale_factor**2, config.out_dim, bias=config.bias)

    def forward(self, features: torch.Tensor, text: TextContext | None = None) -> torch.Tensor:
        N, T, C = features.shape
        s = self.config.scale_factor  # type: ignore[attr-defined]
        g = grid_side(T, s, self.name) // s  # blocks per side
        # (N, block row, row in block, block col, col in block, C) -> (N, block row, block col, row, col, C)
        blocks = features.reshape(N, g, s, g, s, C).permute(0, 1, 3, 2, 4, 5)
        return self.proj(blocks.reshape(N, g * g, s * s * C))  # (N, T, in) -> (N, T / s^2, out)
