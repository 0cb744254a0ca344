"""CTranslate2 model folders read directly (no ``ctranslate2`` package), and Whisper ones converted to transformers.

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
variable. `load_ct2_whisper` converts a ``WhisperSpec`` folder (as faster-whisper
ships) into a transformers ``WhisperForConditionalGeneration`` state dict plus its
``WhisperConfig``:

* the fused self-attention ``linear_0`` (q|k|v rows) is split into ``q_proj``,
  ``k_proj`` and ``v_proj``; the fused cross-attention ``linear_1`` (k|v) into
  ``k_proj`` and ``v_proj``. transformers' Whisper ``k_proj`` has no bias: CT2 stores
  zeros there, and any key bias is a per-query constant that softmax cancels, so it
  is dropped;
* layer norms' ``gamma``/``beta`` become ``weight``/``bias``; ``position_encodings``
  become ``embed_positions``; ``conv1``/``conv2`` map one to one;
* ``decoder/projection/weight`` (usually an alias of the token embeddings) becomes
  ``proj_out``; when it is the embeddings the config ties them;
* every tensor becomes float32 (fp16/bf16 are widened, int8/int16 dequantised).

Converting Whisper tiny.en (75 MB fp16) takes about a second on a 2-core CPU, so no
converted copy is cached.
"""

from __future__ import annotations

import json
import re
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


def _layer_count(index: CT2File, prefix: str) -> int:
    pat = re.compile(rf"^{prefix}/layer_(\d+)/")
    found = {int(m.group(1)) for n in index.names() if (m := pat.match(n))}
    if found != set(range(len(found))):
        raise WeightsNotFoundError(f"{index.path}: {prefix} layers {sorted(found)} are not numbered 0..N-1.")
    return len(found)


def _special_tokens(folder: Path) -> dict[str, int]:
    """Token -> id of the Whisper special tokens, from tokenizer.json or vocabulary.txt/json when present."""
    wanted = ("<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>", "<|transcribe|>", "<|translate|>")
    tok = folder / "tokenizer.json"
    if tok.is_file():
        data = json.loads(tok.read_text(encoding="utf-8"))
        ids = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
        vocab = (data.get("model") or {}).get("vocab") or {}
        return {w: ids.get(w, vocab.get(w)) for w in wanted if ids.get(w, vocab.get(w)) is not None}
    for name in ("vocabulary.json", "vocabulary.txt"):
        voc = folder / name
        if voc.is_file():
            tokens = (json.loads(voc.read_text(encoding="utf-8")) if name.endswith(".json")
                      else voc.read_text(encoding="utf-8").split("\n"))
            return {t: i for i, t in enumerate(tokens) if t in wanted}
    return {}


