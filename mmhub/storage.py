"""How a model folder stores its float32 tensors smaller: float16, bfloat16, or int8 with a scale per row.

``save_pretrained(storage_dtype=...)`` / ``mmhub export M OUT --format mmhub --dtype ...`` write the folder's
tensors in the storage dtype and record it in the manifest; loading casts (or, for int8, rescales) them back to
float32, so the model computes in float32 either way and only the file is smaller.

``int8`` is symmetric per-row quantization (the scheme of LLM.int8's weight rows and GGUF's Q8_0, at one scale per
output row): a matrix ``W`` of ``rows x ...`` is stored as ``round(W / s)`` in int8 with ``s = max|W_row| / 127``
kept in float32 under ``NAME + INT8_SCALE_SUFFIX``; the worst-case error of an element is ``s / 2``. Tensors of
fewer than two dimensions (biases, norms) and small matrices are stored as float16 instead.
"""

from __future__ import annotations

import torch

STORAGE_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8}
INT8_SCALE_SUFFIX = ":int8_scale"  # ':' never occurs in a module path, so no parameter can carry this name
INT8_MIN_NUMEL = 256  # smaller matrices gain nothing from a scale per row: float16 then


def stored_small(name: str, tensor: torch.Tensor, storage: str) -> dict[str, torch.Tensor]:
    """The file entries for one float32 `tensor` under `storage`: itself cast, or int8 values plus their row scales.
    Other dtypes (integer buffers, tensors already half) are stored as they are."""
    if tensor.dtype != torch.float32:
        return {name: tensor}
    if storage != "int8":
        return {name: tensor.to(STORAGE_DTYPES[storage])}
    if tensor.dim() < 2 or tensor.numel() < INT8_MIN_NUMEL:
        return {name: tensor.to(torch.float16)}
    rows = tensor.reshape(tensor.shape[0], -1)
    scale = rows.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127.0
    values = torch.round(rows / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return {name: values.reshape(tensor.shape).contiguous(), name + INT8_SCALE_SUFFIX: scale.contiguous()}


def shrink_state(state: dict[str, torch.Tensor], storage: str | None) -> dict[str, torch.Tensor]:
    """`state` as the file stores it under `storage` (None: unchanged)."""
    if storage is None:
        return state
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        out.update(stored_small(name, tensor.detach(), storage))
    return out


def is_scale_entry(name: str) -> bool:
    return name.endswith(INT8_SCALE_SUFFIX)


def allowed_stored_dtypes(storage: str | None) -> tuple[torch.dtype, ...]:
    """The dtypes a float32 parameter may have in a file stored as `storage`."""
    if storage == "int8":
        return (torch.int8, torch.float16)
    return (STORAGE_DTYPES[storage],) if storage else ()


def restore(values: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """A stored tensor back in float32: int8 values times their row scales, anything else cast."""
    if values.dtype == torch.int8:
        if scale is None:
            raise ValueError("int8 values without their row scales")
        shape = (values.shape[0],) + (1,) * (values.dim() - 1)
        return values.to(torch.float32) * scale.to(torch.float32).reshape(shape)
    return values.to(torch.float32)


def expand_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A whole file's tensors (read with safetensors' `load_file`) as float32 where they were stored smaller."""
    out = {}
    for name, tensor in state.items():
        if is_scale_entry(name):
            continue
        if tensor.dtype == torch.int8 and name + INT8_SCALE_SUFFIX in state:
            out[name] = restore(tensor, state[name + INT8_SCALE_SUFFIX])
        else:
            out[name] = tensor
    return out
