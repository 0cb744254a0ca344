"""GLU input projector with boundary tokens: CogVLM's ``linear_proj`` (``GLU`` in the authors' ``visual.py``).

Per token: ``linear_proj`` (no bias) to the LLM width, LayerNorm ``norm1``, GELU, then a SwiGLU feed-forward,
``dense_4h_to_h(silu(gate_proj(x)) * dense_h_to_4h(x))`` (no biases). With ``boundary_tokens`` (CogVLM) a learned
``boi`` embedding goes in front of each item's tokens and a learned ``eoi`` behind them, so an item of T tokens
becomes T + 2. The parameter names are the authors', so ``model.vision.linear_proj.`` / ``boi`` / ``eoi`` load as
they are.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from mmhub.interfaces import BuildContext, ComponentConfig, Projector, ProjectorConfig, TextContext


class GLUConfig(ProjectorConfig):
    """Settings of `GLUProjector`; ``intermediate_size`` is the SwiGLU width (CogVLM: the LLM's, 11008)."""

    intermediate_size: int | None = Field(None, ge=1, description="SwiGLU hidden width (default 4 * out_dim)")
    boundary_tokens: bool = Field(True, description="learned boi/eoi embeddings around each item's tokens")


class GLU(nn.Module):
    """linear -> LayerNorm -> GELU -> SwiGLU feed-forward, all linears bias-free."""

    def __init__(self, in_dim: int, width: int, intermediate: int):
        super().__init__()
        self.linear_proj = nn.Linear(in_dim, width, bias=False)
        self.norm1 = nn.LayerNorm(width)
        self.dense_h_to_4h = nn.Linear(width, intermediate, bias=False)
        self.gate_proj = nn.Linear(width, intermediate, bias=False)
        self.dense_4h_to_h = nn.Linear(intermediate, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.gelu(self.norm1(self.linear_proj(x)))
        return self.dense_4h_to_h(nn.functional.silu(self.gate_proj(x)) * self.dense_h_to_4h(x))


class GLUProjector(Projector):
    """CogVLM's GLU projector; with boundary tokens each item gains a learned first (boi) and last (eoi) token."""

    name: ClassVar[str] = "glu"
    Config: ClassVar[type[ComponentConfig]] = GLUConfig
    tokens_doc: ClassVar[str] = "input tokens + 2 with boundary_tokens (boi, eoi), else unchanged"
    example_settings: ClassVar[dict[str, Any]] = {"intermediate_size": 64}

    @classmethod
    def num_tokens(cls, config: GLUConfig, in_tokens: int) -> int:
        return in_tokens + (2 if config.boundary_tokens else 0)

    def __init__(self, config: GLUConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        assert config.in_dim is not None and config.out_dim is not None, "in_dim/out_dim are filled in by validation"
        self.linear_proj = GLU(config.in_dim, config.out_dim, config.intermediate_size or 4 * config.out_dim)
        if config.boundary_tokens:
            self.boi = nn.Parameter(torch.zeros(1, 1, config.out_dim))
            self.eoi = nn.Parameter(torch.zeros(1, 1, config.out_dim))

    def grid_out(self, grid: tuple[int, int, int]) -> tuple[int, int, int] | None:
        return grid if not self.config.boundary_tokens else None

    def forward(self, features: torch.Tensor, text: TextContext | None = None) -> torch.Tensor:
        x = self.linear_proj(features)  # (N, T, out)
        if not self.config.boundary_tokens:
            return x
        n = x.shape[0]
        return torch.cat([self.boi.expand(n, -1, -1).to(x.dtype), x, self.eoi.expand(n, -1, -1).to(x.dtype)], 1)
