"""ImageBind (Girdhar et al. 2023): one trunk per modality, each bound to a joint embedding space.

PandaGPT, NExT-GPT and CoDi-2 read every modality through ImageBind-huge, Video-LLaMA and BuboGPT its audio side.
This encoder is ImageBind's own structure (`mmhub.encoders.imagebind_parts`, under the official checkpoint's key
names): a vision trunk (ViT-H, 1280 wide, 32 blocks, 16 heads in imagebind_huge) for images and video, an audio
trunk (768 wide, 12 blocks, 12 heads) over 128-bin log-mel patches (16 x 16 every 10), and, when listed in
``trunks``, the depth, thermal and IMU trunks; each with its preprocessor, head and post-processor. The sizes of each
trunk are settings, so a test builds it at tiny width. ImageBind's text tower is not built (no MM-LLM here reads it).

``pretrained`` loads ImageBind weights by name: the published ``imagebind_huge.pth`` itself (a plain state dict,
read with ``weights_only=True``) or the safetensors file `mmhub.importers.convert_imagebind` writes from it; the
text tower's and any trunk's keys that ``trunks`` leaves out are set aside, every other tensor must fit exactly.

Inputs (``preprocess``), as ImageBind's ``data.py``:

* image: anything `mmhub.media.load_image` reads; resized (shortest side, bicubic) to ``image_size``, centre-cropped,
  CLIP mean/std; the vision stem repeats it to a 2-frame clip;
* video: ``num_frames`` frames (even) as the ``video`` encoder samples them, the same transform per frame, cut into
  ``num_frames / 2`` clips of 2 frames, each through the vision trunk on its own (ImageBind's clips);
* audio: what `mmhub.encoders.audio_io.load_audio` reads, resampled to ``sample_rate``, its first ``clip_seconds``
  (ImageBind: 2 s clips at 16 kHz; it averages the embeddings of 3 clips of a longer recording: embed the clips as
  separate items for that) -> `mmhub.encoders.imagebind_audio` (Kaldi fbank, ``target_length`` frames, normalised);
* depth / thermal (not a media type mmhub loads): a prepared (image_size, image_size) map, or (1, S, S), as ImageBind
  was trained on (disparity / thermal intensity); IMU: a prepared (6, ``imu_length``) array.

Output: ``output: pooled`` gives ImageBind's embedding itself (head, then post-processor: L2-normalised, audio scaled
by 20 and so on; video the mean of its clips' embeddings), one token of ``out_embed_dim``; ``output: tokens`` gives
every patch token (CLS left out) through the head's LayerNorm and projection, ``out_embed_dim`` wide (ImageBind's
head itself keeps only the CLS token: this is the token-level read-out MM-LLMs feed a Q-Former or projector).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from mmhub.encoders.audio_io import load_audio
from mmhub.encoders.imagebind_audio import fbank_frames, waveform_to_melspec
from mmhub.encoders.imagebind_parts import (
    IMU_CHANNELS,
    IMUPreprocessor,
    PatchPreprocessor,
    PatchStem,
    RepeatTo2Frames,
    Trunk,
    head,
    postprocessor,
)
from mmhub.encoders.video_encoder import load_frames
from mmhub.errors import InputError, WeightsNotFoundError
from mmhub.interfaces import BuildContext, ComponentConfig, Encoder, EncoderFacts
from mmhub.media import load_image
from mmhub.weights import load_into, read_state_dict

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
TRUNKS = ("vision", "audio", "depth", "thermal", "imu")
MODALITIES = ("image", "video", "audio")  # the media types mmhub loads; depth, thermal and imu take prepared tensors
TRUNK_OF = {"image": "vision", "video": "vision", "audio": "audio", "depth": "depth", "thermal": "thermal",
            "imu": "imu"}
PARTS = ("modality_preprocessors", "modality_trunks", "modality_heads", "modality_postprocessors")


class TrunkSize(BaseModel):
    """One trunk's size (ImageBind's ``<m>_embed_dim``, ``<m>_num_blocks``, ``<m>_num_heads``)."""

    model_config = ConfigDict(extra="forbid")
    embed_dim: int = Field(ge=1)
    num_blocks: int = Field(ge=0)
    num_heads: int = Field(ge=1)


class ImageBindConfig(ComponentConfig):
    """Settings of `ImageBindEncoder`; the defaults are imagebind_huge's."""

    trunks: tuple[Literal["vision", "audio", "depth", "thermal", "imu"], ...] = ("vision", "audio")
    vision: TrunkSize = TrunkSize(embed_dim=1280, num_blocks=32, num_heads=16)
    audio: TrunkSize = TrunkSize(embed_dim=768, num_blocks=12, num_heads=12)
    depth: TrunkSize = TrunkSize(embed_dim=384, num_blocks=12, num_heads=8)
    thermal: TrunkSize = TrunkSize(embed_dim=768, num_blocks=12, num_heads=12)
    imu: TrunkSize = TrunkSize(embed_dim=512, num_blocks=6, num_heads=8)
    out_embed_dim: int = Field(1024, ge=1)
    image_size: int = Field(224, ge=1)
    patch_size: int = Field(14, ge=1, description="the vision stem's 2 x p x p kernel (and stride)")
    num_frames: int = Field(2, ge=2, description="video frames per item; even (2-frame clips)")
    sample_rate: int = Field(16000, ge=1000)
    clip_seconds: float = Field(2.0, gt=0)
    mel_bins: int = Field(128, ge=1)
    target_length: int = Field(204, ge=1, description="log-mel frames per clip (cut or zero-padded)")
    audio_kernel: int = Field(16, ge=1)
    audio_stride: int = Field(10, ge=1)
    depth_kernel: int = Field(16, ge=1)
    thermal_kernel: int = Field(16, ge=1)
    imu_kernel: int = Field(8, ge=1)
    imu_length: int = Field(2000, ge=1)
    output: Literal["tokens", "pooled"] = "tokens"
    pretrained: str | None = None

    @model_validator(mode="after")
    def _sizes(self) -> "ImageBindConfig":
        if self.num_frames % 2:
            raise ValueError(f"num_frames {self.num_frames} must be even: ImageBind reads video as 2-frame clips")
        if not self.trunks:
            raise ValueError("trunks is empty; list at least one of vision, audio, depth, thermal, imu")
        for name in self.trunks:
            size: TrunkSize = getattr(self, name)
            if size.embed_dim % size.num_heads:
                raise ValueError(f"{name}: embed_dim {size.embed_dim} is not divisible by num_heads "
                                 f"{size.num_heads}")
        if self.image_size < max(self.patch_size, self.depth_kernel, self.thermal_kernel):
            raise ValueError(f"image_size {self.image_size} is smaller than one patch")
        if min(self.mel_bins, self.target_length) < self.audio_kernel:
            raise ValueError(f"the {self.mel_bins} x {self.target_length} log-mel spectrogram is smaller than one "
                             f"{self.audio_kernel} x {self.audio_kernel} audio patch")
        if self.imu_length < self.imu_kernel:
            raise ValueError(f"imu_length {self.imu_length} is shorter than one IMU window of {self.imu_kernel}")
        return self


