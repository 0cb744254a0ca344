"""CogVLM's EVA2-CLIP vision tower (``EVA2CLIPModel``'s ViT in the authors' ``visual.py``), as an mmhub encoder.

The structure, with the authors' parameter names so a CogVLM checkpoint's ``model.vision.`` tensors load as they are:

* ``patch_embedding``: ``proj`` (a ``patch_size`` stride convolution with bias), a learned ``cls_embedding`` put in
  front of the patch tokens and a learned ``position_embedding`` table (``1 + (image_size / patch_size)^2`` rows)
  added to all of them;
* ``transformer.layers.N``: CogVLM's sandwich-normed blocks, ``x = x + LN1(attn(x))`` then ``x = x + LN2(mlp(x))``
  (the LayerNorms act on each sublayer's output, not its input), attention through one fused ``query_key_value``
  linear (with bias, heads contiguous in q, k, v order) and ``dense``, the MLP ``fc1`` -> GELU -> ``fc2``.

Tokens are those of the last block (CogVLM keeps every block of the checkpoint; its EVA-02-E tower was cut to 63
blocks before training) with the CLS token dropped unless ``drop_cls`` is false. Preprocessing is CogVLM's: a square
bicubic resize to ``image_size``, then CLIP's mean and std.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field, model_validator
from torch import nn

from mmhub.attention import attention, merge_heads
from mmhub.encoders.image_base import ImageEncoder
from mmhub.interfaces import BuildContext, ComponentConfig, EncoderFacts

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class Eva2ClipConfig(ComponentConfig):
    """Settings of `Eva2ClipEncoder` (the names of CogVLM's ``vision_config``)."""

    image_size: int = Field(490, ge=1)
    patch_size: int = Field(14, ge=1)
    hidden_size: int = Field(1792, ge=1)
    num_hidden_layers: int = Field(63, ge=1)
    num_heads: int = Field(16, ge=1)
    intermediate_size: int = Field(15360, ge=1)
    layer_norm_eps: float = 1e-6
    in_channels: int = 3
    drop_cls: bool = True
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    @model_validator(mode="after")
    def _shapes(self) -> "Eva2ClipConfig":
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}; "
                             f"fix: use {self.image_size - self.image_size % self.patch_size or self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        return self

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


class PatchEmbedding(nn.Module):
    """Conv patches, a CLS token in front, learned absolute positions on all of them."""

    def __init__(self, config: Eva2ClipConfig):
        super().__init__()
        self.proj = nn.Conv2d(config.in_channels, config.hidden_size, config.patch_size, config.patch_size)
        self.cls_embedding = nn.Parameter(torch.zeros(1, config.hidden_size))
        self.position_embedding = nn.Embedding(config.grid ** 2 + 1, config.hidden_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.proj(images).flatten(2).transpose(1, 2)  # (N, P, C)
        x = torch.cat([self.cls_embedding.expand(x.shape[0], -1, -1), x], 1)
        return x + self.position_embedding.weight[None]


class Attention(nn.Module):
    """Self-attention with one fused q/k/v linear (heads contiguous, q, k, v in that order inside the output)."""

    def __init__(self, config: Eva2ClipConfig, backend: str = "auto"):
        super().__init__()
        self.heads, self.backend = config.num_heads, backend
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        q, k, v = self.query_key_value(x).reshape(n, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        return self.dense(merge_heads(attention(q, k, v, None, self.backend, 0.0)))


class MLP(nn.Module):
    def __init__(self, config: Eva2ClipConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class TransformerLayer(nn.Module):
    """x + LN(attn(x)), then + LN(mlp(.)): the norms sit on the sublayer outputs (CogVLM's EVA2-CLIP)."""

    def __init__(self, config: Eva2ClipConfig, backend: str = "auto"):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = Attention(config, backend)
        self.mlp = MLP(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.input_layernorm(self.attention(x))
        return x + self.post_attention_layernorm(self.mlp(x))


class Transformer(nn.Module):
    def __init__(self, config: Eva2ClipConfig, backend: str = "auto"):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(config, backend) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class Eva2ClipEncoder(ImageEncoder):
    """CogVLM's EVA2-CLIP ViT (sandwich-normed blocks, fused q/k/v, learned positions): last-block patch tokens."""

    name: ClassVar[str] = "eva2_clip"
    Config: ClassVar[type[ComponentConfig]] = Eva2ClipConfig
    out_dim_doc: ClassVar[str] = "hidden_size"
    tokens_doc: ClassVar[str] = "(image_size / patch_size)^2, +1 with the CLS token (drop_cls: false)"
    example_settings: ClassVar[dict[str, Any]] = {"image_size": 28, "patch_size": 14, "hidden_size": 32,
                                                  "num_hidden_layers": 2, "num_heads": 2, "intermediate_size": 64}

    @classmethod
    def describe(cls, config: Eva2ClipConfig, ctx: BuildContext) -> EncoderFacts:
        tokens = config.grid ** 2 + (0 if config.drop_cls else 1)
        return EncoderFacts(out_dim=config.hidden_size, tokens_per_item=tokens)

    def __init__(self, config: Eva2ClipConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        import torchvision.transforms as T

        self.patch_embedding = PatchEmbedding(config)
        self.transformer = Transformer(config, ctx.attention)
        self._out_dim = config.hidden_size
        self.transform = T.Compose([
            T.Resize((config.image_size, config.image_size), interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(), T.Normalize(config.mean, config.std)])

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.transformer(self.patch_embedding(pixels))
        return x[:, 1:] if self.config.drop_cls else x  # (N, T, hidden_size)
