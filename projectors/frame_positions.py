"""Learned frame-position embeddings: one vector per frame index, added to everything that frame contributes.

Video-LLaMA's ``video_frame_position_embedding`` (DAMO-NLP-SG/Video-LLaMA, ``video_llama.py``): an
``nn.Embedding(max_frame_pos, width)`` whose row ``f`` is added to every query state of frame ``f`` before the
frames are concatenated for the video Q-Former. Without it a connector that reads all frames' tokens as one set
(cross-attention is permutation-invariant over its keys) cannot tell a clip from its reverse.

Used by the ``video_qformer`` projector (Video-LLaMA's placement, on each frame's query outputs) and by the
``qformer`` projector's ``frame_positions`` setting (on each frame's query outputs when frames are read one at a
time, on each frame's feature tokens when they are read together). The table is a plain ``nn.Embedding``
(initialised N(0, 1), as Video-LLaMA's is), so its state key stays ``<name>.weight``.
"""

from __future__ import annotations

import torch
from torch import nn


class FramePositions(nn.Embedding):
    """A (max_frames, width) table; `add` adds row ``f`` to every token of frame ``f``."""

    def __init__(self, max_frames: int, width: int):
        super().__init__(max_frames, width)

    def add(self, states: torch.Tensor) -> torch.Tensor:
        """(N, F, T, width) per-frame states -> the same with frame ``f``'s row added to each of its T tokens."""
        if states.ndim != 4 or states.shape[-1] != self.embedding_dim:
            raise ValueError(f"frame positions take (items, frames, tokens, {self.embedding_dim}) states, got "
                             f"{tuple(states.shape)}")
        frames = states.shape[1]
        if frames > self.num_embeddings:
            raise ValueError(f"{frames} frames, but the frame-position table has {self.num_embeddings} rows; fix: "
                             f"sample at most {self.num_embeddings} frames or enlarge the table")
        return states + self.weight[:frames].to(states.dtype)[None, :, None]
