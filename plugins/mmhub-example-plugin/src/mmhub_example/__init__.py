"""mmhub example plugin: registers one encoder (``patch_conv``), one projector (``pool_linear``) and a preset.

Both components are real and small: ``patch_conv`` is a ViT-style patch embedding
(a strided convolution + learned positions) usable as a cheap image encoder, and
``pool_linear`` averages groups of ``k`` tokens before a linear map, cutting the
token count by ``k``. The preset ``patch-conv-llama:tiny`` joins them to a tiny
random Llama built from a config (seconds on a CPU, no weights).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from mmhub import hookimpl
from mmhub.interfaces import (
    BuildContext,
    ComponentConfig,
    Encoder,
    EncoderFacts,
    Projector,
    ProjectorConfig,
    TextContext,
)
from mmhub.media import load_image


class PatchConvConfig(ComponentConfig):
    """Settings of `PatchConvEncoder`."""

    image_size: int = Field(32, gt=0)
    patch_size: int = Field(8, gt=0)
    width: int = Field(64, gt=0)


class PatchConvEncoder(Encoder):
    """ViT-style patch embedding: (image_size / patch_size)^2 tokens of `width` features."""

    name: ClassVar[str] = "patch_conv"
    Config: ClassVar[type[ComponentConfig]] = PatchConvConfig
    modalities_in: ClassVar[tuple[str, ...]] = ("image",)
    out_dim_doc: ClassVar[str] = "width"
    tokens_doc: ClassVar[str] = "(image_size / patch_size)^2"
    example_settings: ClassVar[dict[str, Any]] = {"image_size": 32, "patch_size": 8, "width": 32}
    out_dim = property(lambda self: self.config.width)  # width of each output feature vector

    @classmethod
    def describe(cls, config: PatchConvConfig, ctx: BuildContext) -> EncoderFacts:
        if config.image_size % config.patch_size:
            raise ValueError(f"image_size {config.image_size} is not a multiple of patch_size {config.patch_size}")
        return EncoderFacts(out_dim=config.width, tokens_per_item=(config.image_size // config.patch_size) ** 2)

    def __init__(self, config: PatchConvConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        self.proj = nn.Conv2d(3, config.width, config.patch_size, stride=config.patch_size)
        self.pos = nn.Parameter(torch.randn(1, (config.image_size // config.patch_size) ** 2, config.width) * 0.02)

    def preprocess(self, item: Any, modality: str) -> torch.Tensor:
        img = load_image(item).resize((self.config.image_size,) * 2)
        x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width, 3)
        return x.permute(2, 0, 1).float() / 127.5 - 1.0  # (3, H, W) in [-1, 1]

    def forward(self, pixels: torch.Tensor, modality: str) -> torch.Tensor:
        return self.proj(pixels).flatten(2).transpose(1, 2) + self.pos  # (N, h*w, width)


class PoolLinearConfig(ProjectorConfig):
    """Settings of `PoolLinearProjector`."""

    k: int = Field(2, gt=0)


class PoolLinearProjector(Projector):
    """Average every `k` consecutive tokens, then a linear map: ceil(T / k) output tokens."""

    name: ClassVar[str] = "pool_linear"
    Config: ClassVar[type[ComponentConfig]] = PoolLinearConfig
    modalities_in: ClassVar[tuple[str, ...]] = ("features",)
    modalities_out: ClassVar[tuple[str, ...]] = ("embeddings",)
    out_dim_doc: ClassVar[str] = "the backbone's hidden size"
    tokens_doc: ClassVar[str] = "ceil(input tokens / k)"
    example_settings: ClassVar[dict[str, Any]] = {"k": 3}

    @classmethod
    def num_tokens(cls, config: PoolLinearConfig, in_tokens: int) -> int:
        return math.ceil(in_tokens / config.k)

    def __init__(self, config: PoolLinearConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        self.proj = nn.Linear(config.in_dim, config.out_dim)

    def forward(self, features: torch.Tensor, text: TextContext | None = None) -> torch.Tensor:
        x = F.avg_pool1d(features.transpose(1, 2), self.config.k, ceil_mode=True)  # (N, C, ceil(T/k))
        return self.proj(x.transpose(1, 2))  # (N, ceil(T/k), out)


# a whole model from this plugin's parts and a tiny random Llama (config only, no weights): `patch-conv-llama:tiny`
PRESET: dict[str, Any] = {
    "name": "patch-conv-llama-tiny",
    "encoders": {"image": {"type": "patch_conv", "image_size": 32, "patch_size": 8, "width": 40}},
    "projectors": {"image": {"type": "pool_linear", "k": 2}},
    "backbone": {"type": "hf_causal_lm", "tokenizer": "byte",
                 "config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                            "num_attention_heads": 2, "vocab_size": 300}},
}


@hookimpl
def register_encoders(register):
    register(PatchConvEncoder)


@hookimpl
def register_projectors(register):
    register(PoolLinearProjector)


@hookimpl
def register_presets(register):
    register("patch-conv-llama", "tiny", PRESET, io="I+T -> T",
             description="The example plugin's patch_conv encoder and pool_linear projector on a tiny random Llama.")
