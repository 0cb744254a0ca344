"""Read a safetensors file's tensors straight into tensors that already exist (a built model's parameters).

`safetensors.safe_open` memory-maps the file; every page a `get_tensor` touches stays resident until the file is
closed, so loading a model that way peaks at the model plus the whole file. `TensorFile` instead reads each tensor
with `readinto` into the destination's own memory (CPU, contiguous, same dtype), or a few rows at a time through one
buffer of about `CHUNK_BYTES` otherwise (a column-major weight, a device tensor), so a load peaks at the model plus
about one MiB. The header is checked before anything is read:
every entry's dtype, shape and byte range must agree and lie inside the file (a damaged header is a
`CheckpointError` naming the tensor, not a read past the end). The safetensors format is little-endian; on a
big-endian machine `TensorFile.read_into` falls back to safetensors' own reader.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path
from typing import Any

import torch

from mmhub.errors import CheckpointError

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit
CHUNK_BYTES = 1 << 20  # the buffer a strided destination is filled through


class TensorFile:
    """One safetensors file opened for reading: its header parsed and checked, tensors read on demand."""

    def __init__(self, file: Path) -> None:
        self.file = Path(file)
        self._fh = open(self.file, "rb")  # noqa: SIM115 - closed by close() / __exit__
        try:
            self.entries, self.metadata, self._start = self._read_header()
        except BaseException:
            self._fh.close()
            raise

    def __enter__(self) -> "TensorFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._fh.close()

    def _damaged(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.file} cannot be read: {what}; the file is damaged, save the model again.")

    def _read_header(self) -> tuple[dict[str, dict[str, Any]], dict[str, str], int]:
        size = self.file.stat().st_size
        raw = self._fh.read(8)
        if len(raw) < 8:
            raise self._damaged(f"it is {size} bytes long, shorter than a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > min(_MAX_HEADER, size - 8):
            raise self._damaged(f"its header claims {n} bytes, but the file holds {size - 8} after the length field")
        try:
            header = json.loads(self._fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self._damaged(f"its header is not JSON ({exc})") from None
        except RecursionError:
            raise self._damaged("its header's JSON is nested too deeply") from None
        if not isinstance(header, dict):
            raise self._damaged(f"its header is a JSON {type(header).__name__}, not an object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise self._damaged("its __metadata__ is not a string -> string mapping")
        start, data = 8 + n, size - 8 - n
        for name, e in header.items():
            self._check_entry(name, e, data)
        return header, metadata, start

    def _check_entry(self, name: str, e: Any, data: int) -> None:
        if not isinstance(e, dict) or e.get("dtype") not in _DTYPES:
            raise self._damaged(f"tensor {name!r} has no known dtype ({e!r:.80})")
        shape, offsets = e.get("shape"), e.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise self._damaged(f"tensor {name!r} has shape {shape!r}, not a list of sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise self._damaged(f"tensor {name!r} has data_offsets {offsets!r}, not [begin, end]")
        begin, end = offsets
        want = math.prod(shape) * _DTYPES[e["dtype"]].itemsize
        if not 0 <= begin <= end <= data or end - begin != want:
            raise self._damaged(f"tensor {name!r} ({e['dtype']} {shape}) spans bytes {begin}..{end} of a "
                                f"{data}-byte data region; it needs {want} bytes inside it")

    def keys(self) -> list[str]:
        return list(self.entries)

    def dtype(self, name: str) -> torch.dtype:
        return _DTYPES[self.entries[name]["dtype"]]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def read_into(self, name: str, dest: torch.Tensor) -> None:
        """Fill `dest` (same shape and dtype as the stored tensor, the caller checks) with tensor `name`."""
        e = self.entries[name]
        begin, end = e["data_offsets"]
        if sys.byteorder != "little":  # pragma: no cover - no big-endian CI machine
            from safetensors import safe_open

            with safe_open(str(self.file), "pt") as fh:
                dest.copy_(fh.get_tensor(name))
            return
        direct = dest.device.type == "cpu" and dest.is_contiguous() and not dest.requires_grad
        if end <= begin:
            return
        self._fh.seek(self._start + begin)
        if direct:
            self._read_bytes(name, dest, end - begin)
            return
        # a strided destination (a column-major weight, a device tensor): whole rows at a time through one small
        # buffer, so a load never holds a second tensor-sized copy (which the allocator would keep afterwards)
        grid = dest if dest.dim() >= 2 else dest.unsqueeze(0)  # a vector or scalar: one row (a view, filled in place)
        rows = grid.shape[0]
        step = max(1, CHUNK_BYTES // max((end - begin) // rows, 1))
        buffer = torch.empty((min(step, rows), *grid.shape[1:]), dtype=dest.dtype)
        for r0 in range(0, rows, step):
            part = buffer[:min(step, rows - r0)]
            self._read_bytes(name, part, part.numel() * part.element_size())
            grid[r0:r0 + part.shape[0]].copy_(part)

    def _read_bytes(self, name: str, target: torch.Tensor, size: int) -> None:
        """Read the next `size` bytes of tensor `name` into the contiguous CPU tensor `target`."""
        got = self._fh.readinto(memoryview(target.view(-1).view(torch.uint8).numpy()))
        if got != size:
            raise self._damaged(f"tensor {name!r}: read {got} of {size} bytes (the file ends early)")
