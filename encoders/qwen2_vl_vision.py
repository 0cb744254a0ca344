"""Dynamic-resolution image encoder over Qwen2-VL's (or Qwen2.5-VL's) vision tower (2D rotary ViT on 14-pixel patches).

Each image is resized to a multiple of ``patch_size * merge_size`` (28) on both sides, its pixel count kept within
``min_pixels``..``max_pixels`` (Qwen2-VL's ``smart_resize``), so the number of tokens depends on the image: an
``h x w`` image gives ``(h/14) * (w/14)`` patch tokens, ordered in ``merge_size x merge_size`` blocks (the order
Qwen2-VL's image processor lays them out in, so that a patch merger can take each block as one token).

``preprocess`` returns the resized, normalised image (3, H, W); ``forward`` takes a list of them (sizes may differ)
or a stacked (N, 3, H, W) batch, cuts each into patches (repeated ``temporal_patch_size`` times, as a still image
is a one-frame video) and runs all of them through the tower in one call (attention stays within each image) and
returns one (T_i, embed_dim) tensor per image. `token_grid` states an item's (t, h, w) patch grid, which
M-RoPE backbones place the image's tokens by.

The tower is transformers' ``Qwen2VisionTransformerPretrainedModel`` (``Qwen2_5_VisionTransformerPretrainedModel``
for a ``qwen2_5_vl_vision`` config: RMSNorm, SwiGLU, window attention) — a standard tower, driven like ``hf_vision``
drives CLIP: the 2D rotary embedding and variable-length attention are transformers' own. Its built-in patch merger
is left out (`MergeUnits` stands in): in mmhub the merger is the ``patch_merger`` projector.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field, model_validator
from torch import nn

from mmhub.encoders.image_base import ImageEncoder
from mmhub.errors import InputError
from mmhub.interfaces import BuildContext, ComponentConfig, EncoderFacts
from mmhub.media import load_image

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
# vision config model_type -> (transformers module, config class, tower class, config field of the token width)
TOWERS = {"qwen2_vl_vision": ("qwen2_vl", "Qwen2VLVisionConfig", "Qwen2VisionTransformerPretrainedModel", "embed_dim"),
          "qwen2_5_vl_vision": ("qwen2_5_vl", "Qwen2_5_VLVisionConfig", "Qwen2_5_VisionTransformerPretrainedModel",
                                "hidden_size")}


class Qwen2VLVisionConfig(ComponentConfig):
    """Settings of `Qwen2VLVisionEncoder`: the tower's transformers vision config and the resize budget."""

    config: dict[str, Any] = Field(description="a transformers Qwen2-VL or Qwen2.5-VL vision config (model_type "
                                               "qwen2_vl_vision, the default, or qwen2_5_vl_vision: depth, widths, "
                                               "num_heads, patch_size, spatial_merge_size, ...)")
    min_pixels: int = Field(56 * 56, ge=1)
    max_pixels: int = Field(28 * 28 * 1280, ge=1)
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    video_frames: int | None = Field(None, ge=1, description="frames sampled uniformly from each video item (rounded "
                                     "up to whole temporal patches by repeating the last); None: no video")
    video_fps: float | None = Field(None, gt=0, description="frames taken at this rate along the video's timeline "
                                    "first (an item {frames, fps} states its own rate), then video_frames of them")
    video_max_frames: int | None = Field(None, ge=1, description="with video_fps: as many frames as the clip's length "
                                         "at that rate gives, at most this many (Qwen2-VL's max_frames), so a short "
                                         "clip takes fewer tokens; the budget counts this many; instead of "
                                         "video_frames")
    video_min_frames: int = Field(4, ge=1, description="with video_max_frames: at least this many frames (Qwen2-VL's "
                                  "min_frames), never more than the clip has")
    video_min_pixels: int = Field(128 * 28 * 28, ge=1, description="a video frame's pixel budget, as min_pixels")
    video_max_pixels: int = Field(768 * 28 * 28, ge=1, description="a video frame's pixel budget, as max_pixels")

    @model_validator(mode="after")
    def _budget(self) -> "Qwen2VLVisionConfig":
        if self.config.get("model_type", "qwen2_vl_vision") not in TOWERS:
            raise ValueError(f"config.model_type {self.config.get('model_type')!r} is not a Qwen2-VL vision tower "
                             f"({' or '.join(TOWERS)})")
        if self.video_max_frames is not None and (self.video_frames is not None or self.video_fps is None):
            raise ValueError(f"video_max_frames {self.video_max_frames} caps the frames video_fps takes: set "
                             f"video_fps (e.g. 2.0, Qwen2-VL's default) and drop video_frames "
                             f"({self.video_frames}), which fixes the count instead")
        if self.video_max_frames is not None and self.video_min_frames > self.video_max_frames:
            raise ValueError(f"video_min_frames {self.video_min_frames} > video_max_frames {self.video_max_frames}; "
                             f"set min <= max")
        if self.video_frames is not None and self.config.get("model_type") == "qwen2_5_vl_vision":
            raise ValueError("video_frames: Qwen2.5-VL spaces a video's temporal positions by its frame rate, which "
                             "mmhub does not carry; video is supported for Qwen2-VL towers only (remove video_frames)")
        if self.min_pixels > self.max_pixels or self.video_min_pixels > self.video_max_pixels:
            raise ValueError(f"min_pixels {self.min_pixels} > max_pixels {self.max_pixels} (or video_min_pixels "
                             f"{self.video_min_pixels} > video_max_pixels {self.video_max_pixels}); set min <= max")
        return self


