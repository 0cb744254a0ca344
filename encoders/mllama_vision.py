"""Llama-3.2-Vision's tiled image encoder: aspect-ratio tiling in `preprocess`, MllamaVisionModel as the tower.

The tower is a standard transformers module (``MllamaVisionModel``: patch embedding, gated tile and aspect-ratio
position embeddings, local then gated global transformer layers, the final state concatenated with the chosen
intermediate layers), built from its config dict; mmhub drives it and owns the tiling. Per image, `preprocess`
does what ``MllamaImageProcessor`` (torchvision backend) does: pick the tile canvas (at most ``max_num_tiles``
tiles of ``image_size`` pixels) that needs the least upscaling (else the least downscaling), resize the image to fit
it keeping its aspect ratio (bilinear, antialiased, on uint8), pad right/bottom with zeros, normalise, split into
row-major tiles and pad the tile list with all-zero tiles to ``max_num_tiles``.

The tensor `preprocess` returns is (max_num_tiles, 4, S, S): channels 0-2 are the pixels, channel 3 holds the
image's aspect-ratio id (1 + the index of its (rows, columns) arrangement; every value of the plane is the id), so
one tensor per item carries both. The encoder emits ``max_num_tiles x (patches + 1)`` tokens per image, padding
tiles included (transformers computes and attends to them in rows that see no image); `token_mask` says which
tokens belong to real tiles.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator
from transformers import MllamaVisionConfig, MllamaVisionModel

from mmhub.encoders.image_base import ImageEncoder
from mmhub.hf_attention import hf_attn_implementation
from mmhub.interfaces import BuildContext, ComponentConfig, EncoderFacts
from mmhub.media import load_image

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HALF = (0.5, 0.5, 0.5)  # transformers' IMAGENET_STANDARD mean/std, MllamaImageProcessor's defaults
META_KEYS = ("transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype", "model_type")


class MllamaVisionEncoderConfig(ComponentConfig):
    """Settings of `MllamaVisionEncoder`: the tower's transformers config and the image processor's settings."""

    config: dict[str, Any] = Field(description="MllamaVisionConfig fields (hidden_size, image_size, patch_size, "
                                               "max_num_tiles, intermediate_layers_indices, ...)")
    mean: tuple[float, float, float] = HALF
    std: tuple[float, float, float] = HALF
    interpolation: Literal["bilinear"] = "bilinear"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @field_validator("config")
    @classmethod
    def _known_fields(cls, value: dict[str, Any]) -> dict[str, Any]:
        clean = {k: v for k, v in value.items() if k not in META_KEYS}
        try:
            MllamaVisionConfig(**clean)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"config is not a valid MllamaVisionConfig: {exc}") from None
        return clean


def tower_config(config: MllamaVisionEncoderConfig) -> MllamaVisionConfig:
    """The transformers config of the tower these settings describe."""
    return MllamaVisionConfig(**config.config)


@lru_cache(maxsize=8)
def arrangements(max_tiles: int) -> tuple[tuple[int, int], ...]:
    """Every (a, b) with a * b <= max_tiles, a-major: id k+1 is arrangement k (transformers' order)."""
    return tuple((a, b) for a in range(1, max_tiles + 1) for b in range(1, max_tiles + 1) if a * b <= max_tiles)


def tile_canvas(height: int, width: int, max_tiles: int, tile: int) -> tuple[int, int]:
    """The (rows, columns) of tiles the image is laid on: the smallest upscale >= 1, else the largest downscale;
    ties go to the smallest canvas area (the first in arrangement order among equals)."""
    options = arrangements(max_tiles)
    scales = [min(r * tile / height, c * tile / width) for r, c in options]
    up = [s for s in scales if s >= 1]
    chosen = min(up) if up else max(scales)
    best = [o for o, s in zip(options, scales, strict=True) if s == chosen]
    return min(best, key=lambda o: o[0] * o[1])


def fit_size(height: int, width: int, canvas_h: int, canvas_w: int, tile: int) -> tuple[int, int]:
    """The resized (height, width) of an image on a canvas: each side clipped to [tile, canvas], aspect kept."""
    target_w = min(max(width, tile), canvas_w)
    target_h = min(max(height, tile), canvas_h)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


def tiles_of(aspect_ids: torch.Tensor, max_tiles: int) -> torch.Tensor:
    """(N,) aspect-ratio ids -> (N,) real tile counts (id 0, an absent image, counts one tile as transformers)."""
    counts = torch.tensor([1] + [a * b for a, b in arrangements(max_tiles)], device=aspect_ids.device)
    if bool((aspect_ids < 0).any()) or bool((aspect_ids >= len(counts)).any()):
        raise ValueError(f"aspect-ratio ids {aspect_ids.tolist()} outside 0..{len(counts) - 1} for max_num_tiles "
                         f"{max_tiles}: the items were not made by this encoder's preprocess")
    return counts[aspect_ids]


class MllamaVisionEncoder(ImageEncoder):
    """Llama-3.2-Vision's tower (transformers MllamaVisionModel) behind mmhub's aspect-ratio tiling."""

    name: ClassVar[str] = "mllama_vision"
    Config: ClassVar[type[ComponentConfig]] = MllamaVisionEncoderConfig
    library: ClassVar[str] = "transformers"
    out_dim_doc: ClassVar[str] = "vision_output_dim: hidden_size x (1 + len(intermediate_layers_indices))"
    tokens_doc: ClassVar[str] = "max_num_tiles x ((image_size / patch_size)^2 + 1), padding tiles included"
    example_settings: ClassVar[dict[str, Any]] = {"config": {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_global_layers": 1,
        "attention_heads": 2, "image_size": 28, "patch_size": 14, "max_num_tiles": 4,
        "intermediate_layers_indices": [0], "vision_output_dim": 64}}

    @classmethod
    def describe(cls, config: MllamaVisionEncoderConfig, ctx: BuildContext) -> EncoderFacts:
        cfg = tower_config(config)
        width = cfg.hidden_size * (1 + len(cfg.intermediate_layers_indices))
        if cfg.vision_output_dim != width:
            raise ValueError(f"vision_output_dim {cfg.vision_output_dim} != hidden_size {cfg.hidden_size} x (1 + "
                             f"{len(cfg.intermediate_layers_indices)} intermediate layers) = {width}; set "
                             f"vision_output_dim: {width}")
        bad = [i for i in cfg.intermediate_layers_indices if not 0 <= i < cfg.num_hidden_layers]
        if bad:
            raise ValueError(f"intermediate_layers_indices {bad} outside the {cfg.num_hidden_layers} local layers "
                             f"(0..{cfg.num_hidden_layers - 1})")
        if len(cfg.supported_aspect_ratios) != len(arrangements(cfg.max_num_tiles)):
            raise ValueError(f"supported_aspect_ratios has {len(cfg.supported_aspect_ratios)} entries but "
                             f"max_num_tiles {cfg.max_num_tiles} allows {len(arrangements(cfg.max_num_tiles))} "
                             f"arrangements ({list(arrangements(cfg.max_num_tiles))}); list them all")
        return EncoderFacts(out_dim=width, tokens_per_item=cfg.max_num_tiles * cls.patches(cfg))

    @staticmethod
    def patches(cfg: MllamaVisionConfig) -> int:
        """Tokens per tile: the patches plus the class token."""
        return (cfg.image_size // cfg.patch_size) ** 2 + 1

    def __init__(self, config: MllamaVisionEncoderConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        self.hf_config = tower_config(config)
        self.hf_config._attn_implementation = hf_attn_implementation(ctx.attention)
        self.model = MllamaVisionModel(self.hf_config).to(DTYPES[config.dtype])
        self._out_dim = self.hf_config.vision_output_dim
        self.tile = self.hf_config.image_size
        self.max_tiles = self.hf_config.max_num_tiles

    def has_weight_source(self) -> bool:
        return False

    def preprocess(self, item: Any, modality: str) -> torch.Tensor:
        """A PIL image (or path/array) -> (max_num_tiles, 4, S, S): tiles' pixels plus the aspect-ratio id plane."""
        from torchvision.transforms.v2 import functional as F

        image = F.pil_to_tensor(load_image(item))  # (3, H, W) uint8
        height, width = image.shape[-2:]
        rows, cols = tile_canvas(height, width, self.max_tiles, self.tile)
        new_h, new_w = fit_size(height, width, rows * self.tile, cols * self.tile, self.tile)
        image = F.resize(image, [new_h, new_w], interpolation=F.InterpolationMode.BILINEAR, antialias=True)
        image = F.pad(image, [0, 0, cols * self.tile - new_w, rows * self.tile - new_h], fill=0)
        scale = 1.0 / (1 / 255)  # the processor's fused rescale + normalise, to the last bit
        image = F.normalize(image.to(torch.float32), (torch.tensor(self.config.mean) * scale).tolist(),
                            (torch.tensor(self.config.std) * scale).tolist())
        tiles = image.view(3, rows, self.tile, cols, self.tile).permute(1, 3, 0, 2, 4)
        out = torch.zeros(self.max_tiles, 4, self.tile, self.tile)
        out[: rows * cols, :3] = tiles.reshape(rows * cols, 3, self.tile, self.tile)
        out[:, 3] = float(arrangements(self.max_tiles).index((rows, cols)) + 1)
        return out

    def _split(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if pixels.ndim != 5 or pixels.shape[1:3] != (self.max_tiles, 4):
            raise ValueError(f"mllama_vision takes (N, {self.max_tiles}, 4, {self.tile}, {self.tile}) items from its "
                             f"own preprocess, got {tuple(pixels.shape)}")
        return pixels[:, :, :3], pixels[:, 0, 3, 0, 0].round().long()

    def token_mask(self, items: torch.Tensor, modality: str) -> torch.Tensor:
        """(N, T) True at the tokens of real tiles (False at the padding tiles)."""
        _, ids = self._split(items)
        real = torch.arange(self.max_tiles, device=items.device)[None] < tiles_of(ids, self.max_tiles)[:, None]
        return real.repeat_interleave(self.patches(self.hf_config), dim=1)

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, max_num_tiles, 4, S, S) -> (N, max_num_tiles x (patches + 1), vision_output_dim)."""
        images, ids = self._split(pixels)
        n = images.shape[0]
        mask = torch.arange(self.max_tiles, device=pixels.device)[None] < tiles_of(ids, self.max_tiles)[:, None]
        out = self.model(pixel_values=images[:, None], aspect_ratio_ids=ids[:, None],
                         aspect_ratio_mask=mask.long()[:, None]).last_hidden_state  # (N, 1, tiles, P, D)
        return out.reshape(n, -1, out.shape[-1])
