"""Audio encoder over transformers' raw-waveform speech models: HuBERT, wav2vec 2.0, WavLM, data2vec-audio.

``config`` alone (a transformers config dict with ``model_type`` one of
``hubert``, ``wav2vec2``, ``wavlm``, ``data2vec-audio``) builds a randomly initialised
model; ``source`` names a local HF folder (a base model or one with a head, e.g.
``...ForCTC``; only the base model is kept) through a weight source, and ``config`` then
overrides fields of its config (e.g. ``apply_spec_augment: false`` to stop time masking
while the encoder trains). Nothing is fetched from a model hub (``local_files_only``).

Input: the item is read at the model's sampling rate (16 kHz; a folder's
``preprocessor_config.json`` may say otherwise) by `mmhub.encoders.audio_io`, cut to
``seconds`` (keeping the start), normalised to zero mean and unit variance over its
real samples when ``normalize`` is on (as ``Wav2Vec2FeatureExtractor`` does; by default
the folder's ``do_normalize``, else on), then padded with zeros to exactly
``round(seconds * rate)`` samples. No attention mask is passed: padding is silence.

Tokens: the convolutional feature extractor maps ``L`` samples through each
``(conv_kernel[i], conv_stride[i])`` as ``L = floor((L - kernel) / stride) + 1``
(20 ms frames for the standard 7-layer stack: 1 s -> 49, 30 s -> 1499), then
``pool`` averages non-overlapping groups of frames: ``floor(frames / pool)`` tokens of
width ``hidden_size``. ``select_layer`` -1 (default) is the model's final output
(``last_hidden_state``); ``k`` in 1..N (or -N..-2 from the end) is transformer block
``k``'s output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from transformers import AutoConfig, AutoModel, PretrainedConfig

from mmhub.encoders.audio_io import fit_to_window, load_audio
from mmhub.encoders.frames import block_index, pool_time
from mmhub.errors import InputError, WeightsNotFoundError
from mmhub.interfaces import BuildContext, ComponentConfig, Encoder, EncoderFacts

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODEL_TYPES = ("hubert", "wav2vec2", "wavlm", "data2vec-audio")


class HFAudioEncoderConfig(ComponentConfig):
    """Settings of `HFAudioEncoder`."""

    config: dict[str, Any] | None = None
    source: str | None = None
    seconds: float = Field(1.0, gt=0)
    select_layer: int = -1
    pool: int = Field(1, ge=1)
    normalize: bool | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @model_validator(mode="after")
    def _needs_something(self) -> "HFAudioEncoderConfig":
        if self.config is None and self.source is None:
            raise ValueError(f"give `config` (a transformers config dict with model_type one of "
                             f"{', '.join(MODEL_TYPES)}) "
                             f"or `source` (a local HF folder)")
        if self.source is None and "model_type" not in (self.config or {}):
            raise ValueError(f"`config` needs a model_type ({', '.join(MODEL_TYPES)}) when there is no source")
        if self.select_layer == 0:
            raise ValueError("select_layer counts blocks from 1 (or from the end with negatives; -1 is the final "
                             "output); 0 is not a block")
        return self


def conv_frames(samples: int, kernels: Any, strides: Any) -> int:
    """Frames the convolutional feature extractor emits for `samples` samples (transformers' own formula)."""
    n = samples
    for k, s in zip(kernels, strides, strict=True):
        n = (n - k) // s + 1
    return n


def _folder(config: HFAudioEncoderConfig, ctx: BuildContext) -> Path | None:
    if config.source is None:
        return None
    path = ctx.weights(config.source)
    if not (path.is_dir() and (path / "config.json").is_file()):
        raise WeightsNotFoundError(f"{path} is not a HF model folder (a folder with config.json); "
                                   "point `source` at one.")
    return path


def _hf_config(config: HFAudioEncoderConfig, ctx: BuildContext) -> tuple[PretrainedConfig, Path | None]:
    folder = _folder(config, ctx)
    settings = dict(config.config or {})
    if folder is None:
        cfg = AutoConfig.for_model(settings.pop("model_type"), **settings)
    else:
        settings.pop("model_type", None)
        cfg = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        for k, v in settings.items():
            setattr(cfg, k, v)
    if cfg.model_type not in MODEL_TYPES:
        raise ValueError(f"model_type {cfg.model_type!r} is not a raw-waveform speech encoder this component "
                         f"handles ({', '.join(MODEL_TYPES)}); Whisper models use the `whisper` encoder")
    if getattr(cfg, "add_adapter", False):
        raise ValueError("add_adapter: true (wav2vec2's output adapter) is not supported: it changes the width and "
                         "frame rate of the last layer only; set add_adapter: false")
    return cfg, folder


def _preprocessing(folder: Path | None) -> dict[str, Any]:
    if folder is not None and (folder / "preprocessor_config.json").is_file():
        return json.loads((folder / "preprocessor_config.json").read_text(encoding="utf-8"))
    return {}



class HFAudioEncoder(Encoder):
    """HuBERT / wav2vec 2.0 / WavLM / data2vec-audio encoders (transformers): 16 kHz waveform -> 20 ms features."""

    name: ClassVar[str] = "hf_audio"
    Config: ClassVar[type[ComponentConfig]] = HFAudioEncoderConfig
    published_weights: ClassVar[bool] = True  # loads the published transformers tower in `source` (preset status)
    modalities_in: ClassVar[tuple[str, ...]] = ("audio",)
    library: ClassVar[str] = "transformers"
    out_dim_doc: ClassVar[str] = "the model's hidden_size (768 base, 1024 large)"
    tokens_doc: ClassVar[str] = ("conv frames of round(seconds*rate) samples (each conv: (L-kernel)//stride+1; "
                                 "49 per second for the standard stack) // pool")
    example_settings: ClassVar[dict[str, Any]] = {
        "config": {"model_type": "hubert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                   "intermediate_size": 64, "conv_dim": [16, 16], "conv_kernel": [10, 3], "conv_stride": [5, 2],
                   "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 2},
        "seconds": 1.0, "pool": 4}

    @classmethod
    def describe(cls, config: HFAudioEncoderConfig, ctx: BuildContext) -> EncoderFacts:
        cfg, folder = _hf_config(config, ctx)
        block_index(config.select_layer, cfg.num_hidden_layers)
        rate = int(_preprocessing(folder).get("sampling_rate", 16000))
        samples = round(config.seconds * rate)
        frames = conv_frames(samples, cfg.conv_kernel, cfg.conv_stride)
        if frames // config.pool < 1:
            raise ValueError(f"seconds {config.seconds} gives {samples} samples = {max(frames, 0)} frames, fewer than "
                             f"pool {config.pool}; use a longer window or a smaller pool")
        return EncoderFacts(out_dim=cfg.hidden_size, tokens_per_item=frames // config.pool)

    def __init__(self, config: HFAudioEncoderConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        cfg, folder = _hf_config(config, ctx)
        self.blocks = block_index(config.select_layer, cfg.num_hidden_layers)
        # transformers picks SDPA where the family supports it (WavLM does not); eager only when asked
        kw: dict[str, Any] = {"attn_implementation": "eager"} if ctx.attention == "eager" else {}
        if folder is None:
            self.model = AutoModel.from_config(cfg, **kw)
        else:
            self.model = AutoModel.from_pretrained(str(folder), config=cfg, local_files_only=True, **kw)
        self.model.to(DTYPES[config.dtype])
        pre = _preprocessing(folder)
        self.rate = int(pre.get("sampling_rate", 16000))
        self.window = round(config.seconds * self.rate)
        self.normalize = config.normalize if config.normalize is not None else bool(pre.get("do_normalize", True))
        self._out_dim = cfg.hidden_size

    def has_weight_source(self) -> bool:
        return self.config.source is not None

    @property
    def out_dim(self) -> int:
        return self._out_dim

    def preprocess(self, item: Any, modality: str) -> torch.Tensor:
        wave = load_audio(item, self.rate)[: self.window]
        if self.normalize:
            wave = (wave - wave.mean()) / np.sqrt(wave.var() + 1e-7)
        return torch.from_numpy(fit_to_window(wave.astype(np.float32), self.window))  # (window,)

    def forward(self, waves: torch.Tensor, modality: str) -> torch.Tensor:
        if waves.ndim != 2 or waves.shape[1] != self.window:
            raise InputError(f"{self.name} takes (N, {self.window}) waveform batches from its own `preprocess`; "
                             f"got {tuple(waves.shape)}")
        x = waves.to(next(self.model.parameters()).dtype)
        if self.config.select_layer == -1:
            h = self.model(x).last_hidden_state
        else:
            h = self.model(x, output_hidden_states=True).hidden_states[self.blocks]
        h = pool_time(h, self.config.pool)
        return h  # (N, frames // pool, hidden_size)
