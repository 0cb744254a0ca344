"""The language model of a LLaVA-shaped mmhub model as a llama.cpp GGUF file (architecture ``llama``).

Input: the transformers text config and the decoder's tensors under transformers' Llama names (as
`mmhub.export.hf_llava.llava_config_and_tensors` lays them out), plus the tokenizer. Output: one GGUF file written
with gguf-py (llama.cpp's own Python writer), which llama.cpp, llama-cpp-python and Ollama load:

* metadata: context length, width, depth, feed-forward width, head counts, RoPE base and dimension, RMSNorm
  epsilon, file type; the byte-level BPE tokenizer (``gpt2`` model, its pre-tokenizer name, tokens with their types,
  merges, BOS/EOS/padding ids, whether BOS is added) and the chat template;
* tensors renamed to llama.cpp's (``token_embd``, ``blk.N.attn_q`` ...); q_proj and k_proj rows reordered per head,
  because transformers' Llama rotates the two halves of each head (rotate-half RoPE) while llama.cpp's rotates
  adjacent pairs: within a head of size d, row 2j takes row j and row 2j+1 takes row j + d/2, the same
  re-ordering llama.cpp's converter applies;
* norms and other 1-D tensors stay float32; matrices are float32, float16 or Q8_0 (gguf-py's quantizer, blocks of
  32 with one fp16 scale; a matrix whose rows are not a multiple of 32 stays float16); tied embeddings write no
  ``output.weight`` (llama.cpp reuses ``token_embd``).

Only ``llama`` text models without attention/MLP biases or RoPE scaling are written; anything else raises an
`ExportError` naming the backbone and what stands in the way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmhub.errors import ExportError

QUANT_TYPES = ("f32", "f16", "q8_0")
_RENAME = {
    "input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


@dataclass(frozen=True)
class TokenizerFacts:
    """What llama.cpp needs of a byte-level BPE tokenizer: one token string and type per embedding row."""

    tokens: list[str]
    types: list[int]  # gguf.TokenType values
    merges: list[str]
    pre: str  # llama.cpp's pre-tokenizer name (its regex set), e.g. "smollm"
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    add_bos: bool
    chat_template: str | None


def tokenizer_facts(tokenizer: Any, rows: int, pre: str, extra_special: list[str]) -> TokenizerFacts:
    """A transformers fast BPE tokenizer's vocabulary as `rows` GGUF tokens (ids past the vocabulary padded as
    ``[PAD{i}]``, unused), its merges, special ids and template; `extra_special` are marked control tokens."""
    import json

    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = json.loads(backend.to_str())["model"] if backend is not None else {}
    if model.get("type") != "BPE":
        raise ExportError(f"backbone tokenizer ({type(tokenizer).__name__}): GGUF export writes byte-level BPE "
                          f"tokenizers (llama.cpp's 'gpt2' model); this one is {model.get('type') or 'not a fast one'}")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    if max(by_id) >= rows:
        raise ExportError(f"backbone: the tokenizer has ids up to {max(by_id)} but the embedding only {rows} rows")
    special = set(tokenizer.all_special_tokens) | set(extra_special)
    added = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    tokens, types = [], []
    for i in range(rows):
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
        else:
            tokens.append(tok)
            control = tok in special or re.fullmatch(r"<\|.*\|>", tok) is not None
            types.append(int(gguf.TokenType.CONTROL if control else
                             gguf.TokenType.USER_DEFINED if tok in added else gguf.TokenType.NORMAL))
    template = getattr(tokenizer, "chat_template", None)
    return TokenizerFacts(tokens=tokens, types=types, merges=merges, pre=pre, bos_id=tokenizer.bos_token_id,
                          eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                          add_bos=bool(getattr(tokenizer, "add_bos_token", False)),
                          chat_template=template if isinstance(template, str) else None)


def _rope_theta(cfg: Any) -> float:
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    kind = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"
    if kind != "default":
        raise ExportError(f"backbone (model_type {cfg.model_type}): RoPE scaling {kind!r} is not written to GGUF yet "
                          "(llama.cpp needs its rope_freqs tensor); export a model without rope scaling")
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta if theta is not None else getattr(cfg, "rope_theta", 10000.0))


def llm_problems(cfg: Any) -> list[str]:
    """What keeps a transformers text config from being written as llama.cpp's ``llama`` architecture."""
    problems = []
    if cfg.model_type != "llama":
        problems.append(f"backbone (model_type {cfg.model_type}): GGUF export writes Llama-family language models "
                        "(model_type llama, e.g. SmolLM2, TinyLlama, Llama 2/3 without rope scaling)")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(cfg, flag, False):
            problems.append(f"backbone (model_type {cfg.model_type}): {flag} is set; the writer has no bias tensors")
    if cfg.model_type == "llama":
        try:
            _rope_theta(cfg)
        except ExportError as exc:
            problems.append(str(exc))
    return problems


