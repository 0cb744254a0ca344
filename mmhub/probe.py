"""Finding a module's output shape from its settings without paying for real weights.

The module is built on PyTorch's ``meta`` device (no memory, no init) and fed a
meta tensor; if some op cannot run on meta, it falls back to a real CPU build.
Used by components' ``describe`` so that a spec can be checked before any load.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


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
