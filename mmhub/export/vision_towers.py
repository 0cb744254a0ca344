"""An mmhub image encoder as a transformers CLIP/SigLIP vision tower: config + tensors under its own key names.

LLaVA's vision tower is a transformers vision model, so an exported encoder must become
one that computes the same hidden states:

* ``hf_vision`` already is one; its tensors are taken as they are. When mmhub runs it at
  an ``image_size`` other than the tower's own (interpolating the position embeddings on
  every call), the interpolated embeddings are computed once here, by the tower's own
  ``interpolate_pos_encoding``, and written with that image size.
* ``open_clip`` ViT towers (``VisionTransformer``: conv patch embedding, class token,
  learned positions, ``ln_pre``, pre-norm blocks of ``nn.MultiheadAttention`` + GELU or
  QuickGELU MLP) are the same network as transformers' ``CLIPVisionModel``: the fused
  ``in_proj`` splits into ``q_proj``/``k_proj``/``v_proj`` and every other tensor is
  renamed. Block k's output is ``hidden_states[k]`` in both, so ``select_layer`` carries
  over unchanged. Towers with layer scale, custom blocks (QK-norm, scaled cosine
  attention, head scaling), no ``ln_pre``, a tanh-approximated GELU or a timm trunk (EVA)
  are not this network; `open_clip_problems` names what stands in the way.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from mmhub.errors import ExportError

SLOT = "encoders.image (open_clip)"


def hf_vision_tower(encoder: Any, image_size: int, family: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """An hf_vision encoder's config and tensors, for inputs of `image_size` (position embeddings baked in)."""
    cfg = copy.deepcopy(encoder.hf_config)
    state = {k: v.detach() for k, v in encoder.model.state_dict().items()}
    if image_size != cfg.image_size:
        if image_size % cfg.patch_size:
            raise ExportError(f"encoders.image (hf_vision): image_size {image_size} is not a multiple of "
                              f"the patch size "
                             f"{cfg.patch_size}")
        emb = encoder.model.get_submodule("embeddings")
        weight = emb.position_embedding.weight
        n = (image_size // cfg.patch_size) ** 2 + (1 if family == "clip" else 0)  # CLIP has a class position
        with torch.no_grad():
            pos = emb.interpolate_pos_encoding(weight.new_zeros(1, n, weight.shape[1]), image_size, image_size)
        state["embeddings.position_embedding.weight"] = pos[0].detach().clone()
        cfg.image_size = image_size
    return cfg, state


def _activation(block: nn.Module) -> str | None:
    from open_clip.transformer import QuickGELU

    act = block.mlp.gelu if hasattr(block.mlp, "gelu") else None
    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if isinstance(act, nn.GELU) and act.approximate == "none":
        return "gelu"
    return None


def open_clip_problems(encoder: Any) -> list[str]:
    """Why an open_clip encoder's tower is not transformers' CLIP vision model (empty when it is)."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    tower = encoder.tower
    if not isinstance(tower, VisionTransformer):
        return [f"{SLOT}: a {type(tower).__name__} tower (timm trunk such as EVA) is not converted to transformers' "
                f"CLIP; only open_clip VisionTransformer towers are"]
    problems = []
    blocks = list(tower.transformer.resblocks)
    if not all(type(b) is ResidualAttentionBlock for b in blocks):
        problems.append(f"{SLOT}: custom blocks (QK-norm, scaled cosine attention or head/attention scaling) have no "
                        f"CLIP counterpart")
    elif any(not isinstance(b.ls_1, nn.Identity) or not isinstance(b.ls_2, nn.Identity) for b in blocks):
        problems.append(f"{SLOT}: layer scale (ls_init_value) has no CLIP counterpart")
    elif any(_activation(b) is None for b in blocks) or len({_activation(b) for b in blocks}) != 1:
        problems.append(f"{SLOT}: its MLP activation is not GELU (exact) or QuickGELU, CLIP's two")
    elif any(hasattr(b, "ln_1_kv") or not b.attn._qkv_same_embed_dim or b.attn.in_proj_bias is None for b in blocks):
        problems.append(f"{SLOT}: its attention is not one fused, biased q/k/v projection as CLIP's is")
    if not isinstance(tower.ln_pre, nn.LayerNorm):
        problems.append(f"{SLOT}: no_ln_pre; CLIP always normalises before the blocks")
    norms = [m for m in tower.modules() if isinstance(m, nn.LayerNorm)]
    if len({m.eps for m in norms}) > 1 or any(not m.elementwise_affine for m in norms):
        problems.append(f"{SLOT}: its LayerNorms differ in eps or lack weights; CLIP has one layer_norm_eps")
    if tower.conv1.bias is not None or tower.image_size[0] != tower.image_size[1] \
            or tower.patch_size[0] != tower.patch_size[1]:
        problems.append(f"{SLOT}: a biased or non-square patch embedding / image; CLIP's are square and bias-free")
    return problems


def open_clip_tower(encoder: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """An open_clip ViT tower as transformers' ``CLIPVisionConfig`` and ``CLIPVisionModel`` tensors
    (check `open_clip_problems` first)."""
    from transformers import CLIPVisionConfig

    tower = encoder.tower
    blocks = list(tower.transformer.resblocks)
    width = tower.conv1.out_channels
    dtype = tower.conv1.weight.dtype
    cfg = CLIPVisionConfig(hidden_size=width, intermediate_size=blocks[0].mlp.c_fc.out_features,
                           num_hidden_layers=len(blocks), num_attention_heads=blocks[0].attn.num_heads,
                           image_size=tower.image_size[0], patch_size=tower.patch_size[0], num_channels=3,
                           hidden_act=_activation(blocks[0]), layer_norm_eps=tower.ln_pre.eps)
    state = {"embeddings.class_embedding": tower.class_embedding,
             "embeddings.patch_embedding.weight": tower.conv1.weight,
             "embeddings.position_embedding.weight": tower.positional_embedding,
             "pre_layrnorm.weight": tower.ln_pre.weight, "pre_layrnorm.bias": tower.ln_pre.bias}
    for i, b in enumerate(blocks):
        at = f"encoder.layers.{i}."
        for name, w, bias in zip(("q_proj", "k_proj", "v_proj"), b.attn.in_proj_weight.chunk(3),
                                 b.attn.in_proj_bias.chunk(3), strict=True):
            state[f"{at}self_attn.{name}.weight"], state[f"{at}self_attn.{name}.bias"] = w, bias
        pairs = {"self_attn.out_proj": b.attn.out_proj, "layer_norm1": b.ln_1, "layer_norm2": b.ln_2,
                 "mlp.fc1": b.mlp.c_fc, "mlp.fc2": b.mlp.c_proj}
        for name, mod in pairs.items():
            state[f"{at}{name}.weight"], state[f"{at}{name}.bias"] = mod.weight, mod.bias
    post = getattr(tower, "ln_post", None)
    if isinstance(post, nn.LayerNorm) and post.normalized_shape == (width,):
        state["post_layernorm.weight"], state["post_layernorm.bias"] = post.weight, post.bias
    else:  # LLaVA never applies it to the hidden states it reads; a neutral LayerNorm fills the slot
        state["post_layernorm.weight"], state["post_layernorm.bias"] = torch.ones(width, dtype=dtype), \
            torch.zeros(width, dtype=dtype)
    return cfg, {k: v.detach().clone() for k, v in state.items()}  # clones: the q/k/v chunks share storage
