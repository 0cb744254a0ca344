"""Shared plumbing of image encoders: weight-source bookkeeping, preprocessing, dtype handling.

A subclass sets ``self.transform`` (PIL image -> (3, H, W) tensor) and
``self._out_dim`` in its constructor and implements ``tokens(pixels)``.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, Callable, ClassVar

import torch

from mmhub.interfaces import Encoder
from mmhub.media import load_image


class ImageEncoder(Encoder):
    """Base for image encoders whose settings have a ``pretrained`` weight source."""

    modalities_in: ClassVar[tuple[str, ...]] = ("image",)
    transform: Callable[[Any], torch.Tensor]
    _out_dim: int

    def has_weight_source(self) -> bool:
        return getattr(self.config, "pretrained", None) is not None

    @property
    def out_dim(self) -> int:
        return self._out_dim

    def preprocess(self, item: Any, modality: str) -> torch.Tensor:
        return self.transform(load_image(item))  # (3, H, W)

    def forward(self, pixels: torch.Tensor, modality: str) -> torch.Tensor:
        dtype = next(self.parameters()).dtype
        return self.tokens(pixels.to(dtype))  # (N, T, out_dim)

    @abstractmethod
    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) preprocessed images -> (N, T, out_dim) feature tokens."""
