"""Activation checkpointing per transformer block: keep each block's input, recompute its inside in the backward pass.

A training forward normally keeps every block's intermediate activations (attention projections, scores, the
MLP's wide hidden state) until the backward pass reads them: per token, a Llama block holds roughly
``10 * hidden + 3 * intermediate`` floats (more with eager attention), times the number of blocks. Checkpointed, a
block keeps only its input hidden state and recomputes the rest when its gradient is needed, so the memory that
grows with the sequence shrinks to about one hidden vector per token per block plus one block's worth of
activations, for about one extra forward pass of compute.

`checkpoint_blocks` turns it on for a list of blocks by giving each a subclass of its own class whose ``forward``
runs through `torch.utils.checkpoint` (non-reentrant), so parameter names, state dicts, forward hooks (injectors,
FSDP2's) and copies are unchanged. It applies whenever gradients are being recorded for the block (its input or
its parameters require grad), also in eval mode: a frozen language model in an alignment stage still passes the
projector's gradient through every block, and those activations are the largest. Packed rows run under
`mmhub.hf_attention.packed_sequences`, a context variable that is unset by the time the backward pass recomputes
a block; each checkpoint captures the segments at forward time and re-enters them for the recomputation.

Enabled by the spec's ``runtime.activation_checkpointing`` (`mmhub.runtime`) on the backbone's blocks
(`Backbone.checkpoint_blocks`). The same blocks are what ``runtime.compile`` compiles (`compile_blocks`: regional
compilation with torch.compile, one block at a time).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_SUBCLASSES: dict[type, type] = {}
MARK = "_mmhub_activation_checkpointed"


def _recompute_context() -> tuple[AbstractContextManager, AbstractContextManager]:
    """(forward context, recomputation context): the recomputation re-enters the packed segments active now."""
    from mmhub.hf_attention import _packed_seqlens, packed_sequences

    seqlens = _packed_seqlens.get()
    return nullcontext(), (packed_sequences(seqlens) if seqlens is not None else nullcontext())


def _records_grad(module: nn.Module, args: tuple, kwargs: dict) -> bool:
    if not torch.is_grad_enabled():
        return False
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    return any(t.requires_grad for t in tensors) or any(p.requires_grad for p in module.parameters())


def _checkpointed(cls: type) -> type:
    if getattr(cls, MARK, False):
        return cls
    if cls not in _SUBCLASSES:
        def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            run = super(sub, self).forward
            if not _records_grad(self, args, kwargs):
                return run(*args, **kwargs)
            return checkpoint(run, *args, use_reentrant=False, context_fn=_recompute_context, **kwargs)

        sub = type(cls.__name__, (cls,), {"forward": forward, MARK: True, "__module__": cls.__module__,
                                          "__qualname__": cls.__qualname__, "__doc__": cls.__doc__})
        _SUBCLASSES[cls] = sub
    return _SUBCLASSES[cls]


def checkpoint_blocks(blocks: Iterable[nn.Module]) -> int:
    """Checkpoint each block's activations from now on (in place); returns how many blocks are checkpointed."""
    n = 0
    for block in blocks:
        block.__class__ = _checkpointed(type(block))
        n += 1
    return n


def uncheckpoint_blocks(blocks: Iterable[nn.Module]) -> None:
    """Undo `checkpoint_blocks`: each block gets its own class back."""
    for block in blocks:
        if getattr(type(block), MARK, False) and type(block) in _SUBCLASSES.values():
            block.__class__ = type(block).__mro__[1]


def compile_blocks(blocks: Iterable[nn.Module]) -> int:
    """Compile each block's call with ``torch.compile`` (inductor, dynamic shapes; compiled on first use, in place:
    names and state dicts unchanged); returns how many. The runtime option ``compile`` uses it."""
    n = 0
    for block in blocks:
        block.compile(dynamic=True)
        n += 1
    return n


def is_checkpointed(block: nn.Module) -> bool:
    """Whether `block` runs under activation checkpointing."""
    return bool(getattr(type(block), MARK, False))


__all__ = ["checkpoint_blocks", "uncheckpoint_blocks", "is_checkpointed", "compile_blocks"]
