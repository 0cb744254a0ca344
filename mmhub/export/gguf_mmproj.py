"""The vision tower and projector of a LLaVA-shaped mmhub model as llama.cpp's ``mmproj`` GGUF (architecture ``clip``).

llama.cpp's multimodal loader (``mtmd``, also inside llama-cpp-python and Ollama) reads a CLIP-style ViT and a LLaVA
two-layer MLP projector (``clip.projector_type`` ``mlp``) from this file, beside the language model's GGUF:

* metadata: image and patch size, width, feed-forward width, depth, heads, LayerNorm epsilon, the image mean and
  std, the MLP activation (``clip.use_gelu``: CLIP's quick-GELU when false, GELU when true) and the hidden layer
  that feeds the projector (``clip.vision.feature_layer``, a non-negative hidden-state index: LLaVA's -2 of a
  24-layer tower is 23; only the layers up to it are written, so ``block_count`` is that index);
* tensors under llama.cpp's names: ``v.patch_embd``, ``v.class_embd`` (CLIP; SigLIP has no class token),
  ``v.position_embd``, ``v.pre_ln`` (CLIP), ``v.blk.N.{attn_q,attn_k,attn_v,attn_out,ln1,ln2,ffn_up,ffn_down}``,
  and the projector as ``mm.0`` / ``mm.2`` (LLaVA's ``linear_1`` / ``linear_2``); no ``v.post_ln``, which LLaVA's
  selected layer never passes through. Matrices are float32 or float16; embeddings, norms and biases float32.

What llama.cpp computes differently is said, not hidden: its projector GELU is the tanh approximation (LLaVA's
is exact erf GELU) and its ViT GELU likewise for towers with ``gelu`` MLPs; for CLIP towers recent llama.cpp
versions put the class token last and read patch positions shifted by one (ggml-org/llama.cpp issue 25814), so
CLIP towers agree only approximately while SigLIP towers (no class token) take the exact path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmhub.errors import ExportError

_BLOCK = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2", "mlp.fc1": "ffn_up",
          "mlp.fc2": "ffn_down"}
_EMBED = {"embeddings.patch_embedding.weight": "v.patch_embd.weight",
          "embeddings.patch_embedding.bias": "v.patch_embd.bias",
          "embeddings.class_embedding": "v.class_embd",
          "embeddings.position_embedding.weight": "v.position_embd.weight",
          "pre_layrnorm.weight": "v.pre_ln.weight", "pre_layrnorm.bias": "v.pre_ln.bias"}
# ViT MLP activations llama.cpp has: CLIP's quick GELU (use_gelu false) and GELU (use_gelu true; tanh form)
_VIT_ACT = {"quick_gelu": False, "gelu": True, "gelu_pytorch_tanh": True, "gelu_new": True}


def feature_index(select_layer: int, layers: int) -> int:
    """LLaVA's ``vision_feature_layer`` (negative counts from the end of the hidden states) as the non-negative
    hidden-state index llama.cpp reads (0 = the embeddings, k = after block k)."""
    k = select_layer if select_layer >= 0 else layers + 1 + select_layer
    if not 1 <= k <= layers:
        raise ExportError(f"encoders.image: select_layer {select_layer} of a {layers}-layer tower is hidden state {k}; "
                          f"llama.cpp feeds the projector from one of blocks 1..{layers}")
    return k


def mmproj_problems(family: str, vision_cfg: Any, strategy: str, activation: str, linear_2: bool) -> list[str]:
    """What keeps a LLaVA vision tower + projector from llama.cpp's ``mlp`` mmproj."""
    problems = []
    act = getattr(vision_cfg, "hidden_act", None)
    if act not in _VIT_ACT:
        problems.append(f"encoders.image ({family}): its MLP activation {act!r} is not one llama.cpp's CLIP graph has "
                        f"({', '.join(_VIT_ACT)})")
    if family == "clip" and strategy != "default":
        problems.append("encoders.image (clip): drop_cls: false sends the class token to the LLM, which llama.cpp's "
                        "LLaVA graph never does (fix: drop_cls: true)")
    if not linear_2 or activation != "gelu":
        problems.append(f"projectors.image: llama.cpp's mlp projector is linear -> GELU -> linear; this one is "
                        f"{'a single linear layer' if not linear_2 else f'linear -> {activation} -> linear'} "
                        "(fix: mlp, depth 2, activation gelu)")
    return problems


