"""mPLUG-Owl's visual abstractor (``MplugOwlVisualAbstractorModel`` in X-PLUG/mPLUG-Owl's ``modeling_mplug_owl.py``)
as an input projector, with the authors' parameter names so a checkpoint's ``abstractor.*`` and ``query_tokens`` load
as they are.

``num_queries`` learned queries (``query_tokens``) pass ``layers`` blocks, each only a cross-attention (no query
self-attention):

* ``h = norm1(x)``; the keys and values are computed from ``[h; normk(features)]`` (the queries see themselves and the
  image tokens), the queries from ``h``; softmax(q k^T / sqrt(d)) v over ``heads`` heads;
* ``x = h + out_proj(attention)`` (the residual is the *normed* queries, as the authors' code has it), then
  ``x = x + mlp(norm2(x))`` with the SwiGLU ``w2(ffn_ln(silu(w1 x) * w3 x))``;

then ``visual_fc`` to the LLM width and the learned ``vit_eos`` token appended: ``num_queries + 1`` output tokens.
LayerNorm eps: 1e-5 for ``norm1``/``normk``/``norm2``, ``norm_eps`` (1e-6) for ``ffn_ln``. The features must have the
abstractor's width (its ``normk`` and the concatenation with the queries need it).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field, model_validator
from torch import nn

from mmhub.attention import attention, merge_heads, split_heads
from mmhub.interfaces import BuildContext, ComponentConfig, Projector, ProjectorConfig, TextContext


class VisualAbstractorConfig(ProjectorConfig):
    """Settings of `VisualAbstractorProjector`; defaults are mPLUG-Owl's (64 queries, 6 blocks, width 1024)."""

    num_queries: int = Field(64, ge=1)
    layers: int = Field(6, ge=1)
    width: int | None = Field(None, ge=1, description="the abstractor's width: the features' (mPLUG-Owl: 1024)")
    heads: int = Field(16, ge=1)
    intermediate_size: int = Field(2816, ge=1, description="the SwiGLU hidden width")
    norm_eps: float = Field(1e-6, gt=0, description="epsilon of the SwiGLU's ffn_ln")

    @model_validator(mode="after")
    def _heads(self) -> "VisualAbstractorConfig":
        width = self.width or self.in_dim
        if width is not None and width % self.heads:
            raise ValueError(f"width {width} is not divisible by heads {self.heads}")
        return self


class AbstractorAttention(nn.Module):
    """q from the queries; k, v from [queries; image tokens] (``query``/``key``/``value``)."""

    def __init__(self, width: int, heads: int, backend: str):
        super().__init__()
        self.heads, self.backend = heads, backend
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(f(t), self.heads) for f, t in
                   ((self.query, queries), (self.key, context), (self.value, context)))
        return merge_heads(attention(q, k, v, None, self.backend, 0.0))


class SwiGLU(nn.Module):
    def __init__(self, width: int, hidden: int, eps: float):
        super().__init__()
        self.w1 = nn.Linear(width, hidden)
        self.w2 = nn.Linear(hidden, width)
        self.w3 = nn.Linear(width, hidden)
        self.ffn_ln = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.ffn_ln(nn.functional.silu(self.w1(x)) * self.w3(x)))


class CrossOutput(nn.Module):
    def __init__(self, width: int, hidden: int, eps: float):
        super().__init__()
        self.out_proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = SwiGLU(width, hidden, eps)

    def forward(self, attended: torch.Tensor, normed_queries: torch.Tensor) -> torch.Tensor:
        x = normed_queries + self.out_proj(attended)
        return x + self.mlp(self.norm2(x))


class CrossAttentionBlock(nn.Module):
    """One abstractor block (the authors' ``crossattention``: ``attention``, ``output``, ``norm1``, ``normk``)."""

    def __init__(self, config: VisualAbstractorConfig, width: int, backend: str):
        super().__init__()
        self.attention = AbstractorAttention(width, config.heads, backend)
        self.output = CrossOutput(width, config.intermediate_size, config.norm_eps)
        self.norm1 = nn.LayerNorm(width)
        self.normk = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        return self.output(self.attention(h, torch.cat([h, self.normk(features)], 1)), h)


class AbstractorLayer(nn.Module):
    def __init__(self, config: VisualAbstractorConfig, width: int, backend: str):
        super().__init__()
        self.crossattention = CrossAttentionBlock(config, width, backend)


class AbstractorEncoder(nn.Module):
    def __init__(self, config: VisualAbstractorConfig, width: int, backend: str):
        super().__init__()
        self.layers = nn.ModuleList(AbstractorLayer(config, width, backend) for _ in range(config.layers))


class VisualAbstractorProjector(Projector):
    """mPLUG-Owl's visual abstractor: learned queries through cross-attention-only blocks, visual_fc, an eos token."""

    name: ClassVar[str] = "visual_abstractor"
    Config: ClassVar[type[ComponentConfig]] = VisualAbstractorConfig
    tokens_doc: ClassVar[str] = "num_queries + 1 (the vit_eos token), whatever the input token count"
    example_settings: ClassVar[dict[str, Any]] = {"num_queries": 4, "layers": 2, "heads": 2, "intermediate_size": 24}

    @classmethod
    def num_tokens(cls, config: VisualAbstractorConfig, in_tokens: int) -> int:
        return config.num_queries + 1

    def __init__(self, config: VisualAbstractorConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        assert config.in_dim is not None and config.out_dim is not None, "in_dim/out_dim are filled in by validation"
        width = config.width or config.in_dim
        if config.in_dim != width:
            raise ValueError(f"{self.name}: the features are {config.in_dim} wide but the abstractor is {width} "
                             f"wide; its keys read [queries; LayerNorm(features)], so the encoder's width must be the "
                             f"abstractor's: set width: {config.in_dim} (or leave it unset)")
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_queries, width))
        nn.init.normal_(self.query_tokens, std=0.02)
        self.encoder = AbstractorEncoder(config, width, ctx.attention)
        self.visual_fc = nn.Linear(width, config.out_dim)
        self.vit_eos = nn.Parameter(torch.randn(1, 1, config.out_dim) * 0.02)

    def forward(self, features: torch.Tensor, text: TextContext | None = None) -> torch.Tensor:
        x = self.query_tokens.to(features.dtype).expand(features.shape[0], -1, -1)
        for layer in self.encoder.layers:
            x = layer.crossattention(x, features)
        x = self.visual_fc(x)  # (N, Q, out)
        return torch.cat([x, self.vit_eos.to(x.dtype).expand(x.shape[0], -1, -1)], 1)  # (N, Q + 1, out)
