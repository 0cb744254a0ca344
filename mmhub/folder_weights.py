"""Filling a freshly built model from a model folder's ``model.safetensors``, every tensor checked.

`apply_weights` refuses extra, lacking, reshaped, retyped and (unless asked) non-finite tensors and damaged alias
metadata, each with the file, the tensor and the fix, and reads each tensor straight into its parameter
(`mmhub.weights.into.TensorFile`: no memory map, so a load holds the model plus at most one tensor).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from mmhub.checkpoint import WEIGHTS_FILE, package_path, tensors_to_save
from mmhub.errors import CheckpointError
from mmhub.manifest import SavedManifest
from mmhub.storage import INT8_SCALE_SUFFIX, allowed_stored_dtypes, is_scale_entry, restore
from mmhub.weights.into import TensorFile


def check_layout(name: str, shape: tuple[int, ...], dtype: torch.dtype, want: torch.Tensor, file: Path,
                 storage: tuple[torch.dtype, ...] = ()) -> None:
    """The stored shape and dtype (read from the file's header) must be the parameter's; a float32 parameter may
    be stored in the dtypes the folder's declared storage allows (its manifest's ``storage_dtype``)."""
    if shape != tuple(want.shape):
        raise CheckpointError(f"{file}: tensor {name!r} has shape {shape} but the model's is "
                              f"{tuple(want.shape)}; the file does not belong to this spec, save the model again.")
    if dtype != want.dtype and not (dtype in storage and want.dtype == torch.float32):
        raise CheckpointError(f"{file}: tensor {name!r} is stored as {dtype} but the model holds "
                              f"{want.dtype}; the file was changed or belongs to another build, save it again.")


def check_finite(name: str, tensor: torch.Tensor, file: Path, allow_nonfinite: bool = False) -> None:
    """NaN/inf values refuse to load unless `allow_nonfinite`."""
    if allow_nonfinite or not tensor.is_floating_point():
        return
    # a flat view (a column-major weight is its transpose's), never a copy: reshape(-1) would copy a strided tensor
    transposed = tensor.dim() == 2 and not tensor.is_contiguous() and tensor.t().is_contiguous()
    flat = tensor.t().reshape(-1) if transposed else tensor.reshape(-1)
    step = 1 << 20  # chunks, so the check needs 1 MiB of scratch, not a mask the size of the tensor
    if not all(bool(torch.isfinite(flat[i:i + step]).all()) for i in range(0, flat.numel(), step)):
        bad = int((~torch.isfinite(tensor)).sum())
        raise CheckpointError(f"{file}: tensor {name!r} holds {bad} NaN/inf value(s); pass allow_nonfinite=True "
                              "to load it anyway (e.g. to inspect a diverged run).")


def _read_aliases(metadata: dict[str, str], file: Path) -> dict[str, str]:
    try:
        aliases = json.loads(metadata.get("aliases", "{}"))
    except json.JSONDecodeError:
        aliases = None
    if not isinstance(aliases, dict) or not all(isinstance(a, str) and isinstance(c, str) for a, c in aliases.items()):
        raise CheckpointError(f"{file}: its 'aliases' metadata is not a name -> name mapping; the file is damaged, "
                              "save the model again.")
    return aliases


@torch.no_grad()
def apply_weights(model: Any, path: Path, manifest: SavedManifest, allow_nonfinite: bool = False) -> None:
    """Load the folder's tensors into a freshly built `model`, checking that nothing is extra, lacking, reshaped,
    retyped or non-finite. Each tensor is read from the file straight into its parameter (`TensorFile`, no memory
    map), so loading holds the model plus at most one tensor, never a second copy of the weights."""
    file = path / WEIGHTS_FILE
    own = model.state_dict()  # views of the parameters and buffers: filled in place
    try:
        with TensorFile(file) as fh:
            aliases = _read_aliases(fh.metadata, file)
            stored = {k for k in fh.keys() if not is_scale_entry(k)}
            scales = {k for k in fh.keys() if is_scale_entry(k)}
            for alias, canonical in aliases.items():  # the file's own consistency first, then the model's fit
                if canonical not in stored:
                    raise CheckpointError(f"{file}: alias {alias!r} names {canonical!r}, which the file lacks; "
                                          "the file is damaged, save the model again.")
            names = sorted(stored | set(aliases))
            unexpected = [k for k in names if k not in own]
            if unexpected:
                raise CheckpointError(f"{file} has {len(unexpected)} tensor(s) the spec's model does not, e.g. "
                                      f"{unexpected[:3]}; the spec and weights do not belong together.")
            storage = allowed_stored_dtypes(manifest.storage_dtype)
            for name in names:
                source = aliases.get(name, name)
                check_layout(name, fh.shape(source), fh.dtype(source), own[name], file, storage)
                if fh.dtype(source) == torch.int8 and own[name].dtype == torch.float32:
                    scale = source + INT8_SCALE_SUFFIX
                    if (scale not in scales or fh.shape(scale) != (own[name].shape[0],)
                            or fh.dtype(scale) != torch.float32):
                        raise CheckpointError(f"{file}: int8 tensor {source!r} lacks its row scales {scale!r} of "
                                              f"shape ({own[name].shape[0]},) in float32; the file is damaged, "
                                              "save it again.")
            orphans = sorted(scales - {aliases.get(n, n) + INT8_SCALE_SUFFIX for n in names})
            if orphans:
                raise CheckpointError(f"{file}: row scales {orphans[:3]} belong to no tensor in the file; "
                                      "the file is damaged, save the model again.")
            for name in names:
                source = aliases.get(name, name)
                if fh.dtype(source) == own[name].dtype:
                    fh.read_into(source, own[name])
                else:  # stored smaller (storage_dtype): one tensor-sized buffer, then cast into the parameter
                    small = torch.empty(own[name].shape, dtype=fh.dtype(source))
                    fh.read_into(source, small)
                    scale = None
                    if small.dtype == torch.int8:
                        scale = torch.empty(own[name].shape[0], dtype=torch.float32)
                        fh.read_into(source + INT8_SCALE_SUFFIX, scale)
                    own[name].copy_(restore(small, scale))
                check_finite(name, own[name], file, allow_nonfinite)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{file} cannot be read ({type(exc).__name__}: {exc}); "
                              f"the file is damaged, save the model again.") from None
    missing = [k for k in own if k not in names]
    need = dict(tensors_to_save(model, full=False))
    if manifest.init_from is not None:  # what the init_from folder provided is covered too
        provided = set(load_file_keys(package_path(manifest.init_from.source)))
        need = {k: v for k, v in need.items() if k not in provided}
    lacking = [k for k in missing if k in need]
    if lacking:
        raise CheckpointError(f"{file} lacks {len(lacking)} tensor(s) that no weight source provides, "
                              f"e.g. {lacking[:3]}; save the model again (with full=True if in doubt).")


def load_file_keys(folder: Path) -> list[str]:
    """The tensor names in a model folder's weights file (without reading the tensors)."""
    with safe_open(str(folder / WEIGHTS_FILE), "pt") as fh:
        return [k for k in fh.keys() if not is_scale_entry(k)]
