"""Zeroscope / ModelScope-style text-to-video as a video generator (the video output of NExT-GPT-like models).

diffusers' ``TextToVideoSDPipeline``: Stable Diffusion's recipe with a ``UNet3DConditionModel``
(spatial + temporal layers) denoising ``num_frames`` VAE latents at once, conditioned on CLIP text
encoder states passed as ``prompt_embeds``. Settings, conditioning shape (cond_len x cond_dim from
the CLIP text encoder, which must match the UNet's cross_attention_dim) and the own text encoder
(`encode_text`) work exactly as in `StableDiffusionGenerator`; a video is a list of PIL frames.

diffusers marks this pipeline deprecated (it logs a warning when built) but still ships it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from PIL import Image
from pydantic import Field

from mmhub.generators.stable_diffusion import TINY, StableDiffusionConfig, StableDiffusionGenerator

TINY_UNET3D: dict[str, Any] = {
    "block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4, "attention_head_dim": 4,
    "down_block_types": ["CrossAttnDownBlock3D", "DownBlock3D"], "up_block_types": ["UpBlock3D", "CrossAttnUpBlock3D"]}


class TextToVideoConfig(StableDiffusionConfig):
    """Settings of `TextToVideoGenerator`."""

    steps: int = Field(50, ge=1)
    guidance_scale: float = Field(9.0, ge=0.0)
    num_frames: int = Field(16, ge=1, description="frames per video")


class TextToVideoGenerator(StableDiffusionGenerator):
    """Zeroscope-style text-to-video (diffusers UNet3D + VAE + CLIP text encoder): conditioning -> PIL frame lists."""

    name: ClassVar[str] = "text_to_video"
    Config: ClassVar[type] = TextToVideoConfig
    modalities_out: ClassVar[tuple[str, ...]] = ("video",)
    example_settings: ClassVar[dict[str, Any]] = {
        "config": {**TINY, "unet": TINY_UNET3D}, "steps": 2, "guidance_scale": 1.0, "num_frames": 2}
    pipeline_class: ClassVar[str] = "TextToVideoSDPipeline"
    pipeline_kwargs: ClassVar[dict[str, Any]] = {}
    unet_class: ClassVar[str] = "UNet3DConditionModel"
    tiny_unet: ClassVar[dict[str, Any]] = TINY_UNET3D
    modality: ClassVar[str] = "video"

    def run_pipeline(self, cond: torch.Tensor, negative: torch.Tensor | None, steps: int, guidance_scale: float,
                     generator: torch.Generator | None) -> list[list[Image.Image]]:
        inputs = self.pipeline_inputs(cond, negative, steps, guidance_scale, generator)
        return [list(video) for video in self.pipeline(**inputs, num_frames=self.config.num_frames).frames]

    def generate(self, cond: torch.Tensor, seed: int | None = None, steps: int | None = None,
                 guidance_scale: float | None = None) -> list[list[Image.Image]]:
        """(N, cond_len, cond_dim) -> N videos, each `num_frames` PIL frames of `output_size`."""
        return super().generate(cond, seed, steps, guidance_scale)