def _vision_name(key: str, keep: int) -> str | None:
    """A transformers CLIP/SigLIP vision-model key -> its mmproj name; None for tensors llama.cpp does not read
    (post-layernorm, SigLIP's pooling head, blocks past the feature layer)."""
    key = key.removeprefix("vision_model.")
    if key in _EMBED:
        return _EMBED[key]
    if key.startswith(("post_layernorm.", "head.")):
        return None
    parts = key.split(".")
    if parts[0] == "encoder" and parts[1] == "layers":
        n = int(parts[2])
        if n >= keep:
            return None
        inner, leaf = ".".join(parts[3:-1]), parts[-1]
        if inner in _BLOCK:
            return f"v.blk.{n}.{_BLOCK[inner]}.{leaf}"
    raise ExportError(f"encoders.image: tensor {key!r} of the vision tower has no place in llama.cpp's CLIP graph")


def _array(name: str, t: torch.Tensor, half: bool) -> np.ndarray:
    arr = t.detach().to(torch.float32).cpu().numpy()
    if half and arr.ndim >= 2 and name.endswith(".weight") and "position_embd" not in name:
        return arr.astype(np.float16)
    return arr


def write_mmproj_gguf(path: Path, vision_cfg: Any, vision: dict[str, torch.Tensor],
                      projector: dict[str, torch.Tensor], family: str, select_layer: int, mean: list[float],
                      std: list[float], qtype: str, name: str) -> Path:
    """Write the tower (transformers CLIP/SigLIP vision-model tensors) and the projector (``linear_1``/``linear_2``)
    as an mmproj GGUF; `qtype` f16/q8_0 stores the matrices as float16 (llama.cpp's own mmproj files do), f32 as is."""
    import gguf

    layers = int(vision_cfg.num_hidden_layers)
    keep = feature_index(select_layer, layers)
    half = qtype != "f32"
    w = gguf.GGUFWriter(str(path), "clip")
    w.add_name(name)
    w.add_description(f"mmhub export: {family} vision tower + LLaVA MLP projector")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if half else gguf.LlamaFileType.ALL_F32)
    w.add_bool("clip.has_text_encoder", False)
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.has_llava_projector", True)
    w.add_string("clip.projector_type", "mlp")
    w.add_uint32("clip.vision.image_size", int(vision_cfg.image_size))
    w.add_uint32("clip.vision.patch_size", int(vision_cfg.patch_size))
    w.add_uint32("clip.vision.embedding_length", int(vision_cfg.hidden_size))
    w.add_uint32("clip.vision.feed_forward_length", int(vision_cfg.intermediate_size))
    w.add_uint32("clip.vision.projection_dim", int(projector["linear_2.weight"].shape[0]))
    w.add_uint32("clip.vision.block_count", keep)
    w.add_uint32("clip.vision.attention.head_count", int(vision_cfg.num_attention_heads))
    w.add_float32("clip.vision.attention.layer_norm_epsilon", float(vision_cfg.layer_norm_eps))
    w.add_array("clip.vision.image_mean", [float(x) for x in mean])
    w.add_array("clip.vision.image_std", [float(x) for x in std])
    w.add_bool("clip.use_gelu", _VIT_ACT[vision_cfg.hidden_act])
    w.add_array("clip.vision.feature_layer", [keep])
    for key, t in vision.items():
        gname = _vision_name(key, keep)
        if gname is not None:
            w.add_tensor(gname, _array(gname, t, half))
    for src, dst in (("linear_1", "mm.0"), ("linear_2", "mm.2")):
        for leaf in ("weight", "bias"):
            if f"{src}.{leaf}" in projector:
                gname = f"{dst}.{leaf}"
                w.add_tensor(gname, _array(gname, projector[f"{src}.{leaf}"], half))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
