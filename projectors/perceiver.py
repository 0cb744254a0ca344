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

``layout: idefics`` is IDEFICS's resampler (transformers ``IdeficsPerceiverResampler``) term
for term: no input or output linear (it works and outputs at the input width, so
``out_dim`` must equal ``in_dim``; IDEFICS's gated cross-attention maps that width to the
LM's in its keys and values), separate bias-free q/k/v/out projections of ``heads`` x
``head_dim`` (which need not equal the width), optional LayerNorms on each head's queries
and keys (``qk_norm``), the context and latents normalised by their own LayerNorms before
the joint attention, an FFN of LayerNorm -> bias-free linear (``ff_mult`` x width) -> ReLU ->
bias-free linear, and a final LayerNorm.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from mmhub.attention import MultiheadAttention, attention, merge_heads, split_heads
from mmhub.interfaces import BuildContext, ComponentConfig, Projector, ProjectorConfig, TextContext


class PerceiverConfig(ProjectorConfig):
    """Settings of `PerceiverProjector`; width defaults to ``in_dim``; OpenFlamingo: depth 6, 64 latents, 8 heads."""

    num_latents: int = Field(64, ge=1)
    depth: int = Field(6, ge=1)
    width: int | None = Field(None, ge=1)
    heads: int = Field(8, ge=1)
    ff_mult: int = Field(4, ge=1)
    max_input_tokens: int | None = Field(None, ge=1)
    layout: Literal["flamingo", "idefics"] = Field(
        "flamingo", description="flamingo: mmhub's resampler (input/output linears); idefics: IDEFICS's, exactly")
    head_dim: int | None = Field(None, ge=1, description="idefics layout: width of each head (default width/heads)")
    qk_norm: bool = Field(False, description="idefics layout: LayerNorm on each head's queries and keys "
                                             "(qk_layer_norms_perceiver)")


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


class IdeficsPerceiverLayer(nn.Module):
    """IDEFICS's resampler block: latents attend to [LN(context); LN(latents)] (own q/k/v/out, no biases, optional
    per-head q/k LayerNorms), then LayerNorm -> linear -> ReLU -> linear; both with residuals."""

    def __init__(self, width: int, heads: int, head_dim: int, ff_mult: int, qk_norm: bool, backend: str):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.backend = heads, backend
        self.ln_media = nn.LayerNorm(width)
        self.ln_latents = nn.LayerNorm(width)
        self.q = nn.Linear(width, inner, bias=False)
        self.k = nn.Linear(width, inner, bias=False)
        self.v = nn.Linear(width, inner, bias=False)
        self.out = nn.Linear(inner, width, bias=False)
        self.q_norm = nn.LayerNorm(head_dim) if qk_norm else None
        self.k_norm = nn.LayerNorm(head_dim) if qk_norm else None
        self.ffn = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width * ff_mult, bias=False), nn.ReLU(),
                                 nn.Linear(width * ff_mult, width, bias=False))

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        lat = self.ln_latents(latents)
        both = torch.cat([self.ln_media(x), lat], 1)
        q, k, v = split_heads(self.q(lat), self.heads), split_heads(self.k(both), self.heads), \
            split_heads(self.v(both), self.heads)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        latents = latents + self.out(merge_heads(attention(q, k, v, None, self.backend)))
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
        if config.layout == "idefics" and config.in_dim is not None:
            cls.idefics_head_dim(config)
        if config.layout == "flamingo" and (config.head_dim is not None or config.qk_norm):
            raise ValueError(f"{cls.name}: head_dim and qk_norm belong to layout idefics; fix: set layout: idefics "
                             "or leave them out")
        if config.max_input_tokens is not None and in_tokens > config.max_input_tokens:
            raise ValueError(f"{cls.name} has position embeddings for max_input_tokens={config.max_input_tokens} "
                             "tokens "
                             f"but gets {in_tokens}; fix: set max_input_tokens: {in_tokens} (or more) or leave it out")
        return config.num_latents

    def __init__(self, config: PerceiverConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        assert config.in_dim is not None and config.out_dim is not None, "in_dim/out_dim are filled in by validation"
        if config.layout == "idefics":
            self._init_idefics(config, ctx)
            return
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

    @staticmethod
    def idefics_head_dim(config: PerceiverConfig) -> int:
        """The idefics layout's head width; raises ValueError naming every setting the layout cannot take."""
        width = config.in_dim
        assert width is not None
        problems = []
        if config.out_dim is not None and config.out_dim != width:
            problems.append(f"out_dim {config.out_dim} != in_dim {width} (it has no output linear; fix: feed it "
                            f"to an injector taking {width}-wide context, e.g. gated_xattn layout idefics with "
                            f"kv_dim: {width})")
        if config.width not in (None, width):
            problems.append(f"width {config.width} != in_dim {width} (it has no input linear; fix: leave width out)")
        if config.max_input_tokens is not None:
            problems.append("max_input_tokens is set (IDEFICS's resampler has no position embeddings; fix: leave "
                            "it out)")
        if config.head_dim is None and width % config.heads:
            problems.append(f"width {width} is not divisible by heads {config.heads} (fix: set head_dim)")
        if problems:
            raise ValueError("perceiver layout idefics: " + "; ".join(problems))
        return config.head_dim or width // config.heads

    def _init_idefics(self, config: PerceiverConfig, ctx: BuildContext) -> None:
        width = config.in_dim
        assert width is not None
        head_dim = self.idefics_head_dim(config)
        self.pos = None
        self.latents = nn.Parameter(torch.randn(config.num_latents, width))
        self.layers = nn.ModuleList(IdeficsPerceiverLayer(width, config.heads, head_dim, config.ff_mult,
                                                          config.qk_norm, ctx.attention)
                                    for _ in range(config.depth))
        self.norm = nn.LayerNorm(width)

    def forward(self, features: torch.Tensor, text: TextContext | None = None) -> torch.Tensor:
        self.num_tokens(self.config, features.shape[1])  # type: ignore[arg-type]  # raises on too many tokens
        if self.config.layout == "idefics":
            latents = self.latents.to(features.dtype).expand(features.shape[0], -1, -1)
            for layer in self.layers:
                latents = layer(features, latents)
            return self.norm(latents)  # (N, T, in) -> (N, num_latents, in)
        x = self.proj_in(features)
        if self.pos is not None:
            x = x + self.pos[: x.shape[1]]
        latents = self.latents.to(x.dtype).expand(x.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(x, latents)
        return self.proj_out(self.norm(latents))  # (N, T, in) -> (N, num_latents, out)
