"""MiniGPT-4 checkpoints (Vision-CAIR's key layout, outside transformers) -> an mmhub model.

MiniGPT-4 is BLIP-2's frozen EVA ViT-g, ``ln_vision`` and Q-Former (LAVIS layout: ``visual_encoder.*``,
``ln_vision.*``, ``query_tokens``, ``Qformer.bert.*``) plus its own ``llama_proj`` linear into a Vicuna/LLaMA
(``llama_model.*`` when the state dict carries it). `minigpt4_parts` maps such a state dict onto mmhub parts:

* the EVA tower -> ``hf_vision`` over transformers' BLIP-2 vision model (``ln_vision`` is its ``post_layernorm``;
  the separate q/v biases become the fused qkv bias with a zero key bias), as transformers' own BLIP-2 conversion
  renames it;
* ``query_tokens`` + ``Qformer.bert`` -> ``qformer`` with ``layout: blip2`` (`mmhub.projectors.qformer_blip2`),
  ``llama_proj`` its output linear;
* ``llama_model.*`` -> an ``hf_causal_lm`` LLaMA built from the given text config; or any backbone spec the caller
  gives (the published MiniGPT-4 file holds only ``llama_proj``: the LLM is a separate Vicuna folder).

BLIP-2 training leftovers MiniGPT-4 never runs (the Q-Former's text embeddings and text FFN, ``Qformer.cls``,
``vision_proj``, ``text_proj``, ``itm_head``, ``temp``) are dropped and named in the notes; any other unknown key is
an error. Widths, depths and token counts come from the tensors' shapes; head counts are not in a state dict, so they
are settings (EVA ViT-g 16, BERT-base Q-Former 12). Only tensors are read: pass a dict (from safetensors).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch

from mmhub.errors import CheckpointError
from mmhub.importers.base import Imported
from mmhub.projectors.qformer_blip2 import qformer_state

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
# what MiniGPT-4 inherits from BLIP-2's pre-training but never computes with
UNUSED = (r"Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings)\.",
          r"Qformer\.bert\.embeddings\.position_ids", r"Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.",
          r"Qformer\.cls\.", r"vision_proj\.", r"text_proj\.", r"itm_head\.", r"temp$")
_BLOCK = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
          "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


class _Reader:
    """A state dict whose reads are recorded, so the keys nothing read can be named."""

    def __init__(self, state: Mapping[str, torch.Tensor]):
        self.state, self.used = state, set()

    def __call__(self, key: str) -> torch.Tensor:
        if key not in self.state:
            raise CheckpointError(f"MiniGPT-4 state dict: no {key!r}; it is not a MiniGPT-4/BLIP-2 (LAVIS) checkpoint")
        self.used.add(key)
        return self.state[key]


def eva_tower(read: _Reader, heads: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``visual_encoder.*`` + ``ln_vision.*`` -> (transformers BLIP-2 vision config settings, its state dict)."""
    state = read.state
    cls = read("visual_encoder.cls_token")
    pos = read("visual_encoder.pos_embed")
    patch = read("visual_encoder.patch_embed.proj.weight")
    width, side = cls.shape[-1], math.isqrt(pos.shape[1] - 1)
    if side * side != pos.shape[1] - 1:
        raise CheckpointError(f"visual_encoder.pos_embed {tuple(pos.shape)}: {pos.shape[1] - 1} patch positions are "
                              f"not a square grid")
    if width % heads:
        raise CheckpointError(f"the EVA tower's width {width} is not divisible by vision_heads {heads}; pass the "
                              f"tower's head count")
    blocks = sorted({int(m.group(1)) for k in state if (m := re.match(r"visual_encoder\.blocks\.(\d+)\.", k))})
    out = {"embeddings.class_embedding": cls, "embeddings.position_embedding": pos,
           "embeddings.patch_embedding.weight": patch,
           "embeddings.patch_embedding.bias": read("visual_encoder.patch_embed.proj.bias"),
           "post_layernorm.weight": read("ln_vision.weight"), "post_layernorm.bias": read("ln_vision.bias")}
    for i in blocks:
        src = f"visual_encoder.blocks.{i}."
        for ours, theirs in _BLOCK.items():
            for leaf in ("weight", "bias"):
                if ours == "attn.qkv" and leaf == "bias":
                    q, v = read(src + "attn.q_bias"), read(src + "attn.v_bias")
                    out[f"encoder.layers.{i}.self_attn.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
                else:
                    out[f"encoder.layers.{i}.{theirs}.{leaf}"] = read(f"{src}{ours}.{leaf}")
    mlp = read(f"visual_encoder.blocks.{blocks[0]}.mlp.fc1.weight").shape[0]
    config = {"model_type": "blip_2_vision_model", "hidden_size": width, "num_hidden_layers": len(blocks),
              "num_attention_heads": heads, "intermediate_size": mlp, "image_size": side * patch.shape[-1],
              "patch_size": patch.shape[-1], "qkv_bias": True, "hidden_act": "gelu", "layer_norm_eps": 1e-6}
    return config, out


def lavis_qformer(read: _Reader) -> dict[str, torch.Tensor]:
    """``Qformer.bert.*`` (LAVIS BERT names) -> transformers' Q-Former names (``self`` -> ``attention``), text-only
    parts left out."""
    out = {}
    for key in read.state:
        if not key.startswith("Qformer.bert.") or any(re.match(p, key) for p in UNUSED):
            continue
        value = read(key)
        rest = key[len("Qformer.bert."):]
        rest = "layernorm." + rest[len("embeddings.LayerNorm."):] if rest.startswith("embeddings.LayerNorm.") else rest
        out[rest.replace("attention.self.", "attention.attention.")] = value
    return out


def minigpt4_parts(state: Mapping[str, torch.Tensor], backbone: dict[str, Any] | None = None,
                   text_config: dict[str, Any] | None = None, vision_heads: int = 16, qformer_heads: int = 12,
                   template: str = "vicuna_v1", placeholder: str = "<image>") -> Imported:
    """A MiniGPT-4 state dict -> the mmhub spec and weight map (`Imported`). The LLM: ``llama_model.*`` tensors with
    `text_config` (a transformers LLaMA config dict), or `backbone` (any backbone spec, e.g. a Vicuna folder as
    ``source``). Raises `CheckpointError` naming any key it cannot place."""
    read = _Reader(state)
    dropped = sorted(k for k in state if any(re.match(p, k) for p in UNUSED))
    vision_config, tower = eva_tower(read, vision_heads)
    q = lavis_qformer(read)
    query_tokens = read("query_tokens")
    layers = sorted({int(m.group(1)) for k in q if (m := re.match(r"encoder\.layer\.(\d+)\.", k))})
    cross = [i for i in layers if f"encoder.layer.{i}.crossattention.attention.query.weight" in q]
    every = cross[1] - cross[0] if len(cross) > 1 else len(layers)
    if cross != list(range(0, len(layers), every)):
        raise CheckpointError(f"the Q-Former cross-attends in layers {cross}, not every k-th layer from 0")
    width = query_tokens.shape[-1]
    if "encoder.layer.0.intermediate_query.dense.weight" not in q:
        raise CheckpointError("MiniGPT-4 state dict: no Qformer.bert.encoder.layer.0.intermediate_query.dense.weight")
    hidden = q["encoder.layer.0.intermediate_query.dense.weight"].shape[0]
    proj_w = read("llama_proj.weight")
    projector = {f"qformer.{k}": v for k, v in qformer_state(q, query_tokens, text_ffn=False).items()}
    projector |= {"proj.weight": proj_w, "proj.bias": read("llama_proj.bias")}
    weights = {"encoders.image.model": tower, "projectors.image": projector}
    if backbone is None:
        llm = {k[len("llama_model."):]: read(k) for k in state if k.startswith("llama_model.")}
        if not llm or text_config is None:
            raise CheckpointError("MiniGPT-4's LLM: the state dict has no llama_model.* tensors (the published file "
                                  "holds only llama_proj) or no text_config was given; pass backbone= (e.g. "
                                  "{type: hf_causal_lm, source: <Vicuna folder>}) or both")
        backbone = {"type": "hf_causal_lm", "config": {"model_type": "llama", **text_config}}
        weights["backbone.model"] = llm
    stray = sorted(set(state) - read.used - set(dropped))
    if stray:
        raise CheckpointError(f"MiniGPT-4 state dict: {len(stray)} key(s) with no place in mmhub "
                              f"({', '.join(stray[:8])}); it is not a MiniGPT-4 checkpoint, or parts of it are unknown")
    spec = {"name": "minigpt-4",
            "description": "converted from a MiniGPT-4 (LAVIS layout) state dict",
            "encoders": {"image": {"type": "hf_vision", "config": vision_config, "select_layer": -1, "final_norm": True,
                                   "drop_cls": False, "image_size": vision_config["image_size"], "resize": "squash",
                                   "interpolation": "bicubic", "mean": CLIP_MEAN, "std": CLIP_STD}},
            "projectors": {"image": {"type": "qformer", "layout": "blip2", "num_queries": query_tokens.shape[-2],
                                     "layers": len(layers), "width": width, "heads": qformer_heads,
                                     "cross_attention_every": every, "mlp_ratio": hidden / width, "norm_eps": 1e-12,
                                     "out_dim": proj_w.shape[0]}},
            "backbone": backbone, "template": template, "placeholders": {"image": placeholder}}
    notes = [f"dropped {len(dropped)} BLIP-2 pre-training tensor(s) MiniGPT-4 does not use"] if dropped else []
    return Imported(spec=spec, weights=weights, notes=notes)


def convert_minigpt4(state: Mapping[str, torch.Tensor], **settings: Any) -> Any:
    """A MiniGPT-4 state dict -> an `MMModel` with every weight loaded strictly (eval mode); `settings` as for
    `minigpt4_parts`."""
    from mmhub.assembly import build
    from mmhub.importers.run import apply_imported

    imported = minigpt4_parts(state, **settings)
    model = build(imported.spec)
    apply_imported(model, imported, "MiniGPT-4 state dict")
    model.import_notes = imported.notes
    model.eval()
    return model
