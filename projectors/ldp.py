"""LDP input projector: MobileVLM's lightweight downsample projector (MLP, then depthwise convs quartering tokens).

MobileVLM's LDP: a 2-layer MLP (in_dim -> out_dim, GELU, out_dim -> out_dim) maps each
token to the LLM width; the tokens are laid out as their square grid and go through two
MobileNetV3 inverted-residual blocks without expansion: a depthwise 3x3 convolution
(stride 1, then stride 2), channel LayerNorm, Hardswish, squeeze-excitation (Hardsigmoid
gate) and a pointwise 1x1 convolution with LayerNorm; the stride-1 block is residual. The
stride-2 block halves each side, so the LLM sees a quarter of the tokens (CLIP ViT-L/14 at
336px: 24x24 = 576 -> 12x12 = 144) with positional structure kept by the convolutions.
Used by MobileVLM; MobileVLM V2's LDPv2 swaps the convolutions for a 2x2 average pool and a
positional-encoding conv.

Token count, exactly: the input must be a square grid ``s x s`` (``s = sqrt(in_tokens)``);
the stride-2 3x3 convolution with padding 1 gives ``floor((s - 1) / 2) + 1 = ceil(s / 2)``
per side, so the output is ``ceil(s / 2) ** 2`` tokens (16 -> 4, 64 -> 16, 576 -> 144, and
an odd 7x7 = 49 -> 4x4 = 16).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from mmhub.interfaces import BuildContext, ComponentConfig, Projector, ProjectorConfig, TextContext
from mmhub.projectors.grid import LayerNorm2d, from_grid, grid_side, to_grid


class SqueezeExcite(nn.Module):
    """Channel gate: global average -> 1x1 conv (channels/4) -> ReLU -> 1x1 conv -> Hardsigmoid, times the input."""

    def __init__(self, channels: int):
        super().__init__()
        squeeze = max(8, channels // 4)
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, squeeze, 1), nn.ReLU(),
                                  nn.Conv2d(squeeze, channels, 1), nn.Hardsigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class DepthwiseBlock(nn.Module):
    """MobileNetV3 inverted residual, no expansion: depthwise 3x3 (stride 1 or 2), LN, Hardswish, SE, pointwise, LN."""

    def __init__(self, channels: int, stride: int, se: bool = True):
        super().__init__()
        self.residual = stride == 1
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, stride=stride, padding=1, groups=channels, bias=False),
            LayerNorm2d(channels), nn.Hardswish(),
            SqueezeExcite(channels) if se else nn.Identity(),
            nn.Conv2d(channels, channels, 1, bias=False), LayerNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.residual else out


class LDPConfig(ProjectorConfig):
    """Settings of `LDPProjector`: whether the depthwise blocks use squeeze-excitation (MobileVLM: yes)."""

    se: bool = True


class LDPProjector(Projector):
    """MobileVLM lightweight downsample projector: MLP, then depthwise-conv blocks whose stride 2 quarters tokens."""

    name: ClassVar[str] = "ldp"
    Config: ClassVar[type[ComponentConfig]] = LDPConfig
    tokens_doc: ClassVar[str] = ("ceil(s/2)^2 for a square s x s input grid (576 -> 144); "
                                 "the input count must be a square")
    example_settings: ClassVar[dict[str, Any]] = {"se": True}

    @classmethod
    def num_tokens(cls, config: LDPConfig, in_tokens: int) -> int:
        side = grid_side(in_tokens, cls.name)
        return math.ceil(side / 2) ** 2

    def __init__(self, config: LDPConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        assert config.in_dim is not None and config.out_dim is not None, "in_dim/out_dim are filled in by validation"
        out = config.out_dim
        self.mlp = nn.Sequential(nn.Linear(config.in_dim, out), nn.GELU(), nn.Linear(out, out))
        self.blocks = nn.Sequential(DepthwiseBlock(out, 1, config.se), DepthwiseBlock(out, 2, config.se))

    def forward(self, features: torch.Tensor, text: TextContext | None = None) -> torch.Tensor:
        side = grid_side(features.shape[1], self.name)
        x = to_grid(self.mlp(features), side)  # (N, out, s, s)
        return from_grid(self.blocks(x))  # (N, T, in) -> (N, ceil(s/2)^2, out)