def ct2_whisper_config(path: str | Path, index: CT2File | None = None) -> Any:
    """The transformers ``WhisperConfig`` of a CT2 Whisper folder, from its tensor shapes, scalars and config.json."""
    from transformers import WhisperConfig

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    index = index or read_ct2_index(path)
    if index.spec != "WhisperSpec":
        raise WeightsNotFoundError(f"{index.path} holds a CTranslate2 {index.spec or '(unnamed)'} model, not a Whisper "
                                   f"one (spec WhisperSpec); only Whisper folders convert to transformers here.")
    try:
        with open(index.path, "rb") as fh:
            scalar = lambda n, d=None: index.tensor(n, fh).item() if n in index else d  # noqa: E731
            conv1 = index.info("encoder/conv1/weight").shape
            d_model, mels = conv1[0], conv1[1]
            act_id = scalar("decoder/activation", 3)
            if act_id not in CT2_ACTIVATIONS:
                raise WeightsNotFoundError(f"{index.path}: unknown activation id {act_id}.")
            if not scalar("decoder/pre_norm", 1):
                raise WeightsNotFoundError(f"{index.path}: a post-norm decoder is not a Whisper layout.")
            settings: dict[str, Any] = dict(
                vocab_size=index.info("decoder/embeddings/weight").shape[0],
                num_mel_bins=mels,
                d_model=d_model,
                encoder_layers=_layer_count(index, "encoder"),
                decoder_layers=_layer_count(index, "decoder"),
                encoder_attention_heads=int(scalar("encoder/num_heads")),
                decoder_attention_heads=int(scalar("decoder/num_heads")),
                encoder_ffn_dim=index.info("encoder/layer_0/ffn/linear_0/weight").shape[0],
                decoder_ffn_dim=index.info("decoder/layer_0/ffn/linear_0/weight").shape[0],
                max_source_positions=index.info("encoder/position_encodings/encodings").shape[0],
                max_target_positions=index.info("decoder/position_encodings/encodings").shape[0],
                activation_function=CT2_ACTIVATIONS[act_id],
                scale_embedding=bool(scalar("decoder/scale_embeddings", 0)),
            )
    except KeyError as exc:
        raise WeightsNotFoundError(f"{index.path} lacks the Whisper variable {exc}; the file is not a complete "
                                   f"WhisperSpec model.") from None
    special = _special_tokens(folder)
    eot = special.get("<|endoftext|>", 50256)
    settings.update(bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
                    decoder_start_token_id=special.get("<|startoftranscript|>", 50257))
    settings["tie_word_embeddings"] = ("decoder/projection/weight" not in index
                                       or index.target("decoder/projection/weight")
                                       == index.target("decoder/embeddings/weight"))
    cfg_file = folder / "config.json"
    extra = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else {}
    if extra.get("suppress_ids") is not None:
        settings["suppress_tokens"] = list(extra["suppress_ids"])
    if extra.get("suppress_ids_begin") is not None:
        settings["begin_suppress_tokens"] = list(extra["suppress_ids_begin"])
    cfg = WhisperConfig(**settings)
    if extra.get("alignment_heads") is not None:
        cfg.alignment_heads = [list(h) for h in extra["alignment_heads"]]
    if extra.get("lang_ids") is not None:
        cfg.lang_ids = list(extra["lang_ids"])
    if "<|notimestamps|>" in special:
        cfg.no_timestamps_token_id = special["<|notimestamps|>"]
    return cfg


def _attention(get, src: str, dst: str, fused: str, d: int, out: dict[str, torch.Tensor]) -> None:
    """Split a fused CT2 projection (q|k|v for 'qkv', k|v for 'kv') into transformers' q/k/v/out projections."""
    names = {"qkv": ("q", "k", "v"), "kv": ("k", "v")}[fused]
    first = f"{src}/linear_0" if fused == "qkv" else f"{src}/linear_1"
    w, b = get(f"{first}/weight"), get(f"{first}/bias")
    if w.shape[0] != len(names) * d:
        raise WeightsNotFoundError(f"fused projection {first} has {w.shape[0]} rows, expected {len(names)} x {d}.")
    for part, wi, bi in zip(names, w.split(d), b.split(d), strict=True):
        out[f"{dst}.{part}_proj.weight"] = wi.clone()
        if part != "k":  # transformers' Whisper k_proj has no bias (a key bias cancels in the softmax)
            out[f"{dst}.{part}_proj.bias"] = bi.clone()
    if fused == "kv":
        out[f"{dst}.q_proj.weight"] = get(f"{src}/linear_0/weight")
        out[f"{dst}.q_proj.bias"] = get(f"{src}/linear_0/bias")
        last = f"{src}/linear_2"
    else:
        last = f"{src}/linear_1"
    out[f"{dst}.out_proj.weight"], out[f"{dst}.out_proj.bias"] = get(f"{last}/weight"), get(f"{last}/bias")


def _norm(get, src: str, dst: str, out: dict[str, torch.Tensor]) -> None:
    out[f"{dst}.weight"], out[f"{dst}.bias"] = get(f"{src}/gamma"), get(f"{src}/beta")


