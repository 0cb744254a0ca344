"""CTranslate2 model folders read directly (no ``ctranslate2`` package): the ``model.bin`` format.

A CTranslate2 ("CT2") model folder holds ``model.bin``, ``config.json`` and a
vocabulary (``tokenizer.json`` / ``vocabulary.txt``). ``model.bin`` is the binary
that ctranslate2's ``ModelSpec._serialize`` writes and ``models::Model::load``
reads; all integers are little-endian::

    u32  binary_version                 (1 ... 6; 6 is current)
    str  spec_name                      (version >= 2, e.g. "WhisperSpec")
    u32  spec_revision                  (version >= 2)
    u32  num_variables
    num_variables times:
        str  name                       ("encoder/layer_0/self_attention/linear_0/weight")
        u8   rank
        u32  dims[rank]
        u8   dtype id                   (version >= 4: 0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16)
        u32  num_bytes                  (version < 4: u8 item size, then u32 element count)
        num_bytes of row-major data
    u32  num_aliases                    (version >= 3)
    num_aliases times: str alias, str target   (the alias shares the target's data)

where ``str`` is a u16 length (counting a trailing NUL), the UTF-8 bytes and the
NUL. Scalars (rank 0) hold flags and small settings (``decoder/num_heads``,
``decoder/activation``). Quantised weights (int8/int16) come with a
``<name>_scale`` variable: int8 rows were multiplied by ``scale[row]``, int16 by one
scalar ``scale``, so dividing by it gives the float weight back.

`read_ct2_index` reads only the header (it seeks over the data), so a model's
shapes and settings are known without loading it; `CT2File.tensor` then reads one
variable. Converting a Whisper folder to transformers is `mmhub.weights.ct2_whisper`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterable

import torch

from mmhub.errors import WeightsNotFoundError

CT2_DTYPES: dict[int, torch.dtype] = {0: torch.float32, 1: torch.int8, 2: torch.int16, 3: torch.int32,
                                      4: torch.float16, 5: torch.bfloat16}
_LEGACY_ITEM_DTYPES = {4: torch.float32, 2: torch.int16, 1: torch.int8}  # binary versions < 4 stored item sizes
MAX_BINARY_VERSION = 6
# ctranslate2's ActivationType (include/ctranslate2/ops/activation.h) -> transformers' activation names
CT2_ACTIVATIONS = {0: "relu", 1: "gelu_new", 2: "silu", 3: "gelu", 4: "quick_gelu", 5: "tanh", 6: "sigmoid"}


@dataclass(frozen=True)
class CT2Variable:
    """One stored variable: where its bytes are in ``model.bin`` and how to read them."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    nbytes: int


