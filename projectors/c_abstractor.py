"""C-Abstractor input projector: convolutions on the token grid, pooled to a fixed square of tokens.

Honeybee's locality-preserving C-Abstractor: the encoder's patch tokens are laid out as
their square grid; ``depth`` ResNet-style residual bottleneck blocks (1x1 -> 3x3 -> 1x1
convolutions with channel LayerNorm and SiLU, as Honeybee's RegNet stages) mix each token
with its neighbours, an adaptive average pool brings the grid to ``sqrt(num_queries)`` per
side, ``depth`` more blocks refine it, and an MLP (``mlp_depth`` linears with SiLU) maps
each token to the LLM width. Unlike a resampler's attention, each output token summarises
one region of the image, so spatial layout survives. Used by Honeybee (C-Abstractor, 144
or 256 queries); Honeybee's D-Abstractor and LLaVA-style conv pools are close relatives.

``input_tokens`` adds Honeybee's learned position embedding of the input tokens (then
exactly that many tokens are accepted). The input token count must be a perfect square;
``num_queries`` must be one too. A grid smaller than the pooled size is repeated by the
adaptive pool, so the output is always ``num_queries`` tokens.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from pydantic import Field, field_validator
from torch import nn

from mmhub.interfaces import BuildContext, ComponentConfig, Projector, ProjectorConfig, TextContext
from mmhub.projectors.grid import LayerNorm2d, from_grid, grid_side, to_grid


class ResBlock(nn.Module):
    """Residual bottleneck: 1x1 -> 3x3 -> 1x1 convs with channel LayerNorm and SiLU; 1x1 shortcut when widths differ."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 1, bias=False), LayerNorm2d(out_ch), nn.SiLU(),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False), LayerNorm2d(out_ch), nn.SiLU(),
            nn.Conv2d(out_ch, out_ch, 1, bias=False), LayerNorm2d(out_ch))
        self.shortcut = (nn.Identity() if in_ch == out_ch
                         else nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False), LayerNorm2d(out_ch)))
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class CAbstractorConfig(ProjectorConfig):
    """Settings of `CAbstractorProjector`; defaults are Honeybee's (144 queries, depth 3, width 1024, 2-layer MLP)."""

    num_queries: int = Field(144, ge=1)
    width: int = Field(1024, ge=1)
    depth: int = Field(3, ge=1)
    mlp_depth: int = Field(2, ge=1)
    input_tokens: int | None = Field(None, ge=1)

    @field_validator("num_queries")
    @classmethod
    def _square(cls, v: int) -> int:
        side = math.isqrt(v)
        if side * side != v:
            raise ValueError(f"num_queries {v} is not a perfect square (the tokens are pooled to a square grid); "
                             f"fix: use {side * side or 1} or {(side + 1) ** 2}")
        return v


class CAbstractorProjector(Projector):
    """Honeybee C-Abstractor: residual conv blocks on the token grid, adaptive pool to num_queries, conv blocks, MLP."""

    name: ClassVar[str] = "c_abstractor"
    Config: ClassVar[type[ComponentConfig]] = CAbstractorConfig
    tokens_doc: ClassVar[str] = "num_queries (144 by default, a square); the input token count must be a square"
    example_settings: ClassVar[dict[str, Any]] = {"num_queries": 4, "width": 8, "depth": 1, "mlp_depth": 2}

    @classmethod
    def num_tokens(cls, config: CAbstractorConfig, in_tokens: int) -> int:
        grid_side(in_tokens, cls.name)
        if config.input_tokens is not None and in_tokens != config.input_tokens:
            raise ValueError(f"{cls.name} has position embeddings for input_tokens={config.input_tokens} tokens "
                             "but gets "
                             f"{in_tokens}; fix: set input_tokens: {in_tokens} or leave it out")
        return config.num_queries

    def __init__(self, config: CAbstractorConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        assert config.in_dim is not None and config.out_dim is not None, "in_dim/out_dim are filled in by validation"
        self.pos = nn.Parameter(torch.zeros(config.input_tokens, config.in_dim)) if config.input_tokens else None
        if self.pos is not None:
            nn.init.trunc_normal_(self.pos, std=0.02)
        widths = [config.in_dim] + [config.width] * config.depth
        self.stage1 = nn.Sequential(*(ResBlock(widths[i], widths[i + 1]) for i in range(config.depth)))
        self.pool = nn.AdaptiveAvgPool2d(math.isqrt(config.num_queries))
        self.stage2 = nn.Sequential(*(ResBlock(config.width, config.width) for _ in range(config.depth)))
        layers: list[nn.Module] = [nn.Linear(config.width, config.out_dim)]
        for _ in range(config.mlp_depth - 1):
            layers += [nn.SiLU(), nn.Linear(config.out_dim, config.out_dim)]
        self.readout = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor, text: TextContext | None = None) -> torch.Tensor:
        self.num_tokens(self.config, features.shape[1])  # type: ignore[arg-type]  # raises on unusable counts
        x = features if self.pos is None else features + self.pos
        x = to_grid(x, math.isqrt(features.shape[1]))  # (N, in, s, s)
        x = self.stage2(self.pool(self.stage1(x)))  # (N, width, q, q)
        return self.readout(from_grid(x))  # (N, T, in) -> (N, num_queries, out)
