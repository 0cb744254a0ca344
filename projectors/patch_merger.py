"""Patch-merger projector (Qwen2-VL, Qwen2.5-VL): each merge x merge block of neighbouring patches -> one LLM token.

The features arrive with every block's ``merge**2`` patches next to each other (the order Qwen2-VL's vision tower
and mmhub's ``qwen2_vl_vision`` encoder emit them in). Each patch is normalised (LayerNorm, or RMSNorm for
Qwen2.5-VL), the block's patches are concatenated into one ``merge**2 * in_dim`` vector and an MLP
(Linear -> GELU -> Linear) maps it to the backbone's width: T patch tokens become T / merge**2 tokens, and an
image's (t, h, w) patch grid becomes (t, h / merge, w / merge) (`grid_out`).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from mmhub.interfaces import BuildContext, ComponentConfig, Projector, ProjectorConfig, TextContext


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale, computed in float32 (Qwen2.5-VL's merger norm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class PatchMergerConfig(ProjectorConfig):
    """Settings of `PatchMergerProjector`."""

    merge: int = Field(2, ge=1, description="side of the square block of patches merged into one token")
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    eps: float = Field(1e-6, gt=0)


class PatchMergerProjector(Projector):
    """Norm, then each merge x merge block of patch features concatenated -> Linear -> GELU -> Linear."""

    name: ClassVar[str] = "patch_merger"
    Config: ClassVar[type[ComponentConfig]] = PatchMergerConfig
    tokens_doc: ClassVar[str] = "its input's tokens / merge^2 (one per merge x merge block of patches)"
    example_settings: ClassVar[dict[str, Any]] = {"merge": 2}

    @classmethod
    def num_tokens(cls, config: ComponentConfig, in_tokens: int) -> int:
        return in_tokens // (config.merge ** 2)

    def __init__(self, config: PatchMergerConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        block = config.in_dim * config.merge ** 2
        self.ln_q = nn.LayerNorm(config.in_dim, eps=config.eps) if config.norm == "layernorm" \
            else RMSNorm(config.in_dim, config.eps)
        self.mlp = nn.Sequential(nn.Linear(block, block), nn.GELU(), nn.Linear(block, config.out_dim))

    def grid_out(self, grid: tuple[int, int, int]) -> tuple[int, int, int]:
        """An item's (t, h, w) patch grid -> the (t, h, w) grid of the tokens this projector emits for it."""
        t, h, w = grid
        m = self.config.merge
        if h % m or w % m:
            raise ValueError(f"patch grid {h}x{w} is not in whole {m}x{m} blocks; the patch_merger needs the encoder "
                             f"to emit {m}x{m}-block-aligned grids")
        return t, h // m, w // m

    def forward(self, features: torch.Tensor, text: TextContext | None = None) -> torch.Tensor:
        n, t, d = features.shape  # (N, T, in_dim)
        group = self.config.merge ** 2
        if t % group:
            raise ValueError(f"patch_merger got {t} tokens per item, not a multiple of merge^2 = {group}; the encoder "
                             f"must emit whole {self.config.merge}x{self.config.merge} blocks")
        return self.mlp(self.ln_q(features).reshape(n, t // group, group * d))  # (N, T / merge^2, out_dim)
