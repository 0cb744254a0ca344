"""Sample inputs for component tests: media items, text contexts, captions, and checks on generated media."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmhub.interfaces import Audio, Component, TextContext
from mmhub.probe import sample_item

CAPTIONS = ["a red circle", "two small blue squares"]
PROJ_IN, PROJ_OUT, PROJ_TOKENS = 24, 40, 16

__all__ = [
    "CAPTIONS",
    "PROJ_IN",
    "PROJ_OUT",
    "PROJ_TOKENS",
    "declared_size",
    "media_array",
    "sample_item",
    "sample_text",
    "torch_threads",
]


def sample_text(n: int, width: int, seed: int = 0) -> TextContext:
    """A `TextContext` of random embeddings for `n` items (instruction 5 tokens, target 3, some padding)."""
    g = torch.Generator().manual_seed(seed)
    imask = torch.ones(n, 5, dtype=torch.bool)
    imask[0, 3:] = False
    return TextContext(torch.randn(n, 5, width, generator=g), imask, torch.randn(n, 3, width, generator=g),
                       torch.ones(n, 3, dtype=torch.bool))


@contextmanager
def torch_threads(n: int = 1) -> Iterator[None]:
    """Run with `n` torch threads, then restore: tiny diffusion models are bound by per-op overhead, which
    several threads on a busy, few-core CPU multiply (spin-waits) instead of dividing."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def media_array(item: Any, modality: str) -> np.ndarray:
    """One generated item as an array (for equality checks), after checking its type."""
    if modality == "image":
        assert isinstance(item, Image.Image), f"an image generator returned {type(item).__name__}, not a PIL image"
        return np.asarray(item)
    if modality == "video":
        assert isinstance(item, list) and item and all(isinstance(f, Image.Image) for f in item), \
            "a video generator must return each video as a non-empty list of PIL frames"
        assert len({f.size for f in item}) == 1, "video frames differ in size"
        return np.stack([np.asarray(f) for f in item])
    if modality == "audio":
        assert isinstance(item, Audio), f"an audio generator returned {type(item).__name__}, not mmhub.interfaces.Audio"
        samples = np.asarray(item.samples)
        assert samples.dtype == np.float32 and samples.ndim == 1 and samples.size, \
            f"Audio.samples must be non-empty mono float32; got {samples.dtype} {samples.shape}"
        assert isinstance(item.sample_rate, int) and item.sample_rate > 0, f"bad sample_rate {item.sample_rate!r}"
        return samples
    raise AssertionError(f"no generated-item check for modality {modality!r}; known: image, video, audio")


def declared_size(gen: Component) -> tuple[int, int] | None:
    """(width, height) a generator says its images/frames have: its ``output_size`` attribute or setting."""
    size = getattr(gen, "output_size", None)
    if size is None:
        size = getattr(gen.config, "output_size", None)
    if isinstance(size, int):
        return (size, size)
    return tuple(size) if size is not None else None
