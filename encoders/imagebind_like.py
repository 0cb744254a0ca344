"""ImageBind-like encoder: one module for image, video and audio with a shared transformer trunk.

PandaGPT, NExT-GPT and CoDi-2 read every modality through ImageBind (Video-LLaMA and
BuboGPT its audio side). ImageBind's real weights are not available here, so this
encoder is built from its settings (random weights) with ImageBind's structure, and
``pretrained`` (a local safetensors/state-dict file through a weight source) loads
converted weights into it by name; a plugin can also register a real ImageBind
under its own name. A spec shares one instance across modalities with
``encoders: {image: {type: imagebind_like, ...}, audio: image, video: image}``.

* stems (one per modality, each with its own CLS token and learned positions):
  image: a ``patch_size`` patch embedding (Conv2d); video: 2-frame x ``patch_size``
  tubelets (a Conv3d with time kernel 2, as ImageBind's vision stem) over
  ``num_frames`` frames; audio: a ``mel_bins``-bin log-mel spectrogram (25 ms windows,
  10 ms hop, Kaldi-style framing: per-frame DC removal, 0.97 pre-emphasis, Hann
  window, HTK mel scale from 20 Hz to Nyquist; not bit-identical to Kaldi's fbank),
  normalised with ImageBind's AudioSet statistics, cut into ``audio_patch`` squares
  every ``audio_stride`` bins/frames (ImageBind: 16 every 10, overlapping) by a Conv2d;
* a shared trunk of ``depth`` pre-norm transformer blocks (`mmhub.attention`);
* heads (one per modality): LayerNorm + Linear to the common ``embed_dim``.

ImageBind itself gives each modality its own trunk (ViT-H for vision, a smaller ViT
for audio) and feeds an image to its Conv3d stem repeated to 2 frames. So converted
ImageBind weights fit here as follows: the vision trunk into ``trunk``, the image
stem's Conv3d kernel summed over time into ``stems.image`` (exact for a repeated
image), and the audio side only when it is retrained or distilled onto the shared
trunk; an exact ImageBind with separate trunks belongs in a plugin.

``output: tokens`` gives every patch token through the head (the CLS token left out);
``output: pooled`` gives one token, the head of the CLS token, L2-normalised like
ImageBind's embeddings when ``normalize`` is on.

Items: image: anything `mmhub.media.load_image` reads (resized on the shortest side
with bicubic, centre-cropped, CLIP mean/std as ImageBind); video: what the ``video``
encoder takes (a frame list, a (F, H, W, 3) array, an animated GIF), ``num_frames``
frames sampled as there; audio: what `mmhub.encoders.audio_io.load_audio` reads (a
1-D array at ``sample_rate``, an ``(array, rate)`` pair, a ``.wav`` path or its bytes),
cut to its first ``clip_seconds`` or padded with silence at the end (ImageBind uses
2 s clips at 16 kHz, and averages the embeddings of several clips of a longer
recording: embed the clips as separate items for that).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from mmhub.encoders.audio_io import fit_to_window, load_audio
from mmhub.encoders.point_encoder import TransformerBlock
from mmhub.encoders.video_encoder import load_frames
from mmhub.errors import InputError
from mmhub.interfaces import BuildContext, ComponentConfig, Encoder, EncoderFacts
from mmhub.media import load_image
from mmhub.weights import load_into, read_state_dict

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
AUDIO_MEAN, AUDIO_STD = -4.268, 9.138  # ImageBind's AudioSet log-mel statistics (it divides by 2 * std)
MODALITIES = ("image", "video", "audio")


class ImageBindLikeConfig(ComponentConfig):
    """Settings of `ImageBindLike`."""

    image_size: int = Field(224, ge=1)
    patch_size: int = Field(14, ge=1)
    num_frames: int = Field(2, ge=2, description="video frames per item; even (2-frame tubelets)")
    sample_rate: int = Field(16000, ge=1000)
    clip_seconds: float = Field(2.0, gt=0)
    mel_bins: int = Field(128, ge=1)
    audio_patch: int = Field(16, ge=1)
    audio_stride: int = Field(10, ge=1)
    width: int = Field(768, ge=1)
    depth: int = Field(12, ge=0)
    heads: int = Field(12, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    embed_dim: int = Field(1024, ge=1)
    output: Literal["tokens", "pooled"] = "tokens"
    normalize: bool = True
    pretrained: str | None = None

    @model_validator(mode="after")
    def _sizes(self) -> "ImageBindLikeConfig":
        if self.num_frames % 2:
            raise ValueError(f"num_frames {self.num_frames} must be even: video is cut into 2-frame tubelets")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        frames = audio_frames(self)
        if frames < self.audio_patch or self.mel_bins < self.audio_patch:
            raise ValueError(f"the {self.clip_seconds} s clip gives a {self.mel_bins} x {frames} log-mel spectrogram, "
                             f"smaller than one {self.audio_patch} x {self.audio_patch} audio patch; lengthen "
                             f"clip_seconds or shrink audio_patch")
        return self


def _framing(sample_rate: int) -> tuple[int, int, int]:
    """(window, hop, n_fft) in samples: 25 ms windows every 10 ms, FFT size the next power of two."""
    win, hop = int(round(0.025 * sample_rate)), int(round(0.010 * sample_rate))
    return win, hop, 1 << (win - 1).bit_length()


def audio_frames(config: ImageBindLikeConfig) -> int:
    """Log-mel frames of one clip."""
    win, hop, _ = _framing(config.sample_rate)
    samples = int(round(config.clip_seconds * config.sample_rate))
    return 0 if samples < win else 1 + (samples - win) // hop


def token_counts(config: ImageBindLikeConfig) -> dict[str, int]:
    """Patch tokens per item of each modality (without the CLS token)."""
    grid = (config.image_size // config.patch_size) ** 2
    p, s = config.audio_patch, config.audio_stride
    audio = ((config.mel_bins - p) // s + 1) * ((audio_frames(config) - p) // s + 1)
    return {"image": grid, "video": config.num_frames // 2 * grid, "audio": audio}


def mel_filterbank(n_mels: int, n_fft: int, sample_rate: int, f_min: float = 20.0) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) triangular filters, equally spaced on the HTK mel scale from f_min to Nyquist."""
    def mel(f: Any) -> np.ndarray:
        return 1127.0 * np.log1p(np.asarray(f, dtype=np.float64) / 700.0)

    edges = np.linspace(mel(f_min), mel(sample_rate / 2), n_mels + 2)
    bins = mel(np.arange(n_fft // 2 + 1) * sample_rate / n_fft)[None, :]
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    fb = np.maximum(0.0, np.minimum((bins - left) / (centre - left), (right - bins) / (right - centre)))
    return torch.from_numpy(fb.astype(np.float32))


def log_mel(wave_: torch.Tensor, config: ImageBindLikeConfig, filterbank: torch.Tensor) -> torch.Tensor:
    """(samples,) mono waveform in [-1, 1] -> (mel_bins, frames) normalised log-mel spectrogram."""
    win, hop, n_fft = _framing(config.sample_rate)
    frames = wave_.unfold(0, win, hop)  # (frames, win)
    frames = frames - frames.mean(1, keepdim=True)  # DC offset
    frames = torch.cat([frames[:, :1] * 0.03, frames[:, 1:] - 0.97 * frames[:, :-1]], dim=1)  # pre-emphasis
    frames = frames * torch.hann_window(win, periodic=False, dtype=frames.dtype)
    power = torch.fft.rfft(frames, n=n_fft).abs().pow(2)  # (frames, n_fft // 2 + 1)
    mel = (power @ filterbank.T).clamp_min(torch.finfo(torch.float32).eps).log()  # (frames, mel_bins)
    return ((mel - AUDIO_MEAN) / (2 * AUDIO_STD)).T


class _Stem(nn.Module):
    """Patchify (a conv) -> tokens, then a CLS token and learned positions."""

    def __init__(self, conv: nn.Module, tokens: int, width: int, norm: bool = False):
        super().__init__()
        self.conv = conv
        self.norm = nn.LayerNorm(width) if norm else nn.Identity()
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, width) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.conv(x).flatten(2).transpose(1, 2))  # (N, T, width)
        return torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos


