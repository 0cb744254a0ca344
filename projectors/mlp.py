"""MLP input projector (LLaVA-1.5's 2-layer GELU ``mlp2x_gelu``, CoDi-2, CogVLM): depth and activation are settings."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from mmhub.interfaces import BuildContext, ComponentConfig, Projector, ProjectorConfig, TextContext

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}


def mlp_stack(in_dim: int, hidden: int, out_dim: int, depth: int, activation: str) -> nn.Sequential:
    """`depth` linear layers in_dim -> hidden -> ... -> out_dim with `activation` between them."""
    widths = [in_dim] + [hidden] * (depth - 1) + [out_dim]
    layers: list[nn.Module] = []
    for i in range(depth):
        if i:
            layers.append(ACTIVATIONS[activation]())
        layers.append(nn.Linear(widths[i], widths[i + 1]))
    return nn.Sequential(*layers)


class MLPConfig(ProjectorConfig):
    """Settings of `MLPProjector`; ``hidden_dim`` defaults to the output width, as in LLaVA-1.5."""

    depth: int = Field(2, ge=1)
    activation: Literal["gelu", "relu", "silu", "tanh"] = "gelu"
    hidden_dim: int | None = None
    newline: bool = Field(False, description="a learned row-end embedding (out_dim wide, `image_newline`) that an "
                          "AnyRes encoder puts after each row of its tile grid, as LLaVA-NeXT does")


class MLPProjector(Projector):
    """A stack of `depth` linear layers with an activation between them, token count unchanged."""

    name: ClassVar[str] = "mlp"
    Config: ClassVar[type[ComponentConfig]] = MLPConfig
    example_settings: ClassVar[dict[str, Any]] = {"depth": 2}

    def __init__(self, config: MLPConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        self.net = mlp_stack(config.in_dim, config.hidden_dim or config.out_dim, config.out_dim, config.depth,
                             config.activation)
        if config.newline:  # LLaVA-NeXT's initialisation: N(0, 1/out_dim)
            self.image_newline = nn.Parameter(torch.randn(config.out_dim) / config.out_dim ** 0.5)

    def forward(self, features: torch.Tensor, text: TextContext | None = None) -> torch.Tensor:
        return self.net(features)  # (N, T, in) -> (N, T, out)