@dataclass
class CT2File:
    """The index of a ``model.bin``: header facts, variables by name, and aliases (alias -> target)."""

    path: Path
    binary_version: int
    spec: str
    revision: int
    variables: dict[str, CT2Variable]
    aliases: dict[str, str] = field(default_factory=dict)

    def names(self) -> list[str]:
        """Every name that `tensor` accepts (variables and aliases), sorted."""
        return sorted({*self.variables, *self.aliases})

    def __contains__(self, name: str) -> bool:
        return name in self.variables or name in self.aliases

    def target(self, name: str) -> str:
        """The stored variable `name` refers to (following aliases)."""
        seen = set()
        while name in self.aliases and name not in self.variables:
            if name in seen:
                raise WeightsNotFoundError(f"{self.path}: alias cycle at {name!r}")
            seen.add(name)
            name = self.aliases[name]
        if name not in self.variables:
            raise KeyError(f"{self.path} has no variable {name!r}")
        return name

    def info(self, name: str) -> CT2Variable:
        return self.variables[self.target(name)]

    def tensor(self, name: str, stream: BinaryIO | None = None) -> torch.Tensor:
        """The variable `name` (or the one an alias names) as a tensor of its stored dtype and shape."""
        var = self.info(name)
        if stream is None:
            with open(self.path, "rb") as fh:
                return _read_data(fh, var, self.path)
        return _read_data(stream, var, self.path)

    def scalar(self, name: str, default: Any = None) -> Any:
        """A rank-0 variable as a Python number (`default` when absent)."""
        if name not in self:
            return default
        return self.tensor(name).item()

    def tensors(self, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Several variables at once (all, aliases included, by default); an alias shares its target's tensor."""
        wanted = self.names() if names is None else list(names)
        out: dict[str, torch.Tensor] = {}
        by_target: dict[str, torch.Tensor] = {}
        with open(self.path, "rb") as fh:
            for name in wanted:
                t = self.target(name)
                if t not in by_target:
                    by_target[t] = _read_data(fh, self.variables[t], self.path)
                out[name] = by_target[t]
        return out

    def float(self, name: str, stream: BinaryIO | None = None) -> torch.Tensor:
        """The variable as float32, widening fp16/bf16 and dequantising int8/int16 with its ``_scale``."""
        t = self.tensor(name, stream)
        if t.is_floating_point():
            return t.float()
        scale_name = self.target(name) + "_scale"
        if scale_name not in self:
            scale_name = name + "_scale"
        if scale_name not in self:
            return t.float()  # plain integer data (counts, ids): no scale
        scale = self.tensor(scale_name, stream).float()
        if scale.ndim == 1 and t.ndim >= 1 and scale.shape[0] == t.shape[0]:
            return t.float() / scale.reshape(-1, *([1] * (t.ndim - 1)))
        return t.float() / scale


def _read_data(fh: BinaryIO, var: CT2Variable, path: Path) -> torch.Tensor:
    fh.seek(var.offset)
    raw = fh.read(var.nbytes)
    if len(raw) != var.nbytes:
        raise WeightsNotFoundError(f"{path} is truncated: variable {var.name!r} needs {var.nbytes} bytes at "
                                   f"offset {var.offset}, found {len(raw)}; re-fetch or re-convert the model.")
    if var.nbytes == 0:
        return torch.empty(var.shape, dtype=var.dtype)
    return torch.frombuffer(bytearray(raw), dtype=var.dtype).reshape(var.shape)


class _Reader:
    def __init__(self, fh: BinaryIO, path: Path):
        self.fh, self.path = fh, path

    def take(self, n: int, what: str) -> bytes:
        pos = self.fh.tell()
        data = self.fh.read(n)
        if len(data) != n:
            raise WeightsNotFoundError(f"{self.path} is not a complete CTranslate2 model.bin: reading {what} "
                                       f"({n} bytes) at offset {pos} hit the end of the file.")
        return data

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def string(self, what: str) -> str:
        n = struct.unpack("<H", self.take(2, what))[0]
        raw = self.take(n, what)
        try:
            return raw.split(b"\0", 1)[0].decode("utf-8")
        except UnicodeDecodeError:
            raise WeightsNotFoundError(f"{self.path}: {what} is not UTF-8 text; "
                                       "this is not a CTranslate2 model.bin.") from None


def _model_bin(path: Path) -> Path:
    path = Path(path)
    return path / "model.bin" if path.is_dir() else path


def read_ct2_index(path: str | Path) -> CT2File:
    """Parse the header of a CT2 ``model.bin`` (or of the folder holding it) without reading tensor data."""
    path = _model_bin(Path(path))
    if not path.is_file():
        raise WeightsNotFoundError(f"{path} does not exist; "
                                   "a CTranslate2 model folder holds model.bin and config.json.")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        r = _Reader(fh, path)
        version = r.u32("the binary version")
        if not 1 <= version <= MAX_BINARY_VERSION:
            raise WeightsNotFoundError(f"{path} does not look like a CTranslate2 model.bin (binary version {version}; "
                                       f"known 1..{MAX_BINARY_VERSION}).")
        spec, revision = "", 1
        if version >= 2:
            spec = r.string("the spec name")
            revision = r.u32("the spec revision")
        count = r.u32("the variable count")
        variables: dict[str, CT2Variable] = {}
        for i in range(count):
            name = r.string(f"the name of variable {i}")
            rank = r.u8(f"the rank of {name!r}")
            shape = tuple(r.u32(f"a dimension of {name!r}") for _ in range(rank))
            if version >= 4:
                type_id = r.u8(f"the dtype of {name!r}")
                if type_id not in CT2_DTYPES:
                    raise WeightsNotFoundError(f"{path}: variable {name!r} has unknown dtype id {type_id} "
                                               f"(known: {sorted(CT2_DTYPES)}).")
                dtype = CT2_DTYPES[type_id]
                nbytes = r.u32(f"the byte count of {name!r}")
            else:
                item = r.u8(f"the item size of {name!r}")
                if item not in _LEGACY_ITEM_DTYPES:
                    raise WeightsNotFoundError(f"{path}: variable {name!r} has item size {item} (known: 1, 2, 4).")
                dtype = _LEGACY_ITEM_DTYPES[item]
                nbytes = r.u32(f"the element count of {name!r}") * item
            offset = fh.tell()
            expect = dtype.itemsize
            for d in shape:
                expect *= d
            if nbytes != expect or offset + nbytes > size:
                raise WeightsNotFoundError(f"{path}: variable {name!r} {shape} {dtype} claims {nbytes} bytes at offset "
                                           f"{offset} (expected {expect}, file size {size}); the file is damaged.")
            fh.seek(nbytes, 1)
            variables[name] = CT2Variable(name, shape, dtype, offset, nbytes)
        aliases: dict[str, str] = {}
        if version >= 3:
            for i in range(r.u32("the alias count")):
                alias = r.string(f"alias {i}")
                aliases[alias] = r.string(f"the target of alias {alias!r}")
    return CT2File(path, version, spec, revision, variables, aliases)


def is_ct2_model(path: str | Path) -> bool:
    """True when `path` is a CT2 ``model.bin`` or a folder holding one whose header parses."""
    try:
        read_ct2_index(path)
        return True
    except (WeightsNotFoundError, OSError):
        return False


def read_ct2(path: str | Path) -> dict[str, torch.Tensor]:
    """Every variable of a CT2 ``model.bin`` (aliases included, sharing their target's tensor), in stored dtypes."""
    return read_ct2_index(path).tensors()


# ----------------------------------------------------------------------------------------------- Whisper
