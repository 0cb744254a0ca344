"""mPLUG-Owl (v1, X-PLUG/mPLUG-Owl's transformers-format release, e.g. ``MAGAer13/mplug-owl-llama-7b``) -> mmhub
components plus a weight map.

Key layout (``MplugOwlForConditionalGeneration`` in the authors' ``modeling_mplug_owl.py``):

* ``vision_model.{embeddings.{cls_token, patch_embed, position_embedding, pre_layernorm}, encoder.layers.N.
  {input_layernorm, self_attn.query_key_value, self_attn.dense, post_attention_layernorm, mlp.fc1, mlp.fc2},
  post_layernorm}`` -> ``hf_vision`` over transformers' CLIP vision tower (quick GELU, pre-LN, every token of the last
  block through ``post_layernorm``, CLS kept: the authors' ``last_hidden_state``); ``query_key_value`` holds each
  head's q, k, v in turn (heads, 3, head_dim) and is split into ``q_proj``/``k_proj``/``v_proj``;
* ``query_tokens`` and ``abstractor.{encoder.layers.N.crossattention.*, visual_fc, vit_eos}`` -> the
  ``visual_abstractor`` projector, names unchanged;
* ``language_model.*`` -> a LLaMA ``hf_causal_lm`` from ``text_config``.

The folder's ``model_type`` is ``mplug-owl``, which transformers does not know: only ``config.json`` and the tensors
are read, no code of the authors runs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from mmhub.errors import CheckpointError
from mmhub.importers.base import Checkpoint, Imported, Importer, ImportOptions

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
VISION_LAYER = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.(.+)$")
VISION_NAMES = {"input_layernorm": "layer_norm1", "post_attention_layernorm": "layer_norm2",
                "self_attn.dense": "self_attn.out_proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
META = ("transformers_version", "_name_or_path", "architectures", "torch_dtype", "dtype", "id2label", "label2id")


def _clip_config(vision: Mapping[str, Any], where: str) -> dict[str, Any]:
    act = vision.get("hidden_act", "quick_gelu")
    if act != "quick_gelu":
        raise CheckpointError(f"{where}: vision_config.hidden_act {act!r}; mPLUG-Owl's tower computes quick_gelu")
    return {"model_type": "clip_vision_model", "hidden_size": vision.get("hidden_size", 1024),
            "intermediate_size": vision.get("intermediate_size", 4096),
            "num_hidden_layers": vision.get("num_hidden_layers", 24),
            "num_attention_heads": vision.get("num_attention_heads", 16), "image_size": vision.get("image_size", 224),
            "patch_size": vision.get("patch_size", 14), "hidden_act": "quick_gelu",
            "layer_norm_eps": vision.get("layer_norm_eps", 1e-6)}


def _split_qkv(value: torch.Tensor, heads: int) -> tuple[torch.Tensor, ...]:
    """mPLUG-Owl's fused (heads, 3, head_dim) output rows -> q, k, v rows."""
    parts = value.reshape(heads, 3, value.shape[0] // (3 * heads), *value.shape[1:])
    return tuple(parts[:, i].reshape(value.shape[0] // 3, *value.shape[1:]) for i in range(3))


def convert_mplug_owl(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any], *, tokenizer: str = "byte",
                      template: str = "mplug-owl", dtype: str = "float32",
                      where: str = "mPLUG-Owl checkpoint") -> Imported:
    """An mPLUG-Owl state dict (the authors' key names) and its ``config.json`` -> the mmhub spec and weight map
    (``encoders.image.model``, ``projectors.image``, ``backbone.model``). Every tensor must be placed."""
    for key in ("vision_config", "text_config"):
        if not isinstance(config.get(key), Mapping):
            raise CheckpointError(f"{where}: config.json has no {key}; not an mPLUG-Owl config")
    clip = _clip_config(config["vision_config"], where)
    heads = clip["num_attention_heads"]
    abstractor_cfg = dict(config.get("visual_abstractor_config") or {})
    tower: dict[str, torch.Tensor] = {}
    projector: dict[str, torch.Tensor] = {}
    lm: dict[str, torch.Tensor] = {}
    unknown = []
    embed = {"vision_model.embeddings.patch_embed.weight": "embeddings.patch_embedding.weight",
             "vision_model.embeddings.pre_layernorm.weight": "pre_layrnorm.weight",
             "vision_model.embeddings.pre_layernorm.bias": "pre_layrnorm.bias",
             "vision_model.post_layernorm.weight": "post_layernorm.weight",
             "vision_model.post_layernorm.bias": "post_layernorm.bias"}
    for key, value in state_dict.items():
        if key in embed:
            tower[embed[key]] = value
        elif key == "vision_model.embeddings.cls_token":
            tower["embeddings.class_embedding"] = value.reshape(-1)
        elif key == "vision_model.embeddings.position_embedding":
            tower["embeddings.position_embedding.weight"] = value.reshape(-1, value.shape[-1])
        elif m := VISION_LAYER.match(key):
            i, rest = m.group(1), m.group(2)
            stem, _, leaf = rest.rpartition(".")
            if stem == "self_attn.query_key_value":
                for name, part in zip(("q_proj", "k_proj", "v_proj"), _split_qkv(value, heads), strict=True):
                    tower[f"encoder.layers.{i}.self_attn.{name}.{leaf}"] = part
            elif stem in VISION_NAMES:
                tower[f"encoder.layers.{i}.{VISION_NAMES[stem]}.{leaf}"] = value
            else:
                unknown.append(key)
        elif key == "query_tokens":
            projector["query_tokens"] = value
        elif key.startswith("abstractor."):
            projector[key[len("abstractor."):]] = value
        elif key.startswith("language_model."):
            lm[key[len("language_model."):]] = value
        else:
            unknown.append(key)
    if unknown:
        shown = ", ".join(sorted(unknown)[:8]) + (f" ... and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        raise CheckpointError(f"{where}: {len(unknown)} tensor(s) outside mPLUG-Owl's key layout ({shown})")
    query = projector.get("query_tokens")
    if query is None or "vit_eos" not in projector or not lm:
        raise CheckpointError(f"{where}: no query_tokens, abstractor.vit_eos or language_model.* tensors; not an "
                              f"mPLUG-Owl state dict")
    layers = len({k.split(".")[2] for k in projector if k.startswith("encoder.layers.")})
    w1 = projector.get("encoder.layers.0.crossattention.output.mlp.w1.weight")
    text = {k: v for k, v in config["text_config"].items() if k not in META}
    text.setdefault("model_type", "llama")
    spec = {
        "name": "mplug-owl-imported",
        "description": f"mPLUG-Owl converted from {where}: CLIP ViT -> visual abstractor -> LLaMA",
        "encoders": {"image": {"type": "hf_vision", "config": clip, "select_layer": -1, "final_norm": True,
                               "drop_cls": False, "image_size": clip["image_size"], "resize": "squash",
                               "interpolation": "bicubic", "mean": CLIP_MEAN, "std": CLIP_STD}},
        "projectors": {"image": {"type": "visual_abstractor", "num_queries": int(query.shape[-2]), "layers": layers,
                                 "width": int(query.shape[-1]), "heads": abstractor_cfg.get("num_attention_heads", 16),
                                 "intermediate_size": int(w1.shape[0]) if w1 is not None else 2816,
                                 "norm_eps": abstractor_cfg.get("layer_norm_eps", 1e-6)}},
        "backbone": {"type": "hf_causal_lm", "config": text, "tokenizer": tokenizer, "dtype": dtype},
        "template": template,
    }
    weights = {"encoders.image.model": tower, "projectors.image": projector, "backbone.model": lm}
    return Imported(spec=spec, weights=weights, notes=[])


class MplugOwlImporter(Importer):
    """mPLUG-Owl v1 in the authors' transformers format (model_type mplug-owl), converted without their code."""

    name: ClassVar[str] = "mplug_owl"
    model_types: ClassVar[tuple[str, ...]] = ("mplug-owl",)
    architectures: ClassVar[tuple[str, ...]] = ("MplugOwlForConditionalGeneration",)
    runs_checkpoint_code: ClassVar[bool] = False
    description: ClassVar[str] = ("mPLUG-Owl: CLIP ViT (hf_vision) -> visual_abstractor -> LLaMA (hf_causal_lm); "
                                  "converted from the authors' key layout")

    def convert(self, ckpt: Checkpoint, options: ImportOptions) -> Imported:
        imported = convert_mplug_owl(ckpt.take(""), ckpt.config, tokenizer=str(ckpt.folder),
                                     template=options.template or "mplug-owl", dtype=options.dtype,
                                     where=str(ckpt.folder))
        imported.spec["name"] = ckpt.folder.name
        return imported
