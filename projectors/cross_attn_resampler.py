"""Cross-attention resampler input projector: one cross-attention layer from learned queries to a 2D token grid.

Qwen-VL's position-aware vision-language adapter (``Resampler`` in its ``visual.py``):
``num_queries`` learned queries (256 in Qwen-VL, a 16x16 grid) attend once to the encoder's
patch tokens. Both sides carry fixed 2D sin-cos absolute position embeddings, added to the
queries and to the keys (not the values): the queries' on their own ``sqrt(num_queries)``
grid, the keys' on the input's ``sqrt(T)`` grid, measured in query-grid units so a key and
a query at the same place in the image share an embedding (Qwen-VL gets this by bicubic
interpolation of the query table; here the sin-cos is evaluated at the fractional
positions directly, so any square input size works). LayerNorms on queries, keys and
output, then a linear to the LLM width. Used by Qwen-VL / Qwen-VL-Chat and Monkey (which
runs Qwen-VL's resampler on each crop).

With ``layout: qwen_vl`` the projector is Qwen-VL's ``Resampler`` plus its ``ln_post`` and ``proj``
exactly: the position table ``pos_embed`` is MAE's ``get_2d_sincos_pos_embed`` (first half of the channels the
column, second half the row, integer cell coordinates) stored with the weights, the keys take it resized
bicubically to their grid (``get_abs_pos``), LayerNorm eps is 1e-6 and the output linear has no bias (their
``x @ proj``).

The input token count must be a perfect square (a ViT's patch grid without CLS), and so
must ``num_queries``. Output tokens: ``num_queries``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from mmhub.attention import MultiheadAttention
from mmhub.encoders.qwen_vl_vit import resize_positions
from mmhub.interfaces import BuildContext, ComponentConfig, Projector, ProjectorConfig, TextContext
from mmhub.projectors.grid import grid_side


def sincos_2d(side: int, width: int, scale: float = 1.0, device: torch.device | None = None) -> torch.Tensor:
    """(side*side, width) 2D sin-cos embeddings of a row-major grid; cell i sits at ``(i + 0.5) * scale - 0.5``.

    Half the channels encode the row, half the column, each as sin/cos pairs over
    frequencies 1/10000^(k/(width/4)) (MAE's table). ``width`` must be divisible by 4.
    """
    quarter = width // 4
    coords = (torch.arange(side, dtype=torch.float64, device=device) + 0.5) * scale - 0.5
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64, device=device) / max(quarter, 1))
    axis = coords[:, None] * omega  # (side, quarter)
    axis = torch.cat([axis.sin(), axis.cos()], 1)  # (side, width/2)
    rows = axis[:, None, :].expand(side, side, -1)
    cols = axis[None, :, :].expand(side, side, -1)
    return torch.cat([rows, cols], -1).reshape(side * side, width).to(torch.float32)


def mae_sincos_2d(side: int, width: int) -> torch.Tensor:
    """(side*side, width) MAE's ``get_2d_sincos_pos_embed`` (Qwen-VL's resampler table): cell (row i, column j) gets
    the 1D sin-cos code of j in the first half of the channels and of i in the second, each half sin then cos over
    frequencies 1/10000^(k/(width/4))."""
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(side, dtype=torch.float64)[:, None] * omega  # (side, quarter)
    axis = torch.cat([coords.sin(), coords.cos()], 1)  # (side, width/2)
    cols = axis[None, :, :].expand(side, side, -1)
    rows = axis[:, None, :].expand(side, side, -1)
    return torch.cat([cols, rows], -1).reshape(side * side, width).to(torch.float32)


class CrossAttnResamplerConfig(ProjectorConfig):
    """Settings of `CrossAttnResamplerProjector`; ``width`` defaults to ``out_dim``, ``heads`` to width // 128."""

    num_queries: int = Field(256, ge=1)
    width: int | None = Field(None, ge=4)
    heads: int | None = Field(None, ge=1)
    layout: Literal["mmhub", "qwen_vl"] = Field("mmhub", description="qwen_vl: Qwen-VL's exact resampler (stored "
                                                "MAE sin-cos table resized bicubically for the keys, eps 1e-6, "
                                                "bias-free output linear)")

    @field_validator("num_queries")
    @classmethod
    def _square(cls, v: int) -> int:
        side = math.isqrt(v)
        if side * side != v:
            raise ValueError(f"num_queries {v} is not a perfect square (the queries form a grid); fix: use "
                             f"{side * side or 1} or {(side + 1) ** 2}")
        return v

    @field_validator("width")
    @classmethod
    def _by_four(cls, v: int | None) -> int | None:
        if v is not None and v % 4:
            raise ValueError(f"width {v} is not divisible by 4 (2D sin-cos embeddings split it into 4 parts); "
                             f"fix: use {v - v % 4 or 4} or {v + 4 - v % 4}")
        return v


