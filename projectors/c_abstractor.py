"""C-Abstractor input projector: convolutions on the token grid, pooled to a fixed square of tokens.

Honeybee's locality-enhanced C-Abstractor, built as Honeybee builds it (``CAbstractor.build_net`` in
kakaobrain/honeybee): the encoder's patch tokens are laid out as their square grid; a timm RegNet stage
(`timm.models.regnet.RegStage`, stride 1, SiLU, timm's ``LayerNorm2d``, which its conv blocks build as
``LayerNormAct2d``) of ``depth`` Bottleneck blocks (1x1 ->
depthwise 3x3 -> squeeze-excitation (ratio 0.25) -> 1x1, with a residual; a 1x1 projection shortcut when the width
changes) mixes each token with its neighbours, an adaptive average pool brings the grid to ``sqrt(num_queries)``
per side, a second stage of ``depth`` blocks refines it, and an MLP (``mlp_depth`` linears with SiLU) maps each
token to the LLM width. Each output token summarises one region of the image through the convolutions (only the
squeeze-excitation's channel gates read the whole grid), so spatial layout survives, unlike a resampler's
attention. Parameter names follow Honeybee's (``net.0`` / ``net.2`` stages, ``readout``). Used by Honeybee
(C-Abstractor, 144 or 256 queries); Honeybee's D-Abstractor and LLaVA-style conv pools are close relatives.

``input_tokens`` adds Honeybee's learned position embedding of the input tokens (then
exactly that many tokens are accepted). The input token count must be a perfect square;
``num_queries`` must be one too. A grid smaller than the pooled size is repeated by the
adaptive pool, so the output is always ``num_queries`` tokens. Honeybee's optional prenorm and end-of-sequence
tokens (``num_eos_tokens``) are not offered.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from pydantic import Field, field_validator
from timm.layers import LayerNorm2d
from timm.models.regnet import RegStage
from torch import nn

from mmhub.interfaces import BuildContext, ComponentConfig, Projector, ProjectorConfig, TextContext
from mmhub.projectors.grid import from_grid, grid_side, to_grid


def reg_stage(depth: int, in_ch: int, out_ch: int) -> RegStage:
    """A timm RegNet stage as Honeybee configures it: `depth` Bottleneck blocks (bottle ratio 1, group size 1 so the
    3x3 is depthwise, SE ratio 0.25), stride 1, dilation 1, SiLU, timm's LayerNorm2d."""
    return RegStage(depth, in_ch, out_ch, stride=1, dilation=1, act_layer=nn.SiLU, norm_layer=LayerNorm2d)


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
    """Honeybee C-Abstractor: a RegNet stage on the token grid, adaptive pool to num_queries, a RegNet stage, MLP."""

    name: ClassVar[str] = "c_abstractor"
    Config: ClassVar[type[ComponentConfig]] = CAbstractorConfig
    library: ClassVar[str] = "timm"
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
        side = math.isqrt(config.num_queries)
        self.net = nn.Sequential(reg_stage(config.depth, config.in_dim, config.width),
                                 nn.AdaptiveAvgPool2d((side, side)),
                                 reg_stage(config.depth, config.width, config.width))
        layers: list[nn.Module] = [nn.Linear(config.width, config.out_dim)]
        for _ in range(config.mlp_depth - 1):
            layers += [nn.SiLU(), nn.Linear(config.out_dim, config.out_dim)]
        self.readout = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor, text: TextContext | None = None) -> torch.Tensor:
        self.num_tokens(self.config, features.shape[1])  # type: ignore[arg-type]  # raises on unusable counts
        x = features if self.pos is None else features + self.pos
        x = to_grid(x, math.isqrt(features.shape[1]))  # (N, in, s, s)
        x = self.net(x)  # (N, width, q, q)
        return self.readout(from_grid(x))  # (N, T, in) -> (N, num_queries, out)