class ImageBindLike(Encoder):
    """ImageBind-style image/video/audio encoder: per-modality stems and heads around one shared transformer trunk."""

    name: ClassVar[str] = "imagebind_like"
    Config: ClassVar[type[ComponentConfig]] = ImageBindLikeConfig
    modalities_in: ClassVar[tuple[str, ...]] = MODALITIES
    out_dim_doc: ClassVar[str] = "embed_dim (the common space of all modalities)"
    tokens_doc: ClassVar[str] = ("pooled: 1; tokens: image (image_size/patch_size)^2, video num_frames/2 times that, "
                                 "audio the audio_patch patches of the mel_bins x frames log-mel spectrogram")
    example_settings: ClassVar[dict[str, Any]] = {
        "image_size": 32, "patch_size": 8, "num_frames": 4, "clip_seconds": 1.0, "mel_bins": 32, "audio_patch": 16,
        "audio_stride": 16, "width": 32, "depth": 2, "heads": 2, "embed_dim": 24}

    @classmethod
    def describe(cls, config: ImageBindLikeConfig, ctx: BuildContext) -> EncoderFacts:
        if config.pretrained is not None:
            ctx.weights(config.pretrained)
        counts = {m: 1 for m in MODALITIES} if config.output == "pooled" else token_counts(config)
        return EncoderFacts(out_dim=config.embed_dim, tokens_per_item=counts["image"], tokens_by_modality=counts)

    def __init__(self, config: ImageBindLikeConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        w, p, counts = config.width, config.patch_size, token_counts(config)
        self.stems = nn.ModuleDict({
            "image": _Stem(nn.Conv2d(3, w, p, stride=p, bias=False), counts["image"], w),
            "video": _Stem(nn.Conv3d(3, w, (2, p, p), stride=(2, p, p), bias=False), counts["video"], w),
            "audio": _Stem(nn.Conv2d(1, w, config.audio_patch, stride=config.audio_stride, bias=False),
                           counts["audio"], w, norm=True),
        })
        self.trunk = nn.ModuleList(TransformerBlock(w, config.heads, config.mlp_ratio, ctx.attention)
                                   for _ in range(config.depth))
        self.heads = nn.ModuleDict({m: nn.Sequential(nn.LayerNorm(w), nn.Linear(w, config.embed_dim, bias=False))
                                    for m in MODALITIES})
        win, hop, n_fft = _framing(config.sample_rate)
        self.register_buffer("filterbank", mel_filterbank(config.mel_bins, n_fft, config.sample_rate), persistent=False)
        # torchvision imports torch._dynamo (~1.5 s): only when a transform is built
        from torchvision import transforms as T

        self.transform = T.Compose([T.Resize(config.image_size, interpolation=T.InterpolationMode.BICUBIC),
                                    T.CenterCrop(config.image_size), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
        if config.pretrained is not None:
            load_into(self, read_state_dict(ctx.weights(config.pretrained)),
                      what=f"imagebind_like weights {config.pretrained}")

    @property
    def out_dim(self) -> int:
        return self.config.embed_dim

    def has_weight_source(self) -> bool:
        return self.config.pretrained is not None

    def _check(self, modality: str) -> None:
        if modality not in MODALITIES:
            raise InputError(f"imagebind_like takes {', '.join(MODALITIES)}, not {modality!r}")

    def preprocess(self, item: Any, modality: str) -> torch.Tensor:
        self._check(modality)
        if modality == "image":
            return self.transform(load_image(item))  # (3, S, S)
        if modality == "video":
            out = []
            for i, frame in enumerate(load_frames(item, self.config.num_frames)):
                try:
                    out.append(self.transform(load_image(frame)))
                except InputError as exc:
                    raise InputError(f"video frame {i}: {exc}") from None
            return torch.stack(out)  # (F, 3, S, S)
        cfg = self.config
        wave_ = fit_to_window(load_audio(item, cfg.sample_rate), int(round(cfg.clip_seconds * cfg.sample_rate)))
        return log_mel(torch.from_numpy(wave_), cfg, self.filterbank)[None]  # (1, mel_bins, frames)

    def forward(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        self._check(modality)
        cfg = self.config
        want = {"image": (3, cfg.image_size, cfg.image_size),
                "video": (cfg.num_frames, 3, cfg.image_size, cfg.image_size),
                "audio": (1, cfg.mel_bins, audio_frames(cfg))}[modality]
        if tuple(x.shape[1:]) != want:
            raise InputError(f"{modality} batch must be (N, {', '.join(map(str, want))}), got {tuple(x.shape)}; "
                             f"use this encoder's preprocess")
        x = x.to(self.stems[modality].pos.dtype)
        if modality == "video":
            x = x.transpose(1, 2)  # (N, 3, F, S, S) for the Conv3d
        h = self.stems[modality](x)  # (N, 1 + T, width)
        for block in self.trunk:
            h = block(h)
        if cfg.output == "pooled":
            out = self.heads[modality](h[:, :1])
            return F.normalize(out, dim=-1) if cfg.normalize else out  # (N, 1, embed_dim)
        return self.heads[modality](h[:, 1:])  # (N, T, embed_dim)
