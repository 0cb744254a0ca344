"""Video-LLaMA's video branch as one input projector: a per-frame BLIP-2 Q-Former, frame positions, a video Q-Former.

What ``VideoLLAMA.encode_videoQformer_visual`` (DAMO-NLP-SG/Video-LLaMA, ``video_llama.py``) computes after the
frame tower and ``ln_vision``, in mmhub's BLIP-2 Q-Former modules (`mmhub.projectors.qformer_blip2`):

1. every frame's tokens through BLIP-2's image Q-Former (``frame_qformer``: ``num_queries`` queries, post-LN BERT
   blocks, cross-attention every ``cross_attention_every`` blocks) -> (frames, num_queries, width);
2. a learned frame-position embedding (``frame_position``, ``max_frame_pos`` rows,
   `mmhub.projectors.frame_positions`) added to all of a frame's query states; the frames' states concatenated
   in time order -> (frames * num_queries, width);
3. the video Q-Former (``video_qformer``: ``video_queries`` queries, ``video_layers`` blocks, cross-attention in
   every block) over them -> (video_queries, width);
4. ``proj`` (Video-LLaMA's ``llama_proj``) to the LLM width.

The input is a video encoder's ``temporal: concat`` output (``frames`` frames' tokens in time order, none pooled).
Output tokens: ``video_queries``, whatever the frame count.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field, model_validator
from torch import nn

from mmhub.interfaces import BuildContext, ComponentConfig, Projector, ProjectorConfig, TextContext
from mmhub.projectors.frame_positions import FramePositions
from mmhub.projectors.qformer_blip2 import BertQFormer


class VideoQFormerConfig(ProjectorConfig):
    """Settings of `VideoQFormerProjector`; defaults are Video-LLaMA's (BLIP-2's BERT-base Q-Former, 8 frames)."""

    frames: int = Field(8, ge=1, description="frames per item in the input, in time order")
    num_queries: int = Field(32, ge=1, description="the frame Q-Former's queries")
    layers: int = Field(12, ge=1, description="the frame Q-Former's blocks")
    cross_attention_every: int = Field(2, ge=1)
    video_queries: int = Field(32, ge=1)
    video_layers: int = Field(2, ge=1)
    video_cross_attention_every: int = Field(1, ge=1)
    max_frame_pos: int = Field(32, ge=1, description="rows of the frame-position table (the most frames)")
    width: int = Field(768, ge=1)
    heads: int = Field(12, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    norm_eps: float = Field(1e-12, gt=0)

    @model_validator(mode="after")
    def _fits(self) -> "VideoQFormerConfig":
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.frames > self.max_frame_pos:
            raise ValueError(f"frames {self.frames} exceeds the {self.max_frame_pos}-row frame-position table; fix: "
                             f"sample at most {self.max_frame_pos} frames")
        return self


class VideoQFormerProjector(Projector):
    """Video-LLaMA's video Q-Former branch: per-frame Q-Former + frame positions -> video Q-Former -> linear."""

    name: ClassVar[str] = "video_qformer"
    Config: ClassVar[type[ComponentConfig]] = VideoQFormerConfig
    tokens_doc: ClassVar[str] = "video_queries (32 by default); the input must hold `frames` equal frames"
    example_settings: ClassVar[dict[str, Any]] = {"frames": 2, "num_queries": 4, "layers": 2, "video_queries": 4,
                                                  "width": 16, "heads": 2}

    @classmethod
    def num_tokens(cls, config: VideoQFormerConfig, in_tokens: int) -> int:
        if in_tokens < config.frames or in_tokens % config.frames:
            raise ValueError(f"{cls.name} reads {config.frames} frames, but {in_tokens} input tokens are not "
                             f"{config.frames} equal frames; fix: set frames to the video encoder's num_frames "
                             "(temporal: concat)")
        return config.video_queries

    def __init__(self, config: VideoQFormerConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        assert config.in_dim is not None and config.out_dim is not None, "in_dim/out_dim are filled in by validation"
        hidden = max(1, round(config.width * config.mlp_ratio))
        self.frame_qformer = BertQFormer(config.num_queries, config.width, config.layers, config.heads, hidden,
                                         config.norm_eps, ctx.attention, feature_dim=config.in_dim,
                                         cross_every=config.cross_attention_every)
        self.frame_position = FramePositions(config.max_frame_pos, config.width)
        self.video_qformer = BertQFormer(config.video_queries, config.width, config.video_layers, config.heads,
                                         hidden, config.norm_eps, ctx.attention, feature_dim=config.width,
                                         cross_every=config.video_cross_attention_every)
        self.proj = nn.Linear(config.width, config.out_dim)

    def forward(self, features: torch.Tensor, text: TextContext | None = None) -> torch.Tensor:
        n, tokens, dim = features.shape
        frames = self.config.frames
        type(self).num_tokens(self.config, tokens)
        states = self.frame_qformer(features.reshape(n * frames, tokens // frames, dim))  # (N*F, Q, W)
        states = states.reshape(n, frames, states.shape[1], -1)
        states = self.frame_position.add(states).reshape(n, -1, states.shape[-1])  # (N, F*Q, W)
        return self.proj(self.video_qformer(states))  # (N, video_queries, out)
