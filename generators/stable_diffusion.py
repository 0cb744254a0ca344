"""Stable Diffusion as an image generator: the output side of NExT-GPT / MiniGPT-5 style any-to-any models.

A latent diffusion pipeline from diffusers (``StableDiffusionPipeline``): a ``UNet2DConditionModel``
denoises ``AutoencoderKL`` latents while cross-attending to the conditioning, which takes the place
of the CLIP text encoder's last hidden states (``prompt_embeds``). The generator's own text encoder
(transformers ``CLIPTextModel``) is kept: `encode_text` gives the features an output projector
learns to reproduce (NExT-GPT's decoding-side alignment), and ``encode_text([""])`` is the negative
branch of classifier-free guidance.

* ``source``: a local diffusers folder (e.g. a Stable Diffusion 1.x/2.x snapshot), loaded with its
  tokenizer and scheduler config; no safety checker, nothing downloaded.
* ``config``: build with random weights from tiny defaults (``example_settings``); captions go
  through mmhub's byte tokenizer (no vocabulary files to fetch), padded/cut to cond_len tokens.

Conditioning is (N, cond_len, cond_dim): cond_len = the text encoder's max_position_embeddings (or the
tokenizer's shorter max length), 77 for real SD; cond_dim = its hidden_size, which must equal the
UNet's cross_attention_dim (768 for SD 1.x, 1024 for 2.x).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from PIL import Image
from pydantic import Field, field_validator

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
from mmhub.interfaces import GeneratorFacts

# tiny defaults of a build from config (random weights, well under a second to build on a CPU)
TINY: dict[str, Any] = {
    "sample_size": 16,
    "unet": {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4, "attention_head_dim": 2,
             "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]},
    "vae": {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4, "latent_channels": 4,
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"]},
    "text_encoder": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "max_position_embeddings": 16},
}


class StableDiffusionConfig(DiffusersGeneratorConfig):
    """Settings of `StableDiffusionGenerator`."""

    height: int | None = Field(None, ge=8, description="image height; default: UNet sample_size x VAE factor")
    width: int | None = Field(None, ge=8, description="image width; default: UNet sample_size x VAE factor")

    @field_validator("height", "width")
    @classmethod
    def _multiple_of_8(cls, v: int | None) -> int | None:
        if v is not None and v % 8:
            raise ValueError(f"{v} is not a multiple of 8 (the pipeline needs one; e.g. {v - v % 8 or 8})")
        return v


def cross_attention_dims(unet: dict[str, Any]) -> set[int]:
    """The UNet's cross-attention widths (one per block when given as a list)."""
    dim = unet.get("cross_attention_dim", 1280)
    return set(dim) if isinstance(dim, (list, tuple)) else {dim}


