"""Video encoder: sampled frames through any registered image encoder, then a temporal step.

Video-ChatGPT (CLIP ViT-L/14 frame features pooled in time and space), VideoChat,
Video-LLaMA, X-LLM, InstructBLIP and X-InstructBLIP read video as frames through their
image encoder; Flamingo concatenates per-frame features for its resampler. ``frames``
is the nested image encoder, any registered one (``{type: open_clip, ...}``,
``{type: hf_vision, ...}``, ``{type: timm, ...}``, a plugin's), resolved through the
registry and described with its own ``describe``. ``temporal`` is the step over the
(num_frames, T, D) per-frame tokens of an item:

* ``mean``: the average over time, T tokens;
* ``video_chatgpt``: Video-ChatGPT's spatio-temporal features, in its order: the
  per-frame features (mean over a frame's T tokens: num_frames tokens) followed by
  the per-location features (mean over the frames for each of the T token
  positions: T tokens), num_frames + T tokens. (Video-ChatGPT also zero-pads its
  per-frame part to 100 frames; here the count is fixed by ``num_frames`` instead.);
* ``concat``: every frame's tokens in time order, each frame first reduced to
  ``tokens_per_frame`` tokens by adaptive average pooling (over the square patch grid
  when both counts are perfect squares, else over the token sequence; all T tokens
  when ``tokens_per_frame`` is not set), num_frames * tokens_per_frame tokens.

Frame order: ``mean`` averages it away; ``video_chatgpt`` and ``concat`` keep the frames in time order, which the
LLM reads through its own positions when the tokens reach it one for one (``linear``, ``mlp``). A connector that
reads all frames' tokens as one set (the ``qformer`` with ``read_frames: together``, a resampler) needs to be told
which frame each token came from: the ``qformer``'s ``frame_positions``, the ``video_qformer`` (Video-LLaMA's frame
positions), the ``perceiver``'s ``max_input_tokens``; or a Q-Former that reads each frame on its own
(``read_frames: each``, ``frames`` = ``num_frames``).

Items: a list of frames (PIL images, HxWx3 arrays, image paths), a (F, H, W, 3) uint8
array, or an animated GIF/WebP/APNG path or bytes. ``num_frames`` frames are taken at
the centres of ``num_frames`` equal segments of the clip, so a clip with fewer frames
has each frame repeated in order (2 frames for ``num_frames: 4`` -> f0 f0 f1 f1; a
still image is one frame). Each frame goes through the nested encoder's own
``preprocess``, giving (num_frames, C, H, W) per item.

Frame sampling: with ``fps`` set, frames are first taken at that rate along the clip's
own timeline (an animated file's per-frame durations; ``source_fps`` for frame lists and
arrays, or an item given as ``{"frames": ..., "fps": RATE}``), then ``num_frames`` of
those are chosen as above (evenly when there are more, repeated in order when fewer),
so the token count never depends on the clip. ``max_pixels`` downscales each frame
(aspect kept) to at most that many pixels before the frame encoder sees it (a
dynamic-resolution frame encoder then spends fewer tokens).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageSequence, UnidentifiedImageError
from pydantic import Field

from mmhub.errors import InputError
from mmhub.interfaces import BuildContext, ComponentConfig, Encoder, EncoderFacts
from mmhub.media import MAX_PIXELS

MAX_FRAMES = 10_000  # frames decoded from one file at most (a guard against absurd files)


class VideoEncoderConfig(ComponentConfig):
    """Settings of `VideoEncoder`."""

    frames: dict[str, Any] = Field(description="the per-frame image encoder: {type: NAME, ...its settings}")
    num_frames: int = Field(8, ge=1)
    temporal: Literal["mean", "video_chatgpt", "concat"] = "mean"
    tokens_per_frame: int | None = Field(None, ge=1, description="concat only: tokens kept per frame")
    fps: float | None = Field(None, gt=0, le=1000, description="sample frames at this rate along the clip's timeline")
    source_fps: float = Field(25.0, gt=0, le=1000, description="the frame rate of clips given as frame lists/arrays")
    max_pixels: int | None = Field(None, ge=1, description="downscale each frame to at most this many pixels")


def frame_indices(available: int, num_frames: int) -> np.ndarray:
    """Indices of `num_frames` frames out of `available`: the centres of equal segments (repeats when too few)."""
    return np.floor((np.arange(num_frames) + 0.5) * available / num_frames).astype(int)


def _open_animation(item: Any) -> Image.Image:
    src = io.BytesIO(item) if isinstance(item, (bytes, bytearray)) else Path(item)
    name = "the uploaded bytes" if isinstance(item, (bytes, bytearray)) else str(item)
    if isinstance(src, Path) and not src.is_file():
        raise InputError(f"video file {name} does not exist; pass an existing GIF/WebP/APNG path, its bytes, "
                         f"a list of frames or a (F, H, W, 3) array")
    try:
        img = Image.open(src)
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"{name} is not a readable animation ({type(exc).__name__}: {exc}); video files other than "
                         f"GIF/WebP/APNG must be decoded to a frame list or a (F, H, W, 3) array first") from None
    if img.width * img.height > MAX_PIXELS:
        raise InputError(f"video {name} has {img.width}x{img.height} frames, more than {MAX_PIXELS} pixels each; "
                         f"downscale it first")
    return img


def timed_indices(durations: list[float], fps: float) -> list[int]:
    """The frame shown at each tick of a `fps` clock along a clip whose frames last `durations` seconds."""
    starts = np.cumsum([0.0, *durations])
    total = float(starts[-1])
    ticks = np.arange(0.0, total, 1.0 / fps) if total > 0 else np.zeros(1)
    return np.clip(np.searchsorted(starts, ticks, side="right") - 1, 0, len(durations) - 1).tolist()


def load_frames(item: Any, num_frames: int, fps: float | None = None, source_fps: float = 25.0) -> list[Any]:
    """`num_frames` frames (PIL images or arrays, as given) sampled from one video item: uniformly over its frames,
    or (with `fps`) at that rate along its timeline first. An item may be ``{"frames": FRAMES, "fps": RATE}``."""
    if isinstance(item, dict):
        if "frames" not in item:
            raise InputError(f"a video given as a dict needs 'frames' (and optionally 'fps'); got keys {sorted(item)}")
        rate = item.get("fps", source_fps)
        if not isinstance(rate, (int, float)) or not 0 < rate <= 1000:
            raise InputError(f"video fps {rate!r} must be a number in (0, 1000]")
        return load_frames(item["frames"], num_frames, fps, float(rate))
    if fps is not None:
        frames, durations = _all_frames(item, source_fps)
        timed = [frames[i] for i in timed_indices(durations, fps)]
        return [timed[i] for i in frame_indices(len(timed), num_frames)]
    if isinstance(item, torch.Tensor):
        item = item.detach().cpu().numpy()
    if isinstance(item, np.ndarray):
        if item.ndim != 4 or item.shape[-1] not in (3, 4):
            raise InputError(f"a video array must be (F, H, W, 3) (frames, height, width, RGB), got shape "
                             f"{item.shape}; for one image use the image modality")
        return _pick(list(item), num_frames)
    if isinstance(item, (list, tuple)):
        return _pick(list(item), num_frames)
    if isinstance(item, (str, Path, bytes, bytearray)):
        img = _open_animation(item)
        available = min(getattr(img, "n_frames", 1), MAX_FRAMES)
        picked = set(frame_indices(available, num_frames).tolist())
        decoded: dict[int, Image.Image] = {}
        try:
            for i, frame in enumerate(ImageSequence.Iterator(img)):
                if i >= available:
                    break
                if i in picked:
                    decoded[i] = frame.convert("RGB")
        except (OSError, EOFError) as exc:
            raise InputError(f"video {item if not isinstance(item, (bytes, bytearray)) else 'bytes'} could not be "
                             f"decoded ({type(exc).__name__}: {exc})") from None
        return [decoded[i] for i in frame_indices(available, num_frames)]
    raise InputError(f"cannot read a video from a {type(item).__name__}; pass a list of frames, a (F, H, W, 3) uint8 "
                     f"array, or an animated GIF/WebP/APNG path or bytes")


def whole_clip(item: Any, source_fps: float = 25.0) -> tuple[list[Any], float]:
    """Every frame of one video item and its frame rate: ``{"frames": ..., "fps": RATE}`` states its rate, an
    animation's rate is its frame count over its shown time, frame lists and arrays run at `source_fps`."""
    if isinstance(item, dict):
        if "frames" not in item:
            raise InputError(f"a video given as a dict needs 'frames' (and optionally 'fps'); got keys {sorted(item)}")
        rate = item.get("fps", source_fps)
        if not isinstance(rate, (int, float)) or not 0 < rate <= 1000:
            raise InputError(f"video fps {rate!r} must be a number in (0, 1000]")
        return whole_clip(item["frames"], float(rate))
    frames, durations = _all_frames(item, source_fps)
    if not frames:
        raise InputError("the video has no frames; pass at least one frame")
    total = float(sum(durations))
    return frames, (len(frames) / total if total > 0 else source_fps)


