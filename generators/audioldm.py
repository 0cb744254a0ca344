"""AudioLDM as an audio generator (the audio output of NExT-GPT / CoDi-style any-to-any models).

diffusers' ``AudioLDMPipeline``: a ``UNet2DConditionModel`` denoises ``AutoencoderKL`` latents of a
mel spectrogram, conditioned not by cross-attention but through its class embedding
(``class_embed_type: simple_projection``) on one pooled, L2-normalised CLAP text vector
(transformers ``ClapTextModelWithProjection``); a ``SpeechT5HifiGan`` vocoder turns the spectrogram
into a waveform. The conditioning is therefore (N, 1, projection_dim): cond_len 1, cond_dim the CLAP
projection width (512 for cvssp/audioldm), which must equal the UNet's
``projection_class_embeddings_input_dim``.

``source`` (a local diffusers AudioLDM folder) and ``config`` (tiny random build; captions through
mmhub's byte tokenizer) work as in `StableDiffusionGenerator`. ``audio_length_s`` defaults to the
UNet's sample_size x VAE factor spectrogram frames. diffusers marks this pipeline deprecated (it logs
a warning when built) but still ships it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import Field

from mmhub.errors import InputError
from mmhub.generators.common import (
    DiffusersGenerator,
    DiffusersGeneratorConfig,
    Parts,
    build_model,
    byte_token_ids,
    byte_tokenizer,
    check_latent_channels,
    fill,
    fill_sample_size,
    merged,
    vae_factor,
)
from mmhub.interfaces import Audio, GeneratorFacts

TEXT_TOKENS = 16  # caption tokens of the tiny CLAP text encoder
TINY: dict[str, Any] = {
    "sample_size": 16,
    "unet": {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4, "attention_head_dim": 2,
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
             "class_embed_type": "simple_projection", "class_embeddings_concat": True},
    "vae": {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4, "latent_channels": 4,
            "in_channels": 1, "out_channels": 1, "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"]},
    "text_encoder": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "projection_dim": 8},
    "vocoder": {"model_in_dim": 8, "sampling_rate": 16000, "upsample_initial_channel": 16, "upsample_rates": [2, 2],
                "upsample_kernel_sizes": [4, 4], "resblock_kernel_sizes": [3], "resblock_dilation_sizes": [[1, 3]],
                "normalize_before": False},
}


class AudioParts(Parts):
    """``config:`` of `AudioLDMGenerator`: the parts of `Parts` plus the vocoder (SpeechT5HifiGanConfig keywords)."""

    vocoder: dict[str, Any] = {}


class AudioLDMConfig(DiffusersGeneratorConfig):
    """Settings of `AudioLDMGenerator`."""

    config: AudioParts | None = Field(None, description="build from config with random weights: per-part overrides")
    steps: int = Field(10, ge=1)
    guidance_scale: float = Field(2.5, ge=0.0)
    audio_length_s: float | None = Field(None, gt=0, description="clip length; default: the UNet's sample size")


class AudioLDMGenerator(DiffusersGenerator):
    """AudioLDM (diffusers UNet2D over mel latents + CLAP text + HiFi-GAN vocoder): pooled conditioning -> `Audio`."""

    name: ClassVar[str] = "audioldm"
    Config: ClassVar[type] = AudioLDMConfig
    modalities_out: ClassVar[tuple[str, ...]] = ("audio",)
    out_dim_doc: ClassVar[str] = ("cond_dim: the CLAP text encoder's projection_dim, which must equal the UNet's "
                                  "projection_class_embeddings_input_dim (512 for cvssp/audioldm)")
    tokens_doc: ClassVar[str] = "cond_len 1: one pooled, L2-normalised CLAP text vector per item"
    example_settings: ClassVar[dict[str, Any]] = {"config": TINY, "steps": 2, "guidance_scale": 1.0}
    pipeline_class: ClassVar[str] = "AudioLDMPipeline"
    parts: ClassVar[tuple[str, ...]] = ("unet", "vae", "text_encoder", "vocoder")

    @classmethod
    def tiny_parts(cls, parts: AudioParts) -> dict[str, dict[str, Any]]:
        unet, vae = merged(TINY["unet"], parts.unet), merged(TINY["vae"], parts.vae)
        text, vocoder = merged(TINY["text_encoder"], parts.text_encoder), merged(TINY["vocoder"], parts.vocoder)
        byte_token_ids(text, "config.text_encoder")
        # RoBERTa-style positions start after the pad id, so the table needs pad_token_id + 1 + tokens rows
        text.setdefault("max_position_embeddings", text["pad_token_id"] + 1 + TEXT_TOKENS)
        fill_sample_size(unet, parts, TINY["sample_size"])
        unet.setdefault("cross_attention_dim", list(unet["block_out_channels"]))  # self-attention: no text states
        fill(unet, "projection_class_embeddings_input_dim", text["projection_dim"], "config.unet",
             "config.text_encoder.projection_dim")
        for key in ("in_channels", "out_channels"):
            fill(unet, key, vae["latent_channels"], "config.unet", "config.vae.latent_channels")
        vae.setdefault("sample_size", unet["sample_size"] * vae_factor(vae))
        return {"unet": unet, "vae": vae, "text_encoder": text, "vocoder": vocoder, "tokenizer": {}}

    @classmethod
    def facts(cls, parts: dict[str, dict[str, Any]]) -> GeneratorFacts:
        unet, dim = parts["unet"], parts["text_encoder"].get("projection_dim", 512)
        if unet.get("class_embed_type") != "simple_projection":
            raise InputError(f"{cls.name}: the UNet's class_embed_type is {unet.get('class_embed_type')!r}; AudioLDM "
                             f"conditions through class_embed_type 'simple_projection'")
        if unet.get("projection_class_embeddings_input_dim") != dim:
            raise InputError(f"{cls.name}: the CLAP text encoder's projection_dim is {dim} but the UNet's "
                             f"projection_class_embeddings_input_dim is "
                             f"{unet.get('projection_class_embeddings_input_dim')}; they must be equal")
        check_latent_channels(cls.name, parts)
        return GeneratorFacts(modality="audio", cond_len=1, cond_dim=dim)

    @classmethod
    def text_max_length(cls, parts: dict[str, dict[str, Any]]) -> int:
        text = parts["text_encoder"]
        positions = text.get("max_position_embeddings", 514) - text.get("pad_token_id", 1) - 1
        tokenizer = parts.get("tokenizer", {}).get("model_max_length")
        return min(positions, tokenizer) if isinstance(tokenizer, int) and tokenizer > 0 else positions

    def build_models(self, parts: dict[str, dict[str, Any]]) -> dict[str, Any]:
        from transformers import ClapTextConfig, ClapTextModelWithProjection, SpeechT5HifiGan, SpeechT5HifiGanConfig

        return {"unet": build_model("UNet2DConditionModel", parts["unet"], "config.unet"),
                "vae": build_model("AutoencoderKL", parts["vae"], "config.vae"),
                "text_encoder": ClapTextModelWithProjection(ClapTextConfig(**parts["text_encoder"])),
                "vocoder": SpeechT5HifiGan(SpeechT5HifiGanConfig(**parts["vocoder"])),
                "tokenizer": byte_tokenizer(self.text_max_length(parts))}

    @property
    def sample_rate(self) -> int:
        """Samples per second of the generated audio (the vocoder's sampling_rate)."""
        return int(self.pipeline.vocoder.config.sampling_rate)

    @property
    def audio_length_s(self) -> float:
        """Seconds per generated clip (as set, or the UNet's sample size in spectrogram frames)."""
        if self.config.audio_length_s is not None:
            return float(self.config.audio_length_s)
        voc = self.pipeline.vocoder.config
        frames = self.pipeline.unet.config.sample_size * self.pipeline.vae_scale_factor
        return float(frames * np.prod(voc.upsample_rates) / voc.sampling_rate)

    def encode_for_pipeline(self, captions: list[str]) -> torch.Tensor:
        return self.pipeline._encode_prompt(captions, self.pipeline._execution_device, 1, False)[:, None, :]

    def run_pipeline(self, cond: torch.Tensor, negative: torch.Tensor | None, steps: int, guidance_scale: float,
                     generator: torch.Generator | None) -> list[Audio]:
        negative = None if negative is None else negative[:, 0]  # the pipeline takes pooled (N, D) vectors
        out = self.pipeline(prompt_embeds=cond[:, 0], negative_prompt_embeds=negative, num_inference_steps=steps,
                            guidance_scale=guidance_scale, generator=generator, audio_length_in_s=self.audio_length_s,
                            output_type="np")
        return [Audio(samples=np.asarray(a, dtype=np.float32), sample_rate=self.sample_rate) for a in out.audios]

    def generate(self, cond: torch.Tensor, seed: int | None = None, steps: int | None = None,
                 guidance_scale: float | None = None) -> list[Audio]:
        """(N, 1, cond_dim) pooled CLAP-like vectors -> N mono `Audio` clips of `audio_length_s` at `sample_rate`."""
        return super().generate(cond, seed, steps, guidance_scale)
