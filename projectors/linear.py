"""Linear input projector (LLaVA, PandaGPT, Shikra, VILA): one matrix from encoder width to LLM width."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from mmhub.interfaces import BuildContext, ComponentConfig, Projector, ProjectorConfig, TextContext


class LinearConfig(ProjectorConfig):
    """Settings of `LinearProjector` (widths are inferred from the neighbours)."""

    bias: bool = True
    newline: bool = Field(False, description="a learned row-end embedding (out_dim wide, `image_newline`) that an "
                          "AnyRes encoder puts after each row of its tile grid, as LLaVA-NeXT does")


class LinearProjector(Projector):
    """A single linear map, token count unchanged."""

    name: ClassVar[str] = "linear"
    Config: ClassVar[type[ComponentConfig]] = LinearConfig
    example_settings: ClassVar[dict[str, Any]] = {}

    def __init__(self, config: LinearConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        self.proj = nn.Linear(config.in_dim, config.out_dim, bias=config.bias)
        if config.newline:  # LLaVA-NeXT's initialisation: N(0, 1/out_dim)
            self.image_newline = nn.Parameter(torch.randn(config.out_dim) / config.out_dim ** 0.5)

    def forward(self, features: torch.Tensor, text: TextContext | None = None) -> torch.Tensor:
        return self.proj(features)  # (N, T, in) -> (N, T, out)