class CrossAttnResamplerProjector(Projector):
    """Qwen-VL resampler: learned queries cross-attend once to the token grid, 2D sin-cos positions on both sides."""

    name: ClassVar[str] = "cross_attn_resampler"
    Config: ClassVar[type[ComponentConfig]] = CrossAttnResamplerConfig
    tokens_doc: ClassVar[str] = "num_queries (256 by default, a square); the input token count must be a square"
    example_settings: ClassVar[dict[str, Any]] = {"num_queries": 9, "width": 16, "heads": 2}

    @classmethod
    def num_tokens(cls, config: CrossAttnResamplerConfig, in_tokens: int) -> int:
        grid_side(in_tokens, cls.name)
        return config.num_queries

    def __init__(self, config: CrossAttnResamplerConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        assert config.in_dim is not None and config.out_dim is not None, "in_dim/out_dim are filled in by validation"
        width = config.width or config.out_dim
        if width % 4:
            raise ValueError(f"{self.name}: width {width} (the LLM width when `width` is unset) is not divisible by 4, "
                             "which the 2D sin-cos embeddings need; fix: set width to a multiple of 4")
        heads = config.heads or max(1, width // 128)
        self.query_side = math.isqrt(config.num_queries)
        self.query = nn.Parameter(torch.empty(config.num_queries, width))
        nn.init.trunc_normal_(self.query, std=0.02)
        qwen = config.layout == "qwen_vl"
        if qwen:  # stored with the weights, as Qwen-VL's checkpoints carry it
            self.register_buffer("pos_embed", mae_sincos_2d(self.query_side, width))
        else:
            self.register_buffer("query_pos", sincos_2d(self.query_side, width), persistent=False)
        self.kv_proj = nn.Linear(config.in_dim, width, bias=False) if config.in_dim != width else nn.Identity()
        eps = 1e-6 if qwen else 1e-5
        self.ln_q = nn.LayerNorm(width, eps=eps)
        self.ln_kv = nn.LayerNorm(width, eps=eps)
        self.attn = MultiheadAttention(width, heads, backend=ctx.attention)
        self.ln_post = nn.LayerNorm(width, eps=eps)
        self.proj = nn.Linear(width, config.out_dim, bias=not qwen)

    def forward(self, features: torch.Tensor, text: TextContext | None = None) -> torch.Tensor:
        side = grid_side(features.shape[1], self.name)
        x = self.ln_kv(self.kv_proj(features))  # (N, T, width)
        if self.config.layout == "qwen_vl":
            key_pos = resize_positions(self.pos_embed, features.shape[1]).to(x.dtype)
            query_pos = self.pos_embed
        else:
            key_pos = sincos_2d(side, x.shape[-1], scale=self.query_side / side, device=x.device).to(x.dtype)
            query_pos = self.query_pos
        q = (self.ln_q(self.query) + query_pos.to(x.dtype)).expand(x.shape[0], -1, -1)
        out = self.attn(q, context=x + key_pos, value=x)
        return self.proj(self.ln_post(out))  # (N, T, in) -> (N, num_queries, out)