def _family(settings: dict[str, Any]) -> tuple[str, str, str, str]:
    return TOWERS[settings.get("model_type", "qwen2_vl_vision")]


def tower_config(settings: dict[str, Any]) -> Any:
    """The transformers vision config (``Qwen2VLVisionConfig`` / ``Qwen2_5_VLVisionConfig``) of a settings dict."""
    import importlib

    module, config_name, _, _ = _family(settings)
    configs = importlib.import_module(f"transformers.models.{module}.configuration_{module}")
    return getattr(configs, config_name)(**{k: v for k, v in settings.items() if k != "model_type"})


def token_width(settings: dict[str, Any], cfg: Any) -> int:
    """The width of the tower's patch tokens (Qwen2-VL's embed_dim, Qwen2.5-VL's hidden_size)."""
    return int(getattr(cfg, _family(settings)[3]))


class MergeUnits(nn.Module):
    """Stands in for the tower's own merger: each merge unit's patch features side by side, so the tower's put-back
    of whole units (Qwen2.5-VL's window attention reorders them) applies; `forward` unfolds them into patches."""

    def __init__(self, unit: int):
        super().__init__()
        self.unit = unit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, self.unit * x.shape[-1])


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's target size: both sides multiples of `factor`, pixels within [min_pixels, max_pixels], the aspect
    ratio kept as closely as possible."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image of {width}x{height}: aspect ratio {max(height, width) / min(height, width):.0f} is "
                         "over 200, which Qwen2-VL's resize cannot keep; crop the image first")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def most_blocks(min_pixels: int, max_pixels: int, factor: int) -> int:
    """The most `factor` x `factor` blocks `smart_resize` gives any image (aspect ratio <= 200): what the token budget
    counts before an image is seen."""
    within = max_pixels // factor ** 2  # sides rounded or scaled down within the budget
    # scaled down, a short side below one block is kept at one: the long side reaches sqrt(200 * max_pixels)
    oblong = int(math.sqrt(200 * max_pixels) // factor)
    # scaled up to min_pixels, each side rounds up: at most one more block along each
    a = math.sqrt(200) + 1 / math.sqrt(200)
    up = math.ceil(min_pixels / factor ** 2 + math.sqrt(min_pixels) * a / factor + 1)
    return max(within, oblong, up, 1)


def patchify(image: torch.Tensor, patch: int, merge: int, temporal: int) -> torch.Tensor:
    """(3, H, W) image, or (F, 3, H, W) frames (F a multiple of `temporal`) -> (F/temporal * H/patch * W/patch,
    3 * temporal * patch * patch) patch vectors, per temporal patch in merge x merge blocks (row-major over blocks,
    then within a block); a still image is one temporal patch of `temporal` copies of itself."""
    frames = image.unsqueeze(0).expand(temporal, *image.shape) if image.ndim == 3 else image
    f, c, h, w = frames.shape
    gt, gh, gw = f // temporal, h // patch, w // patch
    x = frames.reshape(gt, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (t, gh/m, gw/m, m, m, C, temporal, p, p)
    return x.reshape(gt * gh * gw, c * temporal * patch * patch)


class Qwen2VLVisionEncoder(ImageEncoder):
    """Qwen2-VL's vision tower at dynamic resolution: an image's token count follows its size (videos: and frames)."""

    name: ClassVar[str] = "qwen2_vl_vision"
    modalities_in: ClassVar[tuple[str, ...]] = ("image", "video")
    Config: ClassVar[type[ComponentConfig]] = Qwen2VLVisionConfig
    library: ClassVar[str] = "transformers"
    out_dim_doc: ClassVar[str] = "the tower's embed_dim (Qwen2.5-VL: hidden_size)"
    tokens_doc: ClassVar[str] = ("(H/patch) x (W/patch) patch tokens for the image resized to multiples of "
                                 "patch x merge within min_pixels..max_pixels; the budget counts the most any image "
                                 "takes (max_pixels / patch^2, more for very oblong images)")
    variable_tokens: ClassVar[bool] = True
    example_settings: ClassVar[dict[str, Any]] = {
        "config": {"depth": 2, "embed_dim": 32, "num_heads": 2, "hidden_size": 32, "mlp_ratio": 2},
        "min_pixels": 28 * 28, "max_pixels": 56 * 28, "video_frames": 2, "video_min_pixels": 28 * 28,
        "video_max_pixels": 56 * 28}

    @classmethod
    def describe(cls, config: Qwen2VLVisionConfig, ctx: BuildContext) -> EncoderFacts:
        cfg = tower_config(config.config)
        blocks = most_blocks(config.min_pixels, config.max_pixels, cfg.patch_size * cfg.spatial_merge_size)
        most = blocks * cfg.spatial_merge_size ** 2
        video = {}
        frames = config.video_frames or config.video_max_frames
        if frames is not None:
            frame_blocks = most_blocks(config.video_min_pixels, config.video_max_pixels,
                                       cfg.patch_size * cfg.spatial_merge_size)
            video["video"] = -(-frames // cfg.temporal_patch_size) * frame_blocks * \
                cfg.spatial_merge_size ** 2
        return EncoderFacts(out_dim=token_width(config.config, cfg), tokens_per_item=most, tokens_by_modality=video)

    def __init__(self, config: Qwen2VLVisionConfig, ctx: BuildContext):
        import importlib

        from mmhub.hf_attention import hf_attn_implementation

        super().__init__(config, ctx)
        self.hf_config = tower_config(config.config)
        self.hf_config._attn_implementation = hf_attn_implementation(ctx.attention)
        module, _, tower_name, _ = _family(config.config)
        tower_cls = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), tower_name)
        self.model = tower_cls._from_config(self.hf_config, dtype=DTYPES[config.dtype])
        # the merger is mmhub's patch_merger projector
        self.model.merger = MergeUnits(self.hf_config.spatial_merge_size ** 2)
        self._out_dim = token_width(config.config, self.hf_config)
        self.patch = self.hf_config.patch_size
        self.merge = self.hf_config.spatial_merge_size
        self.temporal = self.hf_config.temporal_patch_size
        self._mean = torch.tensor(config.mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(config.std, dtype=torch.float32).view(3, 1, 1)

    def has_weight_source(self) -> bool:
        return False

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) an image of this size is resized to."""
        factor = self.patch * self.merge
        return smart_resize(height, width, factor, self.config.min_pixels, self.config.max_pixels)

    def preprocess(self, item: Any, modality: str) -> torch.Tensor:
        if modality == "video":
            return self.frames(item)
        return self.picture(load_image(item).convert("RGB"), self.target_size)

    def frames(self, item: Any) -> torch.Tensor:
        """One video -> (F, 3, H, W) normalised frames: `video_frames` sampled uniformly (at `video_fps` along its
        timeline first, when set), or with `video_max_frames` as many as the clip's length at `video_fps` gives
        (Qwen2-VL's rule: within video_min_frames..video_max_frames, whole temporal patches), each resized to the
        first's target size within the video pixel budget, the last repeated up to whole temporal patches."""
        from mmhub.encoders.video_encoder import load_frames, rate_capped_indices, whole_clip

        cfg = self.config
        if cfg.video_max_frames is not None:
            clip, clip_fps = whole_clip(item)
            picked = rate_capped_indices(len(clip), clip_fps, cfg.video_fps, cfg.video_min_frames,
                                         cfg.video_max_frames, self.temporal)
            chosen = [clip[i] for i in picked]
        elif cfg.video_frames is None:
            raise InputError(f"the {self.name} encoder takes no video: set video_frames (frames per video item), or "
                             f"video_fps with video_max_frames")
        else:
            chosen = load_frames(item, cfg.video_frames, fps=cfg.video_fps)
        frames = [load_image(f).convert("RGB") for f in chosen]
        first = frames[0]
        size = smart_resize(first.height, first.width, self.patch * self.merge, self.config.video_min_pixels,
                            self.config.video_max_pixels)
        out = torch.stack([self.picture(f, lambda h, w: size) for f in frames])
        if pad := -len(frames) % self.temporal:
            out = torch.cat([out, out[-1:].expand(pad, *out.shape[1:])])
        return out

    def picture(self, image: Image.Image, target: Any) -> torch.Tensor:
        """One RGB image -> (3, H, W) normalised at ``target(height, width)``."""
        h, w = target(image.height, image.width)
        if (h, w) != (image.height, image.width):  # PIL's bicubic, as Qwen2-VL's PIL image processor resizes
            image = image.resize((w, h), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        return (pixels - self._mean) / self._std  # (3, H, W)

    def token_grid(self, item: torch.Tensor, modality: str = "image") -> tuple[int, int, int]:
        """A preprocessed image's or video's (t, h, w) patch grid: its tokens in `forward`'s order."""
        h, w = item.shape[-2:]
        frames = item.shape[0] if item.ndim == 4 else self.temporal
        if h % (self.patch * self.merge) or w % (self.patch * self.merge) or frames % self.temporal:
            raise ValueError(f"a {tuple(item.shape)} item is not in whole {self.patch * self.merge}-pixel blocks and "
                             f"{self.temporal}-frame temporal patches; pass items through this encoder's preprocess")
        return frames // self.temporal, h // self.patch, w // self.patch

    def forward(self, pixels: torch.Tensor | list[torch.Tensor], modality: str) -> torch.Tensor | list[torch.Tensor]:
        """(N, 3, H, W) images, or a list of (3, H_i, W_i) -> (N, T, embed_dim) tokens, or a list of (T_i, embed_dim)
        when the sizes differ."""
        dtype = next(self.parameters()).dtype
        items = list(pixels)
        grids = torch.tensor([self.token_grid(x) for x in items], dtype=torch.long)
        patches = torch.cat([patchify(x, self.patch, self.merge, self.temporal) for x in items]).to(dtype)
        units = self.model(patches, grid_thw=grids.to(patches.device)).pooler_output  # (sum T_i / unit, unit * D)
        out = units.reshape(-1, self._out_dim)  # (sum T_i, D), in each image's merge-block order
        per_item = list(out.split(grids.prod(-1).tolist()))
        same = all(t.shape == per_item[0].shape for t in per_item)
        return torch.stack(per_item) if same else per_item

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.forward(pixels, "image")  # a stacked batch: same-sized images
