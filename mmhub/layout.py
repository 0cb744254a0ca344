"""Weight memory layout of the backbone's linear layers: which way round each weight matrix lies in memory.

An ``nn.Linear`` weight is (out, in), normally row-major. At batch 1 to 8, decoding reads every weight once per
token (a matrix-vector product bound by memory bandwidth), and the CPU BLAS that torch ships (MKL) streams a
*wide* matrix (out >= in: the LM head, q/o and the MLP's gate and up projections) about twice as fast when it lies
column-major, i.e. when its transpose (in, out) is the contiguous block. Measured on this project's 2-core CPU
(fp32, weights streamed from memory): a 32000 x 512 LM head takes 6.7 ms row-major and 3.0 ms column-major per
token; 1376 x 512 MLP weights 18 ms against 10 ms for 64 of them; narrow ones (out < in: down, k/v with GQA) are
faster row-major, so they stay. Training steps measure the same either way (the GEMMs there are compute bound;
see ``benchmarks/llava.py``'s ``row_layout`` ablation).

Only strides change: the values, the parameter objects, ``state_dict`` keys and saved files (written contiguous)
are the same, so optimizers, checkpoints and the transformers export see no difference. A weight shared with an
embedding table (tied LM head) keeps its layout: a column-major table makes every token lookup a strided gather
and its dense gradient a transposing copy. The spec's ``weight_layout: row`` switches this off.
"""

from __future__ import annotations

import torch
from torch import nn


def is_column_major(w: torch.Tensor) -> bool:
    """Whether a 2-D tensor is the transpose of a contiguous one (and not itself contiguous)."""
    return w.dim() == 2 and w.shape[0] > 1 and w.shape[1] > 1 and w.t().is_contiguous()


def wide_linear_weights(module: nn.Module) -> list[nn.Parameter]:
    """The weights of `module`'s ``nn.Linear`` layers with out >= in features that no ``nn.Embedding`` shares."""
    shared = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    out, seen = [], set()
    for m in module.modules():
        if not isinstance(m, nn.Linear) or id(m.weight) in shared or id(m.weight) in seen:
            continue
        w = m.weight
        if w.dim() == 2 and w.shape[0] >= w.shape[1] and w.device.type != "meta" and w.dtype.is_floating_point:
            seen.add(id(w))
            out.append(w)
    return out


def set_decode_layout(module: nn.Module) -> int:
    """Store the wide linear weights of `module` column-major, in place (values unchanged); returns how many moved.

    Call before an optimizer is created for them: its state tensors take the parameters' layout when made."""
    moved = 0
    for w in wide_linear_weights(module):
        if not is_column_major(w):
            with torch.no_grad():
                w.data = w.data.t().contiguous().t()
            moved += 1
    return moved


def set_row_layout(module: nn.Module) -> int:
    """Undo `set_decode_layout`: every linear weight of `module` row-major (contiguous) again; returns the count."""
    moved = 0
    for m in module.modules():
        if isinstance(m, nn.Linear) and is_column_major(m.weight):
            with torch.no_grad():
                m.weight.data = m.weight.data.contiguous()
            moved += 1
    return moved
