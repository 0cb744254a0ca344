"""`mmhub.weights.into.TensorFile`: safetensors tensors read straight into existing tensors, headers checked."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mmhub.errors import CheckpointError
from mmhub.weights.into import TensorFile

TENSORS = {
    "f32": torch.randn(3, 5),
    "f16": torch.randn(4, 2).half(),
    "bf16": torch.randn(7).bfloat16(),
    "i64": torch.arange(-6, 6).reshape(3, 4),
    "u8": torch.randint(0, 255, (9,), dtype=torch.uint8),
    "flag": torch.tensor([True, False, True]),
    "scalar": torch.tensor(2.5),
    "empty": torch.zeros(0, 4),
}


@pytest.fixture
def stored(tmp_path: Path) -> Path:
    path = tmp_path / "t.safetensors"
    save_file(TENSORS, str(path), metadata={"aliases": "{}"})
    return path


def test_every_dtype_reads_back_exactly_into_contiguous_and_strided_tensors(stored: Path) -> None:
    with TensorFile(stored) as fh:
        assert set(fh.keys()) == set(TENSORS) and fh.metadata == {"aliases": "{}"}
        for name, want in TENSORS.items():
            assert fh.shape(name) == tuple(want.shape) and fh.dtype(name) == want.dtype
            dest = torch.zeros_like(want)
            fh.read_into(name, dest)
            assert torch.equal(dest, want), name
        strided = torch.zeros(5, 3).t()  # a (3, 5) view that is not contiguous: filled through a buffer
        fh.read_into("f32", strided)
        assert torch.equal(strided, TENSORS["f32"])


def test_strided_destinations_fill_a_few_rows_at_a_time(stored: Path, monkeypatch) -> None:
    """A column-major weight (or any strided tensor) is filled through a small buffer, rows at a time: with a buffer
    of two rows the (3, 5) tensor takes two reads, a strided vector one; every value lands where it belongs."""
    import mmhub.weights.into as into

    monkeypatch.setattr(into, "CHUNK_BYTES", 2 * 5 * 4)
    with TensorFile(stored) as fh:
        column_major = torch.zeros(5, 3).t()
        fh.read_into("f32", column_major)
        assert torch.equal(column_major, TENSORS["f32"]) and not column_major.is_contiguous()
        every_other = torch.zeros(14, dtype=torch.bfloat16)[::2]
        fh.read_into("bf16", every_other)
        assert torch.equal(every_other, TENSORS["bf16"])


def test_a_column_major_weight_is_checked_for_nan_without_a_copy() -> None:
    from mmhub.folder_weights import check_finite

    w = torch.ones(64, 16).t()  # column-major (16, 64)
    check_finite("w", w, Path("m.safetensors"))
    w[3, 7] = float("nan")
    with pytest.raises(CheckpointError, match="'w' holds 1 NaN/inf"):
        check_finite("w", w, Path("m.safetensors"))


def test_reading_does_not_map_the_file(stored: Path) -> None:
    """The file is read with readinto, never memory-mapped (a mapped file's touched pages stay resident)."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("no /proc/self/maps here")
    with TensorFile(stored) as fh:
        fh.read_into("f32", torch.zeros(3, 5))
        assert str(stored) not in maps.read_text()


def _raw(path: Path, header: object, data: bytes = b"", length: int | None = None) -> Path:
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head) if length is None else length) + head + data)
    return path


@pytest.mark.parametrize(("header", "data", "length", "message"), [
    ({}, b"", 10**6, "header claims 1000000 bytes"),
    (["a"], b"", None, "header is a JSON list"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, None, "spans bytes 0..8 of a 4-byte"),
    ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "needs 12 bytes"),
    ({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "no known dtype"),
    ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "not a list of sizes"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8]}}, b"\0" * 8, None, "not \\[begin, end\\]"),
    ({"__metadata__": {"a": 1}}, b"", None, "__metadata__ is not a string"),
])
def test_a_damaged_header_is_refused_with_the_tensor_and_numbers(tmp_path: Path, header: object, data: bytes,
                                                                 length: int | None, message: str) -> None:
    path = _raw(tmp_path / "bad.safetensors", header, data, length)
    with pytest.raises(CheckpointError, match=f"cannot be read: .*{message}.*save the model again"):
        TensorFile(path)


def test_a_file_shorter_than_a_header_and_non_json_are_refused(tmp_path: Path) -> None:
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="2 bytes long, shorter than a safetensors header"):
        TensorFile(short)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{]")
    with pytest.raises(CheckpointError, match="header is not JSON"):
        TensorFile(garbage)