def load_ct2_whisper(path: str | Path,
                     parts: tuple[str, ...] = ("encoder", "decoder")) -> tuple[Any, dict[str, torch.Tensor]]:
    """A CT2 Whisper folder -> (``WhisperConfig``, float32 state dict of ``WhisperForConditionalGeneration``).

    `parts` limits the conversion to the ``encoder`` and/or ``decoder`` (keys ``model.encoder.*``,
    ``model.decoder.*``; the decoder part includes ``proj_out.weight``, which shares the
    token embeddings' tensor when the model ties them).
    """
    unknown = set(parts) - {"encoder", "decoder"}
    if unknown:
        raise ValueError(f"parts may be 'encoder' and/or 'decoder', not {sorted(unknown)}")
    index = read_ct2_index(path)
    config = ct2_whisper_config(path, index)
    d = config.d_model
    out: dict[str, torch.Tensor] = {}
    with open(index.path, "rb") as fh:
        def get(name: str) -> torch.Tensor:
            try:
                return index.float(name, fh)
            except KeyError:
                raise WeightsNotFoundError(f"{index.path} lacks the Whisper variable {name!r}; the file is not a "
                                           f"complete WhisperSpec model.") from None

        if "encoder" in parts:
            e = "model.encoder"
            for conv in ("conv1", "conv2"):
                out[f"{e}.{conv}.weight"] = get(f"encoder/{conv}/weight")
                out[f"{e}.{conv}.bias"] = get(f"encoder/{conv}/bias")
            out[f"{e}.embed_positions.weight"] = get("encoder/position_encodings/encodings")
            for i in range(config.encoder_layers):
                s, t = f"encoder/layer_{i}", f"{e}.layers.{i}"
                _norm(get, f"{s}/self_attention/layer_norm", f"{t}.self_attn_layer_norm", out)
                _attention(get, f"{s}/self_attention", f"{t}.self_attn", "qkv", d, out)
                _norm(get, f"{s}/ffn/layer_norm", f"{t}.final_layer_norm", out)
                out[f"{t}.fc1.weight"], out[f"{t}.fc1.bias"] = (get(f"{s}/ffn/linear_0/weight"),
                                                                get(f"{s}/ffn/linear_0/bias"))
                out[f"{t}.fc2.weight"], out[f"{t}.fc2.bias"] = (get(f"{s}/ffn/linear_1/weight"),
                                                                get(f"{s}/ffn/linear_1/bias"))
            _norm(get, "encoder/layer_norm", f"{e}.layer_norm", out)
        if "decoder" in parts:
            m = "model.decoder"
            out[f"{m}.embed_tokens.weight"] = get("decoder/embeddings/weight")
            out[f"{m}.embed_positions.weight"] = get("decoder/position_encodings/encodings")
            for i in range(config.decoder_layers):
                s, t = f"decoder/layer_{i}", f"{m}.layers.{i}"
                _norm(get, f"{s}/self_attention/layer_norm", f"{t}.self_attn_layer_norm", out)
                _attention(get, f"{s}/self_attention", f"{t}.self_attn", "qkv", d, out)
                _norm(get, f"{s}/attention/layer_norm", f"{t}.encoder_attn_layer_norm", out)
                _attention(get, f"{s}/attention", f"{t}.encoder_attn", "kv", d, out)
                _norm(get, f"{s}/ffn/layer_norm", f"{t}.final_layer_norm", out)
                out[f"{t}.fc1.weight"], out[f"{t}.fc1.bias"] = (get(f"{s}/ffn/linear_0/weight"),
                                                                get(f"{s}/ffn/linear_0/bias"))
                out[f"{t}.fc2.weight"], out[f"{t}.fc2.bias"] = (get(f"{s}/ffn/linear_1/weight"),
                                                                get(f"{s}/ffn/linear_1/bias"))
            _norm(get, "decoder/layer_norm", f"{m}.layer_norm", out)
            if config.tie_word_embeddings:
                out["proj_out.weight"] = out[f"{m}.embed_tokens.weight"]
            else:
                out["proj_out.weight"] = get("decoder/projection/weight")
    return config, out


def ct2_whisper_model(path: str | Path, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa") -> Any:
    """A ready ``WhisperForConditionalGeneration`` (eval mode) from a CT2 Whisper folder, loaded strictly."""
    from transformers import WhisperForConditionalGeneration

    config, state = load_ct2_whisper(path)
    config._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if k != "proj_out.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise WeightsNotFoundError(f"{path}: converted Whisper weights do not fit transformers' model: missing "
                                   f"{missing[:5]}, unexpected {unexpected[:5]}.")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.to(dtype).eval()
