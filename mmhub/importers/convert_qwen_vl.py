"""Qwen-VL (v1: ``Qwen/Qwen-VL``, ``Qwen/Qwen-VL-Chat``) -> mmhub components plus a weight map.

The checkpoint is a remote-code transformers folder (``model_type: qwen`` with ``auto_map`` -> the authors'
``modeling_qwen.py`` / ``visual.py``); the converter reads only ``config.json`` and the safetensors tensors and never
imports that code. Key layout (the authors' module structure):

* ``transformer.visual.{conv1, positional_embedding, ln_pre, transformer.resblocks.N.*}`` -> the ``qwen_vl_vit``
  encoder, names unchanged (its ``attn.in_proj`` keeps the per-head interleaved q/k/v layout);
* ``transformer.visual.attn_pool.{query, pos_embed, kv_proj, attn.in_proj_*, attn.out_proj.*, ln_q, ln_kv}``,
  ``transformer.visual.ln_post`` and ``transformer.visual.proj`` -> ``cross_attn_resampler`` with ``layout:
  qwen_vl`` (``in_proj`` split into q/k/v, ``proj`` transposed into a bias-free linear);
* ``transformer.wte``, ``transformer.h.N.{ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.w1, mlp.w2, mlp.c_proj}``,
  ``transformer.ln_f``, ``lm_head`` -> a Qwen2 ``hf_causal_lm`` (``c_attn`` split into q/k/v with their biases;
  Qwen's MLP ``c_proj(w1(x) * silu(w2(x)))`` is Qwen2's ``down(up(x) * silu(gate(x)))`` with up = w1, gate = w2).

Each image is ``Picture N: <img>``, its 256 resampler tokens, ``</img>`` and a newline (template ``qwen-vl``, as the
tokenizer's ``from_list_format`` writes it), the authors' forward putting the image features between the two markers.
Qwen-7B's ``use_logn_attn`` and ``use_dynamic_ntk`` change nothing
up to ``seq_length`` (2048) tokens; beyond it the converted model keeps plain RoPE (stated in the notes).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from mmhub.errors import CheckpointError
from mmhub.importers.base import Checkpoint, Imported, Importer, ImportOptions

VISUAL = "transformer.visual."
LAYER = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")
LM_NAMES = {"ln_1.weight": "input_layernorm.weight", "ln_2.weight": "post_attention_layernorm.weight",
            "attn.c_proj.weight": "self_attn.o_proj.weight", "mlp.w1.weight": "mlp.up_proj.weight",
            "mlp.w2.weight": "mlp.gate_proj.weight", "mlp.c_proj.weight": "mlp.down_proj.weight"}
POOL_NAMES = {"attn.out_proj.weight": "attn.out.weight", "attn.out_proj.bias": "attn.out.bias"}
TOWER_PARTS = ("conv1.", "positional_embedding", "ln_pre.", "transformer.")


def _need(config: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in config:
        raise CheckpointError(f"{where}: config.json has no {key!r}, which a Qwen-VL config always has")
    return config[key]


def _qwen2_config(config: Mapping[str, Any], where: str) -> dict[str, Any]:
    hidden, heads = _need(config, "hidden_size", where), _need(config, "num_attention_heads", where)
    if config.get("rotary_pct", 1.0) != 1.0:
        raise CheckpointError(f"{where}: rotary_pct {config['rotary_pct']} (RoPE on part of each head); mmhub's Qwen2 "
                              f"rotates whole heads (rotary_pct 1.0)")
    if config.get("kv_channels", hidden // heads) != hidden // heads:
        raise CheckpointError(f"{where}: kv_channels {config['kv_channels']} != hidden_size / num_attention_heads "
                              f"= {hidden // heads}")
    if not config.get("no_bias", True):
        raise CheckpointError(f"{where}: no_bias is false (biases on c_proj and the MLP), which Qwen2 has not")
    return {"model_type": "qwen2", "vocab_size": _need(config, "vocab_size", where), "hidden_size": hidden,
            "intermediate_size": _need(config, "intermediate_size", where) // 2,
            "num_hidden_layers": _need(config, "num_hidden_layers", where), "num_attention_heads": heads,
            "num_key_value_heads": heads, "rms_norm_eps": config.get("layer_norm_epsilon", 1e-6),
            "rope_theta": float(config.get("rotary_emb_base", 10000)),
            "max_position_embeddings": config.get("max_position_embeddings", 8192), "hidden_act": "silu",
            "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)), "use_sliding_window": False}


def _vision_settings(visual: Mapping[str, Any], tower: Mapping[str, torch.Tensor], where: str) -> dict[str, Any]:
    keys = ("image_size", "patch_size", "width", "layers", "heads", "mlp_ratio")
    missing = [k for k in keys if k not in visual]
    if missing:
        raise CheckpointError(f"{where}: config.json visual lacks {', '.join(missing)}")
    table = tower.get("positional_embedding")
    if table is None:
        raise CheckpointError(f"{where}: no {VISUAL}positional_embedding")
    return {"type": "qwen_vl_vit", **{k: visual[k] for k in keys}, "positions": int(table.shape[0])}


def convert_qwen_vl(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any], *, tokenizer: str = "byte",
                    template: str = "qwen-vl", dtype: str = "float32", where: str = "Qwen-VL checkpoint") -> Imported:
    """A Qwen-VL state dict (the authors' key names) and its ``config.json`` -> the mmhub spec and weight map
    (``encoders.image``, ``projectors.image``, ``backbone.model``). Every tensor must be placed."""
    visual = _need(config, "visual", where)
    qwen2 = _qwen2_config(config, where)
    hidden = qwen2["hidden_size"]
    tower: dict[str, torch.Tensor] = {}
    pool: dict[str, torch.Tensor] = {}
    lm: dict[str, torch.Tensor] = {}
    unknown, dropped = [], []
    for key, value in state_dict.items():
        if key.startswith(VISUAL + "attn_pool."):
            name = key[len(VISUAL + "attn_pool."):]
            if name in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = name.rsplit("_", 1)[1]
                for part, tensor in zip("qkv", value.chunk(3), strict=True):
                    pool[f"attn.{part}.{kind}"] = tensor
            else:
                pool[POOL_NAMES.get(name, name)] = value
        elif key in (VISUAL + "ln_post.weight", VISUAL + "ln_post.bias"):
            pool["ln_post." + key.rsplit(".", 1)[1]] = value
        elif key == VISUAL + "proj":
            pool["proj.weight"] = value.t().contiguous()  # x @ proj == linear with weight proj^T
        elif key.startswith(VISUAL) and key[len(VISUAL):].startswith(TOWER_PARTS):
            tower[key[len(VISUAL):]] = value
        elif key == "transformer.wte.weight":
            lm["model.embed_tokens.weight"] = value
        elif key == "transformer.ln_f.weight":
            lm["model.norm.weight"] = value
        elif key == "lm_head.weight":
            lm["lm_head.weight"] = value
        elif key.endswith("rotary_emb.inv_freq"):
            dropped.append(key)
        elif m := LAYER.match(key):
            i, rest = m.group(1), m.group(2)
            p = f"model.layers.{i}."
            if rest in ("attn.c_attn.weight", "attn.c_attn.bias"):
                if value.shape[0] != 3 * hidden:
                    raise CheckpointError(f"{where}: {key} has {value.shape[0]} rows, expected 3 * hidden_size = "
                                          f"{3 * hidden}")
                kind = rest.rsplit(".", 1)[1]
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.split(hidden), strict=True):
                    lm[f"{p}self_attn.{name}.{kind}"] = part
            elif rest in LM_NAMES:
                lm[p + LM_NAMES[rest]] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        shown = ", ".join(sorted(unknown)[:8]) + (f" ... and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        raise CheckpointError(f"{where}: {len(unknown)} tensor(s) outside Qwen-VL's key layout ({shown})")
    if "lm_head.weight" not in lm and not qwen2["tie_word_embeddings"]:
        raise CheckpointError(f"{where}: no lm_head.weight and tie_word_embeddings is false")
    query = pool.get("query")
    if query is None:
        raise CheckpointError(f"{where}: no {VISUAL}attn_pool.query; not a Qwen-VL checkpoint")
    width = int(query.shape[1])
    heads = visual.get("output_dim", width) // 128 or 1  # the authors' Resampler: num_heads = output_dim // 128
    spec = {
        "name": "qwen-vl-imported",
        "description": f"Qwen-VL converted from {where}: ViT -> cross-attention resampler -> Qwen",
        "encoders": {"image": _vision_settings(visual, tower, where)},
        "projectors": {"image": {"type": "cross_attn_resampler", "layout": "qwen_vl",
                                 "num_queries": int(query.shape[0]), "width": width, "heads": heads}},
        "backbone": {"type": "hf_causal_lm", "config": qwen2, "tokenizer": tokenizer, "dtype": dtype},
        "template": template,
    }
    notes = [f"Qwen's use_logn_attn / use_dynamic_ntk act only past seq_length ({config.get('seq_length', 2048)} "
             f"tokens); the converted Qwen2 keeps plain RoPE and attention there"]
    if dropped:
        notes.append(f"{len(dropped)} rotary inv_freq buffer(s) recomputed, not loaded")
    weights = {"encoders.image": tower, "projectors.image": pool, "backbone.model": lm}
    return Imported(spec=spec, weights=weights, notes=notes)


def _check_image_tokens(ckpt: Checkpoint, tokenizer: Any) -> None:
    """The tokenizer's <img> and </img> must be the ids the model's visual config names (image_start_id, + 1)."""
    start = (ckpt.config.get("visual") or {}).get("image_start_id")
    if start is None:
        return
    ids = tokenizer.convert_tokens_to_ids(["<img>", "</img>"])
    if ids != [start, start + 1]:
        raise CheckpointError(f"{ckpt.folder}: the tokenizer gives <img>, </img> the ids {ids}, but config.json's "
                              f"visual.image_start_id says {[start, start + 1]}; the tokenizer is not this model's")


class QwenVLImporter(Importer):
    """Qwen-VL v1 (Qwen/Qwen-VL, Qwen-VL-Chat): a remote-code folder converted without running its model code."""

    name: ClassVar[str] = "qwen_vl"
    model_types: ClassVar[tuple[str, ...]] = ("qwen",)
    architectures: ClassVar[tuple[str, ...]] = ("QWenLMHeadModel",)
    runs_checkpoint_code: ClassVar[bool] = False
    description: ClassVar[str] = ("Qwen-VL: ViT (qwen_vl_vit) -> cross_attn_resampler (layout qwen_vl) -> Qwen2 "
                                  "(hf_causal_lm); converted from the authors' key layout")

    def convert(self, ckpt: Checkpoint, options: ImportOptions) -> Imported:
        if "visual" not in ckpt.config:
            raise CheckpointError(f"{ckpt.folder}: a model_type 'qwen' folder without a visual config is the "
                                  f"text-only Qwen; mmhub imports Qwen-VL (config.json with 'visual')")
        tokenizer, note = self._tokenizer(ckpt, options)
        imported = convert_qwen_vl(ckpt.take(""), ckpt.config, tokenizer=tokenizer,
                                   template=options.template or "qwen-vl", dtype=options.dtype,
                                   where=str(ckpt.folder))
        imported.spec["name"] = ckpt.folder.name
        imported.notes += [note] if note else []
        return imported

    @staticmethod
    def _tokenizer(ckpt: Checkpoint, options: ImportOptions) -> tuple[str, str | None]:
        """The backbone's tokenizer: the folder's tokenizer.json; else its qwen.tiktoken converted without its code;
        else (only with trust_remote_code) the folder's own tokenizer code."""
        if (ckpt.folder / "tokenizer.json").is_file():
            _check_image_tokens(ckpt, ckpt.tokenizer())
            return str(ckpt.folder), None
        rank_file = ckpt.folder / "qwen.tiktoken"
        if rank_file.is_file():
            from transformers import AutoTokenizer

            from mmhub.importers.convert_qwen_tiktoken import qwen_tokenizer_folder

            folder = qwen_tokenizer_folder(rank_file)
            _check_image_tokens(ckpt, AutoTokenizer.from_pretrained(str(folder), local_files_only=True))
            return str(folder), (f"the tokenizer is qwen.tiktoken converted to a transformers tokenizer ({folder}); "
                                 f"tokenization_qwen.py did not run")
        if not options.trust_remote_code:
            raise CheckpointError(f"{ckpt.folder}: no tokenizer.json and no qwen.tiktoken; Qwen-VL's tokenizer is "
                                  f"then only the checkpoint's own Python (tokenization_qwen.py). Read it and pass "
                                  f"trust_remote_code=True (--trust-remote-code) to let it load, or put qwen.tiktoken "
                                  f"or a transformers tokenizer.json in the folder")
        return str(ckpt.folder), "the tokenizer is the folder's own code (trust_remote_code)"
