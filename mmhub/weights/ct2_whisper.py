"""Whisper CTranslate2 folders (as faster-whisper ships them) converted to transformers' Whisper.

`load_ct2_whisper` converts a ``WhisperSpec`` folder (as faster-whisper
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
from pathlib import Path
from typing import Any

import torch

from mmhub.errors import WeightsNotFoundError
from mmhub.weights.ct2 import CT2_ACTIVATIONS, CT2File, read_ct2_index


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


def _ffn(get, src: str, dst: str, out: dict[str, torch.Tensor]) -> None:
    """A layer's feed-forward block: CT2 ``ffn/linear_0`` / ``linear_1`` -> transformers ``fc1`` / ``fc2``."""
    for k, fc in ((0, "fc1"), (1, "fc2")):
        out[f"{dst}.{fc}.weight"] = get(f"{src}/ffn/linear_{k}/weight")
        out[f"{dst}.{fc}.bias"] = get(f"{src}/ffn/linear_{k}/bias")


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
                _ffn(get, s, t, out)
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
                _ffn(get, s, t, out)
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