class StableDiffusionGenerator(DiffusersGenerator):
    """Stable Diffusion (diffusers UNet2D + VAE + CLIP text encoder): conditioning as prompt_embeds -> PIL images."""

    name: ClassVar[str] = "stable_diffusion"
    Config: ClassVar[type] = StableDiffusionConfig
    modalities_out: ClassVar[tuple[str, ...]] = ("image",)
    out_dim_doc: ClassVar[str] = ("cond_dim: the CLIP text encoder's hidden_size, which must equal the UNet's "
                                  "cross_attention_dim (768 for SD 1.x, 1024 for 2.x)")
    tokens_doc: ClassVar[str] = ("cond_len: the text encoder's max_position_embeddings, or the tokenizer's shorter "
                                 "max length (77 for real SD); read from the folder's JSON, no weights loaded")
    example_settings: ClassVar[dict[str, Any]] = {"config": TINY, "steps": 2, "guidance_scale": 1.0}
    pipeline_class: ClassVar[str] = "StableDiffusionPipeline"
    pipeline_kwargs: ClassVar[dict[str, Any]] = {"safety_checker": None, "feature_extractor": None,
                                                 "requires_safety_checker": False}
    unet_class: ClassVar[str] = "UNet2DConditionModel"
    tiny_unet: ClassVar[dict[str, Any]] = TINY["unet"]
    modality: ClassVar[str] = "image"

    @classmethod
    def tiny_parts(cls, parts: Parts) -> dict[str, dict[str, Any]]:
        unet, vae = merged(cls.tiny_unet, parts.unet), merged(TINY["vae"], parts.vae)
        text = merged(TINY["text_encoder"], parts.text_encoder)
        byte_token_ids(text, "config.text_encoder")
        fill_sample_size(unet, parts, TINY["sample_size"])
        fill(unet, "cross_attention_dim", text["hidden_size"], "config.unet", "config.text_encoder.hidden_size")
        for key in ("in_channels", "out_channels"):
            fill(unet, key, vae["latent_channels"], "config.unet", "config.vae.latent_channels")
        vae.setdefault("sample_size", unet["sample_size"] * vae_factor(vae))
        return {"unet": unet, "vae": vae, "text_encoder": text, "tokenizer": {}}

    @classmethod
    def facts(cls, parts: dict[str, dict[str, Any]]) -> GeneratorFacts:
        hidden = parts["text_encoder"].get("hidden_size", 512)
        cross = cross_attention_dims(parts["unet"])
        if cross != {hidden}:
            raise InputError(f"{cls.name}: the text encoder's hidden_size is {hidden} but the UNet's "
                             f"cross_attention_dim is {'/'.join(map(str, sorted(cross)))}; they must be equal "
                             f"(the UNet cross-attends to the text encoder's states)")
        check_latent_channels(cls.name, parts)
        return GeneratorFacts(modality=cls.modality, cond_len=cls.text_max_length(parts), cond_dim=hidden)

    @classmethod
    def text_max_length(cls, parts: dict[str, dict[str, Any]]) -> int:
        positions = parts["text_encoder"].get("max_position_embeddings", 77)
        tokenizer = parts.get("tokenizer", {}).get("model_max_length")
        return min(positions, tokenizer) if isinstance(tokenizer, int) and tokenizer > 0 else positions

    def build_models(self, parts: dict[str, dict[str, Any]]) -> dict[str, Any]:
        from transformers import CLIPTextConfig, CLIPTextModel

        return {"unet": build_model(self.unet_class, parts["unet"], "config.unet"),
                "vae": build_model("AutoencoderKL", parts["vae"], "config.vae"),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**parts["text_encoder"])),
                "tokenizer": byte_tokenizer(self.text_max_length(parts))}

    @property
    def output_size(self) -> tuple[int, int]:
        """(width, height) of the generated images (or video frames)."""
        side = self.pipeline.unet.config.sample_size * self.pipeline.vae_scale_factor
        return (self.config.width or side, self.config.height or side)

    def encode_for_pipeline(self, captions: list[str]) -> torch.Tensor:
        return self.pipeline.encode_prompt(captions, self.pipeline._execution_device, 1, False)[0]

    def pipeline_inputs(self, cond: torch.Tensor, negative: torch.Tensor | None, steps: int, guidance_scale: float,
                        generator: torch.Generator | None) -> dict[str, Any]:
        """Keyword arguments of the pipeline call shared by images and video."""
        width, height = self.output_size
        return {"prompt_embeds": cond, "negative_prompt_embeds": negative, "num_inference_steps": steps,
                "guidance_scale": guidance_scale, "generator": generator, "height": height, "width": width,
                "output_type": "pil"}

    def run_pipeline(self, cond: torch.Tensor, negative: torch.Tensor | None, steps: int, guidance_scale: float,
                     generator: torch.Generator | None) -> list[Image.Image]:
        return list(self.pipeline(**self.pipeline_inputs(cond, negative, steps, guidance_scale, generator)).images)

    def generate(self, cond: torch.Tensor, seed: int | None = None, steps: int | None = None,
                 guidance_scale: float | None = None) -> list[Image.Image]:
        """(N, cond_len, cond_dim) -> N PIL images of `output_size`; guidance > 1 uses encode_text([""]) as negative."""
        return super().generate(cond, seed, steps, guidance_scale)
