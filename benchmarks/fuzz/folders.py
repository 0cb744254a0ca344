"""Corrupted and hostile model folders: damaged weights, damaged or malicious specs, escapes, symlinks, code.

`base_folder` saves a small model (open_clip tower, MLP, a 1-layer Llama with the easy-VQA word tokenizer).
Each corruption edits a copy. Damage (a flipped byte, a truncated file) leaves the recorded hashes alone, as a
broken disk would; malice (a path out of the folder, remote code) also rewrites the hashes, as a hostile author of
the whole folder can. Every case is then loaded with verification on.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
import struct
from pathlib import Path
from typing import Any, Callable

SPEC = {
    "name": "fuzz-base",
    "encoders": {"image": {"type": "open_clip", "arch": None, "embed_dim": 16,
                           "vision_cfg": {"image_size": 16, "patch_size": 8, "layers": 2, "width": 16,
                                          "head_width": 8}}},
    "projectors": {"image": {"type": "mlp", "depth": 2}},
    "backbone": {"type": "hf_causal_lm", "tokenizer": "words:mmhub:recipes/easyvqa-words.txt",
                 "config": {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                            "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 40,
                            "max_position_embeddings": 64}},
    "template": "chatml",
}


def base_folder(where: Path) -> Path:
    import mmhub

    folder = where / "base"
    if not (folder / "model.safetensors").is_file():
        mmhub.build(SPEC).save_pretrained(folder)
    return folder


# -- the safetensors file as bytes: an 8-byte header length, the JSON header, the data ------------------------------
def _split(raw: bytes) -> tuple[dict[str, Any], bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(header: dict[str, Any], data: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def _tensors(header: dict[str, Any]) -> list[str]:
    return [k for k in header if k != "__metadata__"]


def _edit_weights(folder: Path, edit: Callable[[dict[str, Any], bytearray, random.Random], bytes | None],
                  rng: random.Random) -> None:
    f = folder / "model.safetensors"
    header, data = _split(f.read_bytes())
    buf = bytearray(data)
    out = edit(header, buf, rng)
    f.write_bytes(out if out is not None else _join(header, bytes(buf)))


def _flip(n: int):
    def edit(header, buf, rng):
        for _ in range(n):
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
    return edit


def _zero(header, buf, rng):
    buf[:] = bytes(len(buf))


def _retag(new: str):
    def edit(header, buf, rng):
        key = rng.choice([k for k in _tensors(header) if header[k]["dtype"] == "F32"])
        header[key]["dtype"] = new
    return edit


def _reshape(kind: str):
    def edit(header, buf, rng):
        key = rng.choice([k for k in _tensors(header) if len(header[k]["shape"]) == 2])
        rows, cols = header[key]["shape"]
        header[key]["shape"] = {"flat": [rows * cols], "swap": [cols, rows], "empty": [0, cols]}[kind]
    return edit


def _alias(header, buf, rng):
    shapes: dict[tuple, list[str]] = {}
    for k in _tensors(header):
        shapes.setdefault(tuple(header[k]["shape"]), []).append(k)
    same = [v for v in shapes.values() if len(v) > 1]
    a, b = rng.choice(same)[:2] if same else _tensors(header)[:2]
    header["__metadata__"]["aliases"] = json.dumps({a: b})


def _meta(value: str):
    def edit(header, buf, rng):
        header["__metadata__"]["aliases"] = value
    return edit


def _truncate(header, buf, rng):
    return _join(header, bytes(buf))[: rng.randrange(8, 200)]


def _header_len(header, buf, rng):
    return struct.pack("<Q", 2**40) + json.dumps(header).encode()


def _nan(header, buf, rng):
    key = rng.choice([k for k in _tensors(header) if header[k]["dtype"] == "F32"])
    start, _ = header[key]["data_offsets"]
    buf[start:start + 4] = struct.pack("<f", float("nan"))


DAMAGE: dict[str, Callable] = {
    "flip_1_byte": _flip(1), "flip_100_bytes": _flip(100), "zero_data": _zero, "dtype_tag_I32": _retag("I32"),
    "dtype_tag_F16": _retag("F16"), "dtype_tag_BOOL": _retag("BOOL"), "flattened": _reshape("flat"),
    "shape_swapped": _reshape("swap"), "empty_tensor": _reshape("empty"), "alias_same_shape": _alias,
    "alias_list": _meta("[1, 2]"), "alias_missing": _meta('{"x": "no.such"}'), "truncated": _truncate,
    "header_length_huge": _header_len, "nan_value": _nan,
}


def _spec_edit(edit: Callable[[dict[str, Any]], Any]):
    def apply(folder: Path, rng: random.Random, outside: Path) -> None:
        f = folder / "mmhub_spec.json"
        data = json.loads(f.read_text())
        out = edit(data)
        f.write_text(json.dumps(data if out is None else out))
    return apply


def _raw_spec(content: bytes):
    def apply(folder: Path, rng: random.Random, outside: Path) -> None:
        (folder / "mmhub_spec.json").write_bytes(content)
    return apply


def _tokenizer(source: Callable[[Path], str]):
    def apply(folder: Path, rng: random.Random, outside: Path) -> None:
        f = folder / "mmhub_spec.json"
        data = json.loads(f.read_text())
        data["backbone"]["tokenizer"] = source(outside)
        f.write_text(json.dumps(data))
    return apply


def _remote_code(folder: Path, rng: random.Random, outside: Path) -> None:
    marker = outside / "EXECUTED"
    code = f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import LlamaConfig\n" \
           "class EvilConfig(LlamaConfig):\n    model_type = 'evil'\n"
    (folder / "configuration_evil.py").write_text(code)
    (folder / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": {
        "AutoConfig": "configuration_evil.EvilConfig"}, "hidden_size": 16}))
    f = folder / "mmhub_spec.json"
    data = json.loads(f.read_text())
    data["backbone"].update(source=str(folder), trust_remote_code=True)
    data["backbone"]["config"] = None
    f.write_text(json.dumps(data))


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _pickle_weights(folder: Path, rng: random.Random, outside: Path) -> None:
    (folder / "model.safetensors").unlink()
    with open(folder / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"w": _Payload(outside / "EXECUTED")}, fh)
    (folder / "model.safetensors").write_bytes((folder / "pytorch_model.bin").read_bytes())


def _pickle_encoder(folder: Path, rng: random.Random, outside: Path) -> None:
    with open(folder / "tower.pt", "wb") as fh:
        pickle.dump({"w": _Payload(outside / "EXECUTED")}, fh)
    f = folder / "mmhub_spec.json"
    data = json.loads(f.read_text())
    data["encoders"]["image"] = {"type": "timm", "model": "resnet10t", "pretrained": str(folder / "tower.pt")}
    f.write_text(json.dumps(data))


def _symlink_weights(folder: Path, rng: random.Random, outside: Path) -> None:
    other = outside / "other.safetensors"
    shutil.copy(folder / "model.safetensors", other)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to(other)
    if other.resolve() != other:
        raise RuntimeError("symlink target moved")


def _init_from(source: Callable[[Path], str]):
    def apply(folder: Path, rng: random.Random, outside: Path) -> None:
        f = folder / "mmhub_spec.json"
        data = json.loads(f.read_text())
        data["init_from"] = source(outside)
        f.write_text(json.dumps(data))
    return apply


def _deep(n: int) -> bytes:
    return b'{"a": ' * n + b"1" + b"}" * n


MALICE: dict[str, Callable[[Path, random.Random, Path], None]] = {
    "words_etc_passwd": _tokenizer(lambda o: "words:/etc/passwd"),
    "words_outside_file": _tokenizer(lambda o: f"words:{o / 'secret.txt'}"),
    "words_pypi_dotdot": _tokenizer(lambda o: "words:pypi:easy-vqa==1.0//../../../../../../etc/passwd"),
    "words_mmhub_dotdot": _tokenizer(lambda o: "words:mmhub:../../../../../../etc/passwd"),
    "words_dev_zero": _tokenizer(lambda o: "words:/dev/zero"),
    "words_dev_urandom": _tokenizer(lambda o: "words:/dev/urandom"),
    "init_from_mmhub_dotdot": _init_from(lambda o: "mmhub:../../../../../../etc"),
    "init_from_outside": _init_from(lambda o: str(o)),
    "remote_code": _remote_code,
    "pickle_as_weights": _pickle_weights,
    "pickle_encoder_weights": _pickle_encoder,
    "symlinked_weights_outside": _symlink_weights,
    "spec_json_list": _raw_spec(b"[1, 2]"),
    "spec_json_string": _raw_spec(b'"hello"'),
    "spec_not_utf8": _raw_spec(b'{"name": "\xff\xfe"}'),
    "spec_nested_100k": _raw_spec(_deep(100_000)),
    "spec_vocab_disagrees": _spec_edit(lambda d: d["backbone"]["config"].__setitem__("vocab_size", 41)),
    "spec_resolved_wrong_type": _spec_edit(lambda d: d.__setitem__("resolved", [1, 2])),
    "spec_adapters_wrong_type": _spec_edit(lambda d: d.__setitem__("adapters", {"backbone": 5})),
    "spec_hidden_huge": _spec_edit(lambda d: d["backbone"]["config"].__setitem__("hidden_size", 64_000_000)),
    "manifest_files_wrong_type": lambda f, r, o: (f / "mmhub_manifest.json").write_text('{"files": [1]}'),
    "manifest_not_json": lambda f, r, o: (f / "mmhub_manifest.json").write_bytes(b"\x00\x01"),
    "manifest_removed": lambda f, r, o: (f / "mmhub_manifest.json").unlink(),
}


def rehash(folder: Path) -> None:
    """Record the folder's current file hashes in its manifest (what a hostile author of the folder can do)."""
    from mmhub.weights import sha256_path

    f = folder / "mmhub_manifest.json"
    try:
        data = json.loads(f.read_text())
        if isinstance(data, dict) and isinstance(data.get("files"), dict):
            data["files"] = {n: sha256_path(folder / n) for n in data["files"] if (folder / n).is_file()}
            f.write_text(json.dumps(data))
    except (OSError, ValueError):
        pass


def corrupt(base: Path, target: Path, name: str, rng: random.Random, outside: Path) -> Path:
    """A copy of `base` at `target` with the named damage or malice applied."""
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(base, target)
    if name in DAMAGE:
        _edit_weights(target, DAMAGE[name], rng)
    else:
        MALICE[name](target, rng, outside)
        rehash(target)
    return target


def weights_of(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))
