"""Perceiver-resampler input projector: a fixed number of learned latents that summarise any number of feature tokens.

Flamingo's Perceiver Resampler, used by Flamingo, OpenFlamingo, Otter, IDEFICS and BLIP-3 (xGen-MM):
``num_latents`` learned latent vectors go through ``depth`` layers; in each, the latents
attend to the concatenation of the (normalised) input features *and the latents
themselves* (Flamingo's trick: one attention does both cross- and self-attention), then
an FFN, both with residuals. A final LayerNorm and a linear map to the LLM width. The
features are first mapped to ``width`` by a linear (Flamingo works at the vision width
directly; ``width`` defaults to ``in_dim``, where this linear is still kept so every
setting has the same parameters).

``max_input_tokens`` adds a learned embedding per input position (Flamingo's time
embeddings, which tell frames apart; here per token), so the input may then have at most
that many tokens. The output is always ``num_latents`` tokens.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from mmhub.attention import MultiheadAttention
from mmhub.interfaces import BuildContext, ComponentConfig, Projector, ProjectorConfig, TextContext


class PerceiverConfig(ProjectorConfig):
    """Settings of `PerceiverProjector`; width defaults to ``in_dim``; OpenFlamingo: depth 6, 64 latents, 8 heads."""

    num_latents: int = Field(64, ge=1)
    depth: int = Field(6, ge=1)
    width: int | None = Field(None, ge=1)
    heads: int = Field(8, ge=1)
    ff_mult: int = Field(4, ge=1)
    max_input_tokens: int | None = Field(None, ge=1)


class PerceiverLayer(nn.Module):
    """Latents attend to [features; latents], then an FFN (pre-LN, residuals)."""

    def __init__(self, width: int, heads: int, ff_mult: int, backend: str):
        super().__init__()
        self.ln_media = nn.LayerNorm(width)
        self.ln_latents = nn.LayerNorm(width)
        self.attn = MultiheadAttention(width, heads, backend=backend, bias=False)
        self.ffn = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width * ff_mult, bias=False), nn.GELU(),
                                 nn.Linear(width * ff_mult, width, bias=False))

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        lat = self.ln_latents(latents)
        latents = latents + self.attn(lat, torch.cat([self.ln_media(x), lat], 1))
        return latents + self.ffn(latents)


class PerceiverProjector(Projector):
    """Flamingo perceiver resampler: learned latents attend to [features; latents] for `depth` layers."""

    name: ClassVar[str] = "perceiver"
    Config: ClassVar[type[ComponentConfig]] = PerceiverConfig
    tokens_doc: ClassVar[str] = "num_latents (64 by default), whatever the input token count"
    example_settings: ClassVar[dict[str, Any]] = {"num_latents": 6, "depth": 2, "width": 16, "heads": 2,
                                                  "ff_mult": 2, "max_input_tokens": 32}

    @classmethod
    def num_tokens(cls, config: PerceiverConfig, in_tokens: int) -> int:
        if in_tokens < 1:
            raise ValueError(f"{cls.name} needs at least 1 input token, got {in_tokens}; "
                             "fix: check the encoder's token count")
        if config.max_input_tokens is not None and in_tokens > config.max_input_tokens:
            raise ValueError(f"{cls.name} has position embeddings for max_input_tokens={config.max_input_tokens} "
                             "tokens "
                             f"but gets {in_tokens}; fix: set max_input_tokens: {in_tokens} (or more) or leave it out")
        return config.num_latents

    def __init__(self, config: PerceiverConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        assert config.in_dim is not None and config.out_dim is not None, "in_dim/out_dim are filled in by validation"
        width = config.width or config.in_dim
        self.proj_in = nn.Linear(config.in_dim, width)
        self.pos = nn.Parameter(torch.zeros(config.max_input_tokens, width)) if config.max_input_tokens else None
        if self.pos is not None:
            nn.init.trunc_normal_(self.pos, std=0.02)
        self.latents = nn.Parameter(torch.randn(config.num_latents, width) * 0.02)
        self.layers = nn.ModuleList(PerceiverLayer(width, config.heads, config.ff_mult, ctx.attention)
                                    for _ in range(config.depth))
        self.norm = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, config.out_dim)

    def forward(self, features: torch.Tensor, text: TextContext | None = None) -> torch.Tensor:
        self.num_tokens(self.config, features.shape[1])  # type: ignore[arg-type]  # raises on too many tokens
        x = self.proj_in(features)
        if self.pos is not None:
            x = x + self.pos[: x.shape[1]]
        latents = self.latents.to(x.dtype).expand(x.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(x, latents)
        return self.proj_out(self.norm(latents))  # (N, T, in) -> (N, num_latents, out)
