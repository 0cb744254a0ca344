"""CogVLM (v1, ``THUDM/cogvlm-chat-hf`` and its base/grounding siblings) -> mmhub components plus a weight map.

The checkpoint is a remote-code transformers folder (``config.json`` with ``auto_map`` -> the authors'
``modeling_cogvlm.py`` / ``visual.py``); this converter reads only ``config.json`` and the safetensors tensors and
never imports that code. Key layout (the authors' module structure):

* ``model.vision.``: the EVA2-CLIP tower (``patch_embedding.{proj, cls_embedding, position_embedding}``,
  ``transformer.layers.N.{input_layernorm, attention.{query_key_value, dense}, mlp.{fc1, fc2},
  post_attention_layernorm}``) -> the ``eva2_clip`` encoder, names unchanged;
  ``linear_proj.{linear_proj, norm1, dense_h_to_4h, gate_proj, dense_4h_to_h}``, ``boi``, ``eoi`` -> the ``glu``
  projector (boundary tokens), names unchanged;
* ``model.embed_tokens``, ``model.norm``, ``lm_head`` and per layer ``input_layernorm``, ``post_attention_layernorm``,
  ``self_attn.language_expert_query_key_value`` (q, k, v stacked: split into ``q_proj``/``k_proj``/``v_proj``),
  ``self_attn.language_expert_dense`` (``o_proj``), ``mlp.language_mlp.{gate,up,down}_proj`` -> a LLaMA
  ``hf_causal_lm`` (rotate-half RoPE, base 10000, RMSNorm: the same math);
* ``self_attn.vision_expert_query_key_value`` / ``vision_expert_dense`` / ``mlp.vision_mlp.*`` -> the
  ``visual_expert`` injector's copies of those linears, with ``last_token_text`` (CogVLM's ``get_expert_mask``: a
  token takes the vision expert only when it and the next token are image tokens, so eoi uses the language weights).

Positions: the backbone takes ``media_positions: cogvlm``, CogVLM's ``build_position_ids`` (bos 0, boi 1, every
patch 2, eoi 3, text 4, ...). The rotary ``inv_freq`` buffers some checkpoints carry are recomputed, not loaded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from mmhub.errors import CheckpointError
from mmhub.importers.base import Checkpoint, Imported, Importer, ImportOptions

VISION_KEYS = ("image_size", "patch_size", "hidden_size", "num_hidden_layers", "num_heads", "intermediate_size",
               "layer_norm_eps", "in_channels")
TOKENIZER_FALLBACK = "hf:lmsys/vicuna-7b-v1.5"  # cogvlm-chat-hf ships no tokenizer; the authors' demos load this one
LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
INV_FREQ = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


def _need(config: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in config:
        raise CheckpointError(f"{where}: config.json has no {key!r}, which a CogVLM config always has; the folder is "
                              f"not a CogVLM checkpoint or is damaged")
    return config[key]


def _llama_config(config: Mapping[str, Any], where: str) -> dict[str, Any]:
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{where}: hidden_act {act!r}; CogVLM's language MLP (and mmhub's LLaMA) is silu")
    return {"model_type": "llama", "vocab_size": _need(config, "vocab_size", where),
            "hidden_size": _need(config, "hidden_size", where),
            "intermediate_size": _need(config, "intermediate_size", where),
            "num_hidden_layers": _need(config, "num_hidden_layers", where),
            "num_attention_heads": _need(config, "num_attention_heads", where),
            "num_key_value_heads": config["num_attention_heads"],
            "max_position_embeddings": config.get("max_position_embeddings", 2048),
            "rms_norm_eps": config.get("rms_norm_eps", 1e-5), "hidden_act": "silu", "rope_theta": 10000.0,
            "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
            "bos_token_id": config.get("bos_token_id", 1), "eos_token_id": config.get("eos_token_id", 2),
            "pad_token_id": config.get("pad_token_id", 0)}


def _vision_settings(config: Mapping[str, Any], where: str) -> dict[str, Any]:
    vision = _need(config, "vision_config", where)
    if vision.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"{where}: vision_config.hidden_act {vision['hidden_act']!r}; the EVA2-CLIP tower "
                              f"computes gelu")
    missing = [k for k in VISION_KEYS if k not in vision and k != "in_channels"]
    if missing:
        raise CheckpointError(f"{where}: vision_config lacks {', '.join(missing)}")
    settings = {"type": "eva2_clip", **{k: vision[k] for k in VISION_KEYS if k in vision}, "drop_cls": True}
    grid = vision["image_size"] // vision["patch_size"]
    if "num_positions" in vision and vision["num_positions"] != grid * grid + 1:
        raise CheckpointError(f"{where}: vision_config.num_positions {vision['num_positions']} != "
                              f"(image_size / patch_size)^2 + 1 = {grid * grid + 1}")
    return settings


def convert_cogvlm(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any], *,
                   tokenizer: str = TOKENIZER_FALLBACK, template: str = "cogvlm", dtype: str = "float32",
                   where: str = "CogVLM checkpoint") -> Imported:
    """A CogVLM state dict (the authors' key names) and its ``config.json`` -> the mmhub spec and weight map
    (``encoders.image``, ``projectors.image``, ``backbone.model``, ``injectors.experts``). Every tensor must be
    placed: an unknown name is an error listing it."""
    hidden = _need(config, "hidden_size", where)
    llama = _llama_config(config, where)
    tower: dict[str, torch.Tensor] = {}
    projector: dict[str, torch.Tensor] = {}
    lm: dict[str, torch.Tensor] = {}
    experts: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    dropped: list[str] = []
    attn_names = {"language_expert_dense.weight": "o_proj", "vision_expert_dense.weight": "o_proj"}
    for key, value in state_dict.items():
        if key.startswith("model.vision.linear_proj."):
            projector["linear_proj." + key[len("model.vision.linear_proj."):]] = value
        elif key in ("model.vision.boi", "model.vision.eoi"):
            projector[key.rsplit(".", 1)[1]] = value
        elif key.startswith("model.vision."):
            tower[key[len("model.vision."):]] = value
        elif key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            lm[key] = value
        elif INV_FREQ.match(key):
            dropped.append(key)
        elif m := LAYER.match(key):
            i, rest = m.group(1), m.group(2)
            if rest in ("input_layernorm.weight", "post_attention_layernorm.weight"):
                lm[key] = value
            elif rest.endswith("expert_query_key_value.weight"):
                if value.shape != (3 * hidden, hidden):
                    raise CheckpointError(f"{where}: {key} is {tuple(value.shape)}, expected (3 * hidden_size, "
                                          f"hidden_size) = {(3 * hidden, hidden)}")
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.split(hidden), strict=True):
                    if rest.startswith("self_attn.language"):
                        lm[f"model.layers.{i}.self_attn.{name}.weight"] = part
                    else:
                        experts[f"experts.{i}__self_attn__{name}.weight"] = part
            elif rest.startswith("self_attn.") and rest[len("self_attn."):] in attn_names:
                if "language" in rest:
                    lm[f"model.layers.{i}.self_attn.o_proj.weight"] = value
                else:
                    experts[f"experts.{i}__self_attn__o_proj.weight"] = value
            elif mm := re.match(r"^mlp\.(language|vision)_mlp\.(gate_proj|up_proj|down_proj)\.weight$", rest):
                if mm.group(1) == "language":
                    lm[f"model.layers.{i}.mlp.{mm.group(2)}.weight"] = value
                else:
                    experts[f"experts.{i}__mlp__{mm.group(2)}.weight"] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        shown = ", ".join(sorted(unknown)[:8]) + (f" ... and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        raise CheckpointError(f"{where}: {len(unknown)} tensor(s) outside CogVLM's key layout ({shown}); the "
                              f"converter places model.vision.*, model.embed_tokens/norm, model.layers.N.* and lm_head")
    if not tower or not projector or "lm_head.weight" not in lm:
        raise CheckpointError(f"{where}: no vision tower, projector or lm_head tensors (found {len(tower)}, "
                              f"{len(projector)}, {'an' if 'lm_head.weight' in lm else 'no'} lm_head); not a CogVLM "
                              f"state dict")
    spec = {
        "name": "cogvlm-imported",
        "description": f"CogVLM converted from {where}: EVA2-CLIP -> GLU with boi/eoi -> LLaMA with visual experts",
        "encoders": {"image": _vision_settings(config, where)},
        "projectors": {"image": {"type": "glu", "intermediate_size": llama["intermediate_size"],
                                 "boundary_tokens": True}},
        "backbone": {"type": "hf_causal_lm", "config": llama, "tokenizer": tokenizer, "dtype": dtype,
                     "media_positions": "cogvlm"},
        "injectors": {"experts": {"type": "visual_expert", "last_token_text": True}},
        "template": template,
    }
    weights = {"encoders.image": tower, "projectors.image": projector, "backbone.model": lm,
               "injectors.experts": experts}
    notes = []
    if dropped:
        notes.append(f"{len(dropped)} rotary inv_freq buffer(s) recomputed from head_dim and base 10000, not loaded")
    return Imported(spec=spec, weights=weights, notes=notes)


def _has_tokenizer(ckpt: Checkpoint) -> bool:
    return any((ckpt.folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


class CogVLMImporter(Importer):
    """CogVLM v1 (THUDM/cogvlm-chat-hf, cogvlm-base-*-hf): a remote-code folder converted without running its code."""

    name: ClassVar[str] = "cogvlm"
    model_types: ClassVar[tuple[str, ...]] = ("cogvlm",)
    architectures: ClassVar[tuple[str, ...]] = ("CogVLMForCausalLM",)
    runs_checkpoint_code: ClassVar[bool] = False
    description: ClassVar[str] = ("CogVLM: EVA2-CLIP (eva2_clip) -> GLU with boi/eoi (glu) -> LLaMA (hf_causal_lm) "
                                  "with visual experts (visual_expert); converted from the authors' key layout")

    def convert(self, ckpt: Checkpoint, options: ImportOptions) -> Imported:
        state = ckpt.take("")
        tokenizer = str(ckpt.folder) if _has_tokenizer(ckpt) else TOKENIZER_FALLBACK
        base = ckpt.config.get("template_version") == "base"
        template = options.template or ("cogvlm-base" if base else "cogvlm")
        imported = convert_cogvlm(state, ckpt.config, tokenizer=tokenizer, template=template,
                                  dtype=options.dtype, where=str(ckpt.folder))
        imported.spec["name"] = ckpt.folder.name
        if tokenizer == TOKENIZER_FALLBACK:
            imported.notes.append(f"the folder has no tokenizer; the tokenizer is {TOKENIZER_FALLBACK}'s (as in the "
                                  f"authors' demos), read from the local Hugging Face cache")
        return imported
