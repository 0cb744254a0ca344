"""4-bit weight quantisation of a loaded backbone (bitsandbytes), the frozen base of QLoRA.

``quantize: nf4`` (or ``fp4``) replaces every ``nn.Linear`` of the transformer
blocks with a bitsandbytes ``Linear4bit`` holding the same weights in 4 bits
(the embeddings and the LM head stay in full precision, as in the QLoRA paper);
LoRA adapters (peft) then train on top of the frozen 4-bit base. bitsandbytes'
4-bit kernels run on CPU (>= 0.46) as well as CUDA. Only weights loaded from a
source are quantised: a randomly initialised model has nothing worth keeping.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

QuantMode = Literal["nf4", "fp4"]


def bitsandbytes_or_raise():  # -> module
    """Import bitsandbytes, or raise an error that names the fix."""
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise ValueError("`quantize` needs the bitsandbytes package (QLoRA's 4-bit layers); install it with "
                         "pip install 'mmhub[qlora]'") from exc
    return bnb


def quantize_linears(model: nn.Module, mode: QuantMode, compute_dtype: torch.dtype, keep: tuple[nn.Module, ...] = ()
                     ) -> int:
    """Replace the `nn.Linear`s of `model` (except those in `keep`) by 4-bit ones in place; returns how many."""
    bnb = bitsandbytes_or_raise()
    device = next(model.parameters()).device
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or any(child is k for k in keep):
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=compute_dtype, quant_type=mode, device="meta")
            q.weight = bnb.nn.Params4bit(child.weight.data.to(torch.float32).contiguous(), requires_grad=False,
                                         quant_type=mode)
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
            setattr(parent, name, q.to(device))  # moving the Params4bit to a device quantises it
            count += 1
    return count


def is_quantized(model: nn.Module) -> bool:
    """True when `model` holds bitsandbytes 4-bit linears."""
    return any(type(m).__name__ == "Linear4bit" for m in model.modules())