def permute_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder a q/k projection's rows from rotate-half to adjacent-pair RoPE order, per head."""
    d = w.shape[0] // heads
    return w.reshape(heads, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(key: str) -> str:
    """transformers Llama key (base model ``layers.N...``, ``embed_tokens``, ``norm``; ``lm_head``) -> GGUF name."""
    if key == "embed_tokens.weight":
        return "token_embd.weight"
    if key == "norm.weight":
        return "output_norm.weight"
    if key == "lm_head.weight":
        return "output.weight"
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
    if m and m.group(2) in _RENAME:
        return f"blk.{m.group(1)}.{_RENAME[m.group(2)]}"
    raise ExportError(f"backbone: tensor {key!r} has no place in llama.cpp's llama architecture")


def encode(name: str, t: torch.Tensor, qtype: str) -> tuple[np.ndarray, Any]:
    """A tensor as the array and GGML type the writer stores: 1-D and norms float32, matrices as `qtype`."""
    import gguf

    arr = t.detach().to(torch.float32).cpu().numpy()
    if arr.ndim <= 1 or name.endswith("_norm.weight") or qtype == "f32":
        return arr, None
    if qtype == "q8_0" and arr.shape[-1] % 32 == 0:
        return gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return arr.astype(np.float16), None


def write_llm_gguf(path: Path, cfg: Any, tensors: dict[str, torch.Tensor], tok: TokenizerFacts, qtype: str,
                   name: str) -> Path:
    """Write the decoder (`tensors` under transformers' base-model names, plus ``lm_head.weight`` when untied) as a
    llama.cpp GGUF of type `qtype` (f32, f16, q8_0)."""
    import gguf

    if qtype not in QUANT_TYPES:
        raise ExportError(f"--type {qtype!r}: GGUF export writes {', '.join(QUANT_TYPES)}")
    problems = llm_problems(cfg)
    if problems:
        raise ExportError("cannot write the language model as GGUF: " + "; ".join(problems))
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    rows = tensors["embed_tokens.weight"].shape[0]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_context_length(int(cfg.max_position_embeddings))
    w.add_embedding_length(int(cfg.hidden_size))
    w.add_block_count(int(cfg.num_hidden_layers))
    w.add_feed_forward_length(int(cfg.intermediate_size))
    w.add_head_count(int(heads))
    w.add_head_count_kv(int(kv))
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_rope_dimension_count(int(head_dim))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(int(rows))
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tok.pre)
    w.add_token_list(tok.tokens)
    w.add_token_types(tok.types)
    w.add_token_merges(tok.merges)
    for setter, value in ((w.add_bos_token_id, tok.bos_id), (w.add_eos_token_id, tok.eos_id),
                          (w.add_pad_token_id, tok.pad_id)):
        if value is not None:
            setter(int(value))
    w.add_add_bos_token(tok.add_bos)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)
    for key, t in tensors.items():
        gname = gguf_name(key)
        if key.endswith("self_attn.q_proj.weight"):
            t = permute_rows(t, heads)
        elif key.endswith("self_attn.k_proj.weight"):
            t = permute_rows(t, kv)
        arr, raw = encode(gname, t, qtype)
        w.add_tensor(gname, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
