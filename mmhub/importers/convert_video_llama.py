"""Video-LLaMA (DAMO-NLP-SG/Video-LLaMA, ``VideoLLAMA`` in ``video_llama.py``) state dicts -> mmhub components plus a
weight map: the video branch, exactly; the audio branch is refused or, when asked, dropped (see below).

Video-LLaMA's model keys (its published ``.pth`` files hold the trained subset, BLIP-2's LAVIS file the tower and
image Q-Former, the LLM is a separate Vicuna; merge the tensors into one dict, from safetensors, before converting):

* ``visual_encoder.*`` + ``ln_vision.*`` (EVA ViT-g, LAVIS names) -> the ``video`` encoder's frame tower, an
  ``hf_vision`` BLIP-2 vision model (``ln_vision`` its ``post_layernorm``), as `mmhub.importers.minigpt4.eva_tower`
  renames it; frames through ``temporal: concat`` with every token kept;
* ``query_tokens`` + ``Qformer.bert.*`` (the image Q-Former), ``video_frame_position_embedding``,
  ``video_query_tokens`` + ``video_Qformer.bert.*`` and ``llama_proj`` -> the ``video_qformer`` projector
  (`mmhub.projectors.video_qformer`);
* ``llama_model.*`` -> an ``hf_causal_lm`` LLaMA from `text_config`, or any `backbone` spec the caller gives.

Not convertible into mmhub components today (the converter names these keys and stops, unless ``drop_audio``):
the audio branch, ``audio_encoder.*`` (ImageBind-huge, whose audio trunk the ``imagebind`` encoder holds under the
same names; this converter does not map the branch yet), ``audio_position_embedding``, ``audio_query_tokens``,
``audio_Qformer.*`` and ``audio_llama_proj``. BLIP-2 pre-training leftovers the model never runs (the Q-Formers'
text embeddings and text FFNs, ``Qformer.cls``) are dropped and named in the notes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from mmhub.errors import CheckpointError
from mmhub.importers.base import Imported
from mmhub.importers.minigpt4 import CLIP_MEAN, CLIP_STD, _Reader, eva_tower
from mmhub.projectors.qformer_blip2 import qformer_state

AUDIO = ("audio_encoder.", "audio_position_embedding.", "audio_query_tokens", "audio_Qformer.", "audio_llama_proj.")
# BLIP-2 pre-training parts (and BERT heads) that Video-LLaMA sets to None or never runs
UNUSED = r"(video_)?Qformer\.(cls\.|bert\.embeddings\.(word_embeddings|position_embeddings|position_ids)|" \
         r"bert\.encoder\.layer\.\d+\.(intermediate|output)\.)"


def _lavis_to_hf(read: _Reader, prefix: str) -> dict[str, torch.Tensor]:
    """``{prefix}bert.*`` (LAVIS BERT names) -> transformers' Q-Former names, unused parts left out."""
    out = {}
    for key in list(read.state):
        if not key.startswith(prefix + "bert.") or re.match(UNUSED, key):
            continue
        value = read(key)
        rest = key[len(prefix + "bert."):]
        if rest.startswith("embeddings.LayerNorm."):
            rest = "layernorm." + rest[len("embeddings.LayerNorm."):]
        out[rest.replace("attention.self.", "attention.attention.")] = value
    return out


def _qformer_shape(q: Mapping[str, torch.Tensor], what: str) -> tuple[int, int]:
    """(blocks, cross-attention interval) of a transformers-named Q-Former state."""
    layers = sorted({int(m.group(1)) for k in q if (m := re.match(r"encoder\.layer\.(\d+)\.", k))})
    if not layers:
        raise CheckpointError(f"Video-LLaMA state dict: no {what} blocks")
    cross = [i for i in layers if f"encoder.layer.{i}.crossattention.attention.query.weight" in q]
    every = cross[1] - cross[0] if len(cross) > 1 else len(layers)
    if not cross or cross != list(range(0, len(layers), every)):
        raise CheckpointError(f"Video-LLaMA state dict: the {what} cross-attends in blocks {cross}, not every k-th "
                              f"block from 0")
    return len(layers), every


