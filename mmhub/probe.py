"""Probing modules with real inputs: output shapes without real weights, and encoders' outputs against describe().

`output_shape` builds a module on PyTorch's ``meta`` device (no memory, no init) and
feeds it a meta tensor; if some op cannot run on meta, it falls back to a real CPU
build. Components' ``describe`` uses it so that a spec can be checked before any load.

`check_encoder_output` runs one small `sample_item` through a built encoder (batch 1,
no grad, eval mode, the global RNG untouched) and raises a `SpecError` naming the
component, the spec place and both shapes when it disagrees with its ``describe()``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from mmhub.errors import Problem, SpecError

SAMPLE_MODALITIES = ("image", "video", "audio", "points")


def output_shape(build: Callable[[], nn.Module], run: Callable[[nn.Module, torch.Tensor], torch.Tensor],
                 input_shape: Callable[[nn.Module], tuple[int, ...]]) -> tuple[int, ...]:
    """Shape of ``run(m, zeros(input_shape(m)))`` for ``m = build()``, on the meta device when possible."""
    try:
        with torch.device("meta"):
            module = build().eval()
            return tuple(run(module, torch.empty(input_shape(module))).shape)
    except (NotImplementedError, RuntimeError):
        module = build().eval()
        with torch.no_grad():
            return tuple(run(module, torch.zeros(input_shape(module))).shape)


def sample_item(modality: str, seed: int = 0) -> Any:
    """A small raw media item of `modality`, as a user would pass it to `preprocess`.

    image: a 48x40 RGB PIL image; video: 4 such frames; audio: 1 s of 16 kHz mono
    float32 (a tone plus noise); points: 512 xyz points on a noisy sphere.
    """
    rng = np.random.default_rng(seed)
    if modality == "image":
        return Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8))
    if modality == "video":
        return [Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)) for _ in range(4)]
    if modality == "audio":
        t = np.arange(16000, dtype=np.float32) / 16000
        return (0.5 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(16000)).astype(np.float32)
    if modality == "points":
        p = rng.standard_normal((512, 3)).astype(np.float32)
        return p / np.linalg.norm(p, axis=1, keepdims=True) + 0.01 * rng.standard_normal((512, 3)).astype(np.float32)
    raise AssertionError(f"no sample item for modality {modality!r}; known: {', '.join(SAMPLE_MODALITIES)}")


def check_encoder_output(encoder: nn.Module, modality: str, tokens: int, width: int, place: str, label: str) -> None:
    """One probe forward of `encoder` on a `sample_item` of `modality`; a `SpecError` at `place` (``encoders.image``)
    naming `label` (the component and its plugin) when it does not emit (1, `tokens`, `width`) as described.

    Modalities without a sample item (a plugin's own) are not probed.
    """
    if modality not in SAMPLE_MODALITIES:
        return
    fix = "make the encoder's describe() state the token count and width its forward really emits"
    was_training = encoder.training
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            encoder.eval()
            out = encoder(encoder.preprocess(sample_item(modality), modality).unsqueeze(0), modality)
    except Exception as exc:  # a shape error inside the encoder: report it with the place, not a bare torch trace
        raise SpecError([Problem(place, f"{label}: a probe forward on one {modality} item failed "
                                        f"({type(exc).__name__}: {exc})", fix)]) from exc
    finally:
        encoder.train(was_training)
    got = tuple(out.shape)
    # an encoder whose items take their own token count (dynamic resolution) describes the most: it may emit fewer
    fewer = getattr(encoder, "variable_tokens", False) and len(got) == 3 and got[1] <= tokens
    if got != (1, tokens, width) and not (fewer and (got[0], got[2]) == (1, width)):
        emitted = f"{got[1]} tokens of width {got[2]}" if len(got) == 3 else f"a tensor of shape {got}"
        raise SpecError([Problem(place, f"{label} describes {tokens} tokens of width {width} per {modality} item, "
                                        f"but a probe forward on one item emitted {emitted}", fix)])