def _grid(size: int, kernel: int, stride: int) -> int:
    return (size - kernel) // stride + 1


def patch_counts(config: ImageBindConfig) -> dict[str, int]:
    """Patch tokens (CLS left out) per image / 2-frame clip, audio clip, depth or thermal map, IMU recording."""
    s = config.image_size
    return {"vision": _grid(s, config.patch_size, config.patch_size) ** 2,
            "audio": _grid(config.mel_bins, config.audio_kernel, config.audio_stride)
            * _grid(config.target_length, config.audio_kernel, config.audio_stride),
            "depth": _grid(s, config.depth_kernel, config.depth_kernel) ** 2,
            "thermal": _grid(s, config.thermal_kernel, config.thermal_kernel) ** 2,
            "imu": config.imu_length // config.imu_kernel}


def split_official(state: dict[str, torch.Tensor], trunks: tuple[str, ...]
                   ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """An ImageBind state dict -> (the tensors of `trunks`, the keys set aside: the text tower's and other trunks').
    Keys outside ImageBind's four module groups are kept, so that loading names them as unexpected."""
    kept, dropped = {}, []
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] in PARTS and len(parts) > 1 and parts[1] not in trunks:
            dropped.append(key)
        else:
            kept[key] = value
    return kept, dropped


class ImageBindEncoder(Encoder):
    """ImageBind: per-modality preprocessors, trunks, heads and post-processors under the official key names."""

    name: ClassVar[str] = "imagebind"
    Config: ClassVar[type[ComponentConfig]] = ImageBindConfig
    modalities_in: ClassVar[tuple[str, ...]] = MODALITIES
    # `pretrained` reads the published imagebind_huge.pth layout (or its safetensors copy) by name; the key layout
    # and the trunks' arithmetic are tested against ImageBind's equations on a state dict in that layout
    published_weights: ClassVar[bool] = True
    out_dim_doc: ClassVar[str] = "out_embed_dim (ImageBind's joint space)"
    tokens_doc: ClassVar[str] = ("pooled: 1; tokens: image (image_size/patch_size)^2, video num_frames/2 times that, "
                                 "audio the audio_kernel patches every audio_stride of the mel_bins x target_length "
                                 "log-mel spectrogram (228 for ImageBind's 128 x 204)")
    example_settings: ClassVar[dict[str, Any]] = {
        "vision": {"embed_dim": 32, "num_blocks": 2, "num_heads": 2},
        "audio": {"embed_dim": 32, "num_blocks": 2, "num_heads": 2},
        "out_embed_dim": 24, "image_size": 28, "patch_size": 14, "num_frames": 4, "clip_seconds": 1.0,
        "mel_bins": 32, "target_length": 100, "audio_stride": 16}

    @classmethod
    def describe(cls, config: ImageBindConfig, ctx: BuildContext) -> EncoderFacts:
        if config.pretrained is not None:
            ctx.weights(config.pretrained)
        if config.output == "pooled":
            counts = dict.fromkeys(MODALITIES, 1)
        else:
            n = patch_counts(config)
            counts = {"image": n["vision"], "video": config.num_frames // 2 * n["vision"], "audio": n["audio"]}
        return EncoderFacts(out_dim=config.out_embed_dim, tokens_per_item=counts["image"], tokens_by_modality=counts)

    def __init__(self, config: ImageBindConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        n = patch_counts(config)
        pre, trunks, heads, post = {}, {}, {}, {}
        for name in config.trunks:
            size: TrunkSize = getattr(config, name)
            w = size.embed_dim
            if name == "vision":
                p = config.patch_size
                stem = PatchStem(nn.Sequential(RepeatTo2Frames(), nn.Conv3d(3, w, (2, p, p), (2, p, p), bias=False)))
                pre[name] = PatchPreprocessor(stem, n[name], w)
            elif name == "imu":
                pre[name] = IMUPreprocessor(config.imu_kernel, config.imu_length, w)
            else:
                k = config.audio_kernel if name == "audio" else getattr(config, f"{name}_kernel")
                stride = config.audio_stride if name == "audio" else k
                stem = PatchStem(nn.Conv2d(1, w, k, stride, bias=False), nn.LayerNorm(w))
                pre[name] = PatchPreprocessor(stem, n[name], w, "depth_stem" if name == "depth" else "rgbt_stem")
            trunks[name] = Trunk(w, size.num_blocks, size.num_heads, pre_ln=name == "vision",
                                 bias_kv=name != "vision", backend=ctx.attention)
            heads[name] = head(w, config.out_embed_dim, dropout=name == "imu")
            post[name] = postprocessor(name)
        self.modality_preprocessors = nn.ModuleDict(pre)
        self.modality_trunks = nn.ModuleDict(trunks)
        self.modality_heads = nn.ModuleDict(heads)
        self.modality_postprocessors = nn.ModuleDict(post)
        # torchvision imports torch._dynamo (~1.5 s): only when a transform is built
        from torchvision import transforms as T

        self.transform = T.Compose([T.Resize(config.image_size, interpolation=T.InterpolationMode.BICUBIC),
                                    T.CenterCrop(config.image_size), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
        if config.pretrained is not None:
            self.load_official(read_state_dict(ctx.weights(config.pretrained)), what=config.pretrained)

    def load_official(self, state: dict[str, torch.Tensor], what: str = "ImageBind weights") -> list[str]:
        """Load an ImageBind state dict (official key names) strictly into the built trunks; returns the keys set
        aside (the text tower's, and those of trunks not in ``trunks``)."""
        kept, dropped = split_official(state, self.config.trunks)
        own = self.state_dict()
        wrong = [f"{k} {tuple(v.shape)} (the model's is {tuple(own[k].shape)})" for k, v in kept.items()
                 if k in own and tuple(v.shape) != tuple(own[k].shape)]
        if wrong:
            raise WeightsNotFoundError(f"imagebind weights {what}: {len(wrong)} tensor(s) do not fit this encoder's "
                                       f"sizes, e.g. {'; '.join(wrong[:3])}; set the trunk sizes (vision, audio, "
                                       f"...: embed_dim, num_blocks) and image_size / mel_bins / target_length to "
                                       f"the checkpoint's")
        load_into(self, kept, what=f"imagebind weights {what}")
        return dropped

    @property
    def out_dim(self) -> int:
        return self.config.out_embed_dim

    def has_weight_source(self) -> bool:
        return self.config.pretrained is not None

    def _trunk(self, modality: str) -> str:
        if modality not in TRUNK_OF:
            raise InputError(f"imagebind takes {', '.join(TRUNK_OF)}, not {modality!r}")
        trunk = TRUNK_OF[modality]
        if trunk not in self.config.trunks:
            raise InputError(f"this imagebind encoder has no {trunk} trunk for {modality} (trunks: "
                             f"{', '.join(self.config.trunks)}); add {trunk!r} to its trunks setting")
        return trunk

    def preprocess(self, item: Any, modality: str) -> torch.Tensor:
        self._trunk(modality)
        cfg = self.config
        if modality == "image":
            return self.transform(load_image(item))  # (3, S, S)
        if modality == "video":
            out = []
            for i, frame in enumerate(load_frames(item, cfg.num_frames)):
                try:
                    out.append(self.transform(load_image(frame)))
                except InputError as exc:
                    raise InputError(f"video frame {i}: {exc}") from None
            return torch.stack(out)  # (F, 3, S, S)
        if modality == "audio":
            wave = load_audio(item, cfg.sample_rate)[: int(round(cfg.clip_seconds * cfg.sample_rate))]
            if fbank_frames(len(wave), cfg.sample_rate) == 0:
                raise InputError(f"the audio clip has {len(wave)} samples, less than one 25 ms window at "
                                 f"{cfg.sample_rate} Hz; give at least {int(0.025 * cfg.sample_rate)} samples")
            return waveform_to_melspec(wave, cfg.sample_rate, cfg.mel_bins, cfg.target_length)
        x = torch.as_tensor(item, dtype=torch.float32)
        if modality in ("depth", "thermal") and x.ndim == 2:
            x = x[None]
        return x

    def _expected(self, modality: str) -> tuple[int, ...]:
        cfg, s = self.config, self.config.image_size
        return {"image": (3, s, s), "video": (cfg.num_frames, 3, s, s), "audio": (1, cfg.mel_bins, cfg.target_length),
                "depth": (1, s, s), "thermal": (1, s, s), "imu": (IMU_CHANNELS, cfg.imu_length)}[modality]

    def forward(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        trunk = self._trunk(modality)
        want = self._expected(modality)
        if tuple(x.shape[1:]) != want:
            raise InputError(f"{modality} batch must be (N, {', '.join(map(str, want))}), got {tuple(x.shape)}; "
                             f"use this encoder's preprocess")
        n, clips = x.shape[0], 1
        x = x.to(self.modality_preprocessors[trunk].cls_token.dtype)
        if modality == "video":  # (N, F, 3, S, S) -> (N * F/2, 3, 2, S, S): each 2-frame clip on its own
            clips = x.shape[1] // 2
            x = x.reshape(n * clips, 2, *x.shape[2:]).transpose(1, 2)
        h = self.modality_trunks[trunk](self.modality_preprocessors[trunk](x))  # (N * clips, 1 + T, width)
        head_ = self.modality_heads[trunk]
        if self.config.output == "tokens":
            tokens = head_[-1](head_[0](h[:, 1:]))  # the head's LayerNorm and projection on every patch token
            return tokens.reshape(n, clips * tokens.shape[1], -1)
        emb = self.modality_postprocessors[trunk](head_(h))  # (N * clips, out_embed_dim)
        return emb.reshape(n, clips, -1).mean(1, keepdim=True)  # (N, 1, out_embed_dim); clips averaged