def convert_video_llama(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None, *,
                        backbone: dict[str, Any] | None = None, text_config: dict[str, Any] | None = None,
                        drop_audio: bool = False, template: str = "video-llama") -> Imported:
    """A Video-LLaMA state dict (its own key names) -> the mmhub spec and weight map. `config` holds the settings a
    state dict cannot tell: ``frames`` (8), ``vision_heads`` (16), ``qformer_heads`` (12). Every key must be placed,
    dropped as unused or (the audio branch, with `drop_audio`) dropped on request; any other is an error naming it."""
    config = dict(config or {})
    frames = int(config.get("frames", 8))
    audio = sorted(k for k in state_dict if k.startswith(AUDIO))
    if audio and not drop_audio:
        raise CheckpointError(f"Video-LLaMA state dict: {len(audio)} audio-branch tensor(s) ({', '.join(audio[:4])}"
                              f"{' ...' if len(audio) > 4 else ''}) have no mmhub component that holds them "
                              f"(this converter maps the video branch only; ImageBind-huge's audio trunk loads into "
                              f"the imagebind encoder through mmhub.importers.convert_imagebind); convert the video "
                              f"branch alone with drop_audio=True")
    read = _Reader(state_dict)
    unused = sorted(k for k in state_dict if re.match(UNUSED, k))
    vision_config, tower = eva_tower(read, int(config.get("vision_heads", 16)))
    frame_q = _lavis_to_hf(read, "Qformer.")
    video_q = _lavis_to_hf(read, "video_Qformer.")
    layers, every = _qformer_shape(frame_q, "image Q-Former")
    video_layers, video_every = _qformer_shape(video_q, "video Q-Former")
    query_tokens, video_tokens = read("query_tokens"), read("video_query_tokens")
    positions = read("video_frame_position_embedding.weight")
    proj_w, proj_b = read("llama_proj.weight"), read("llama_proj.bias")
    width = query_tokens.shape[-1]
    hidden = frame_q["encoder.layer.0.intermediate_query.dense.weight"].shape[0]
    projector = {f"frame_qformer.{k}": v for k, v in qformer_state(frame_q, query_tokens, text_ffn=False).items()}
    projector |= {f"video_qformer.{k}": v for k, v in qformer_state(video_q, video_tokens, text_ffn=False).items()}
    projector |= {"frame_position.weight": positions, "proj.weight": proj_w, "proj.bias": proj_b}
    weights = {"encoders.video.frames.model": tower, "projectors.video": projector}
    if backbone is None:
        llm = {k[len("llama_model."):]: read(k) for k in state_dict if k.startswith("llama_model.")}
        if not llm or text_config is None:
            raise CheckpointError("Video-LLaMA's LLM: the state dict has no llama_model.* tensors (the published "
                                  "files do not carry Vicuna) or no text_config was given; pass backbone= (e.g. "
                                  "{type: hf_causal_lm, source: <Vicuna folder>}) or both")
        backbone = {"type": "hf_causal_lm", "config": {"model_type": "llama", **text_config}}
        weights["backbone.model"] = llm
    stray = sorted(set(state_dict) - read.used - set(unused) - set(audio))
    if stray:
        raise CheckpointError(f"Video-LLaMA state dict: {len(stray)} key(s) with no place in mmhub "
                              f"({', '.join(stray[:8])}); it is not a Video-LLaMA checkpoint, or parts are unknown")
    frame_encoder = {"type": "hf_vision", "config": vision_config, "select_layer": -1, "final_norm": True,
                     "drop_cls": False, "image_size": vision_config["image_size"], "resize": "squash",
                     "interpolation": "bicubic", "mean": CLIP_MEAN, "std": CLIP_STD}
    spec = {"name": "video-llama",
            "description": "converted from a Video-LLaMA state dict: EVA ViT-g frames -> image Q-Former + frame "
                           "positions -> video Q-Former -> LLaMA",
            "encoders": {"video": {"type": "video", "frames": frame_encoder, "num_frames": frames,
                                   "temporal": "concat"}},
            "projectors": {"video": {"type": "video_qformer", "frames": frames, "num_queries": query_tokens.shape[-2],
                                     "layers": layers, "cross_attention_every": every,
                                     "video_queries": video_tokens.shape[-2], "video_layers": video_layers,
                                     "video_cross_attention_every": video_every, "max_frame_pos": positions.shape[0],
                                     "width": width, "heads": int(config.get("qformer_heads", 12)),
                                     "mlp_ratio": hidden / width, "norm_eps": 1e-12, "out_dim": proj_w.shape[0]}},
            "backbone": backbone, "template": template}
    notes = [f"dropped {len(unused)} BLIP-2 pre-training tensor(s) Video-LLaMA does not run"] if unused else []
    if audio:
        notes.append(f"dropped the audio branch ({len(audio)} tensors: ImageBind audio trunk, audio Q-Former, "
                     f"audio_llama_proj): no mmhub component holds ImageBind-huge's audio trunk")
    if frames > 1:
        notes.append(f"Video-LLaMA encodes an image as a 1-frame clip; this spec reads {frames}-frame clips (a still "
                     f"image would be repeated to {frames} frames, which Video-LLaMA does not do): convert again with "
                     f"config frames: 1 for its image path over the same weights, and give each image as a one-frame "
                     f"clip ([image])")
    return Imported(spec=spec, weights=weights, notes=notes)
