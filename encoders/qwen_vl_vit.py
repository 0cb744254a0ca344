"""Qwen-VL's vision transformer (``VisionTransformer`` in the authors' ``visual.py``, without its resampler), as an
mmhub encoder.

The structure, with the authors' parameter names so a Qwen-VL checkpoint's ``transformer.visual.`` tower tensors load
as they are: ``conv1`` (bias-free patch convolution), ``positional_embedding`` (a learned table of 256 = 16 x 16
positions, resized bicubically to the image's patch grid when that differs, as their ``get_abs_pos`` does), ``ln_pre``,
then pre-norm blocks ``transformer.resblocks.N`` (``ln_1``, ``attn.in_proj`` / ``attn.out_proj``, ``ln_2``,
``mlp.c_fc`` -> GELU -> ``mlp.c_proj``), LayerNorm eps 1e-6. There is no CLS token and no final norm: the resampler
(``cross_attn_resampler`` with ``layout: qwen_vl``) reads the last block's patch tokens.

``attn.in_proj`` keeps the authors' interleaved layout: its output is viewed as (heads, 3 * head_dim) and split into
q, k and v per head (Megatron's layout), not PyTorch's [q; k; v] blocks. Preprocessing: a square bicubic resize to
``image_size``, then CLIP's mean and std.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from pydantic import Field, model_validator
from torch import nn

from mmhub.attention import attention, merge_heads
from mmhub.encoders.image_base import ImageEncoder
from mmhub.interfaces import BuildContext, ComponentConfig, EncoderFacts

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class QwenVLViTConfig(ComponentConfig):
    """Settings of `QwenVLViTEncoder` (the names of Qwen-VL's ``visual`` config)."""

    image_size: int = Field(448, ge=1)
    patch_size: int = Field(14, ge=1)
    width: int = Field(1664, ge=1)
    layers: int = Field(48, ge=1)
    heads: int = Field(16, ge=1)
    mlp_ratio: float = Field(4.9231, gt=0)
    positions: int = Field(256, ge=1, description="rows of the learned position table (a square grid)")
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    @model_validator(mode="after")
    def _shapes(self) -> "QwenVLViTConfig":
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if math.isqrt(self.positions) ** 2 != self.positions:
            raise ValueError(f"positions {self.positions} is not a square (the table is a square grid)")
        return self


def resize_positions(table: torch.Tensor, tokens: int) -> torch.Tensor:
    """A (S*S, C) position table -> (tokens, C) for a square grid of `tokens`: bicubic, align_corners False, in
    float32 (Qwen-VL's ``get_abs_pos``); the table itself when the sizes agree."""
    src, tgt = math.isqrt(table.shape[0]), math.isqrt(tokens)
    if src == tgt:
        return table
    grid = table.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    out = nn.functional.interpolate(grid, size=(tgt, tgt), mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).flatten(0, 2).to(table.dtype)


class VisualAttention(nn.Module):
    """Self-attention whose fused ``in_proj`` output is (heads, [q, k, v] of head_dim each)."""

    def __init__(self, width: int, heads: int, backend: str = "auto"):
        super().__init__()
        self.heads, self.backend = heads, backend
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, width = x.shape
        mixed = self.in_proj(x).reshape(n, length, self.heads, 3 * (width // self.heads))
        q, k, v = (t.transpose(1, 2) for t in mixed.split(width // self.heads, -1))  # (N, h, L, d) each
        return self.out_proj(merge_heads(attention(q, k, v, None, self.backend, 0.0)))


class VisualAttentionBlock(nn.Module):
    def __init__(self, config: QwenVLViTConfig, backend: str):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.width, eps=1e-6)
        self.attn = VisualAttention(config.width, config.heads, backend)
        self.ln_2 = nn.LayerNorm(config.width, eps=1e-6)
        hidden = int(config.width * config.mlp_ratio)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(config.width, hidden))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(hidden, config.width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TransformerBlock(nn.Module):
    def __init__(self, config: QwenVLViTConfig, backend: str):
        super().__init__()
        self.resblocks = nn.ModuleList(VisualAttentionBlock(config, backend) for _ in range(config.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class QwenVLViTEncoder(ImageEncoder):
    """Qwen-VL's ViT (no CLS token, resized learned positions, pre-norm blocks): last-block patch tokens."""

    name: ClassVar[str] = "qwen_vl_vit"
    Config: ClassVar[type[ComponentConfig]] = QwenVLViTConfig
    out_dim_doc: ClassVar[str] = "width"
    tokens_doc: ClassVar[str] = "(image_size / patch_size)^2"
    example_settings: ClassVar[dict[str, Any]] = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2,
                                                  "heads": 2, "mlp_ratio": 2.0, "positions": 16}

    @classmethod
    def describe(cls, config: QwenVLViTConfig, ctx: BuildContext) -> EncoderFacts:
        return EncoderFacts(out_dim=config.width, tokens_per_item=(config.image_size // config.patch_size) ** 2)

    def __init__(self, config: QwenVLViTConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        import torchvision.transforms as T

        self.conv1 = nn.Conv2d(3, config.width, config.patch_size, config.patch_size, bias=False)
        self.positional_embedding = nn.Parameter(config.width ** -0.5 * torch.randn(config.positions, config.width))
        self.ln_pre = nn.LayerNorm(config.width, eps=1e-6)
        self.transformer = TransformerBlock(config, ctx.attention)
        self._out_dim = config.width
        self.transform = T.Compose([
            T.Resize((config.image_size, config.image_size), interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(), T.Normalize(config.mean, config.std)])

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixels).flatten(2).transpose(1, 2)  # (N, P, width)
        x = x + resize_positions(self.positional_embedding, x.shape[1])
        return self.transformer(self.ln_pre(x))  # (N, P, width)