def rate_capped_indices(total: int, clip_fps: float, fps: float, min_frames: int, max_frames: int,
                        multiple: int) -> list[int]:
    """Qwen2-VL's frame sampling by rate: ``total / clip_fps * fps`` frames (the clip's length in seconds times the
    rate), kept within ``min_frames..max_frames`` and the clip's own frame count, floored to a whole `multiple`
    (temporal patches, at least one), taken at even steps from frame 0."""
    most = max(multiple, (min(max_frames, total) // multiple) * multiple)
    count = min(max(total / clip_fps * fps, min_frames), most, total)
    count = max(multiple, int(count // multiple) * multiple)
    step = total / count
    return [min(total - 1, int(i * step)) for i in range(count)]


def _all_frames(item: Any, source_fps: float) -> tuple[list[Any], list[float]]:
    """Every frame of a clip and how long each is shown (seconds): an animation's own durations (``source_fps``
    where a frame records none), ``1 / source_fps`` each for frame lists and arrays."""
    if isinstance(item, (str, Path, bytes, bytearray)):
        img = _open_animation(item)
        frames, durations = [], []
        try:
            for i, frame in enumerate(ImageSequence.Iterator(img)):
                if i >= MAX_FRAMES:
                    break
                ms = frame.info.get("duration")
                durations.append(ms / 1000.0 if isinstance(ms, (int, float)) and ms > 0 else 1.0 / source_fps)
                frames.append(frame.convert("RGB"))
        except (OSError, EOFError) as exc:
            raise InputError(f"video could not be decoded ({type(exc).__name__}: {exc})") from None
        return frames, durations
    frames = load_frames(item, 1)  # validates the item's form
    frames = list(item.detach().cpu().numpy() if isinstance(item, torch.Tensor) else item)
    return frames, [1.0 / source_fps] * len(frames)


def limit_pixels(frame: Any, max_pixels: int) -> Any:
    """`frame` downscaled (aspect kept, bicubic) so that width * height <= `max_pixels`; unchanged when it fits."""
    img = frame if isinstance(frame, Image.Image) else Image.fromarray(np.asarray(frame)[..., :3].astype(np.uint8))
    if img.width * img.height <= max_pixels:
        return frame
    scale = math.sqrt(max_pixels / (img.width * img.height))
    size = (max(1, math.floor(img.width * scale)), max(1, math.floor(img.height * scale)))
    return img.resize(size, Image.Resampling.BICUBIC)


def _pick(frames: list[Any], num_frames: int) -> list[Any]:
    if not frames:
        raise InputError("the video has no frames; pass at least one frame")
    return [frames[i] for i in frame_indices(len(frames), num_frames)]


def pool_tokens(x: torch.Tensor, keep: int) -> torch.Tensor:
    """(N, T, D) -> (N, keep, D) by adaptive average pooling: over the square grid when T and keep are squares."""
    n, t, d = x.shape
    side, keep_side = math.isqrt(t), math.isqrt(keep)
    if side * side == t and keep_side * keep_side == keep:
        grid = x.transpose(1, 2).reshape(n, d, side, side)
        return F.adaptive_avg_pool2d(grid, keep_side).flatten(2).transpose(1, 2)
    return F.adaptive_avg_pool1d(x.transpose(1, 2), keep).transpose(1, 2)


class VideoEncoder(Encoder):
    """Video as frames through any image encoder plus a temporal step (mean, Video-ChatGPT pooling, concat)."""

    name: ClassVar[str] = "video"
    Config: ClassVar[type[ComponentConfig]] = VideoEncoderConfig
    modalities_in: ClassVar[tuple[str, ...]] = ("video",)
    out_dim_doc: ClassVar[str] = "the frame encoder's width"
    tokens_doc: ClassVar[str] = ("T = the frame encoder's tokens per image; mean: T; video_chatgpt: num_frames + T; "
                                 "concat: num_frames * (tokens_per_frame or T)")
    example_settings: ClassVar[dict[str, Any]] = {
        "frames": {"type": "open_clip", "arch": None, "embed_dim": 32,
                   "vision_cfg": {"image_size": 32, "patch_size": 8, "layers": 2, "width": 32, "head_width": 16}},
        "num_frames": 4, "temporal": "video_chatgpt"}

    @classmethod
    def frame_encoder(cls, config: VideoEncoderConfig, ctx: BuildContext) -> tuple[type[Encoder], ComponentConfig]:
        """The nested image encoder's class and validated settings."""
        try:
            frame_cls, frame_config = ctx.component("encoder", config.frames)
        except Exception as exc:
            raise ValueError(f"frames: {exc}") from exc
        if "image" not in frame_cls.modalities_in:
            raise ValueError(f"frames: the {frame_cls.name!r} encoder takes {', '.join(frame_cls.modalities_in)}, not "
                             f"images; give an image encoder (e.g. open_clip, hf_vision, timm)")
        return frame_cls, frame_config

    @classmethod
    def describe(cls, config: VideoEncoderConfig, ctx: BuildContext) -> EncoderFacts:
        frame_cls, frame_config = cls.frame_encoder(config, ctx)
        facts = frame_cls.describe(frame_config, ctx)
        per_frame = facts.tokens_for("image")
        return EncoderFacts(out_dim=facts.out_dim, tokens_per_item=cls._count(config, per_frame))

    @staticmethod
    def _count(config: VideoEncoderConfig, per_frame: int) -> int:
        if config.temporal == "mean":
            return per_frame
        if config.temporal == "video_chatgpt":
            return config.num_frames + per_frame
        keep = config.tokens_per_frame or per_frame
        if keep > per_frame:
            raise ValueError(f"tokens_per_frame {keep} is more than the {per_frame} tokens the frame encoder gives per "
                             f"frame; set tokens_per_frame <= {per_frame}")
        return config.num_frames * keep

    def __init__(self, config: VideoEncoderConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        frame_cls, frame_config = self.frame_encoder(config, ctx)
        self.frames = frame_cls(frame_config, ctx)
        self._per_frame = frame_cls.describe(frame_config, ctx).tokens_for("image")
        self._count(config, self._per_frame)  # a bad tokens_per_frame fails here, not at the first forward

    @property
    def out_dim(self) -> int:
        return self.frames.out_dim

    def has_weight_source(self) -> bool:
        return self.frames.has_weight_source()

    def preprocess(self, item: Any, modality: str) -> torch.Tensor:
        cfg = self.config
        frames = load_frames(item, cfg.num_frames, cfg.fps, cfg.source_fps)
        if cfg.max_pixels is not None:
            frames = [limit_pixels(f, cfg.max_pixels) for f in frames]
        out = []
        for i, frame in enumerate(frames):
            try:
                out.append(self.frames.preprocess(frame, "image"))
            except InputError as exc:
                raise InputError(f"video frame {i}: {exc}") from None
        return torch.stack(out)  # (num_frames, C, H, W)

    def forward(self, pixels: torch.Tensor, modality: str) -> torch.Tensor:
        if pixels.ndim < 3 or pixels.shape[1] != self.config.num_frames:
            raise InputError(f"video batch must be (N, {self.config.num_frames}, ...) preprocessed frames "
                             f"(num_frames = {self.config.num_frames}), got {tuple(pixels.shape)}; "
                             f"use this encoder's preprocess")
        n, f = pixels.shape[:2]
        feats = self.frames(pixels.flatten(0, 1), "image")  # (N*F, T, D)
        feats = feats.view(n, f, *feats.shape[1:])  # (N, F, T, D)
        if self.config.temporal == "mean":
            return feats.mean(1)
        if self.config.temporal == "video_chatgpt":
            return torch.cat([feats.mean(2), feats.mean(1)], dim=1)  # (N, F + T, D)
        keep = self.config.tokens_per_frame or feats.shape[2]
        pooled = pool_tokens(feats.flatten(0, 1), keep) if keep != feats.shape[2] else feats.flatten(0, 1)
        return pooled.reshape(n, f * keep, -1)  # (N, F * keep, D)
