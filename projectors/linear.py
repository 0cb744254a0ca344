"""Linear input projector (LLaVA, PandaGPT, Shikra, VILA): one matrix from encoder width to LLM width."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from mmhub.interfaces import BuildContext, ComponentConfig, Projector, ProjectorConfig, TextContext


class LinearConfig(ProjectorConfig):
    """Settings of `LinearProjector` (widths are inferred from the neighbours)."""

    bias: bool = True


class LinearProjector(Projector):
    """A single linear map, token count unchanged."""

    name: ClassVar[str] = "linear"
    Config: ClassVar[type[ComponentConfig]] = LinearConfig
    example_settings: ClassVar[dict[str, Any]] = {}

    def __init__(self, config: LinearConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        self.proj = nn.Linear(config.in_dim, config.out_dim, bias=config.bias)

    def forward(self, features: torch.Tensor, text: TextContext | None = None) -> torch.Tensor:
        return self.proj(features)  # (N, T, in) -> (N, T, out)
