"""Export of BLIP-2-shaped mmhub models back to transformers' BLIP-2 / InstructBLIP / InstructBLIP-Video folders.

The reverse of `mmhub.importers.blip2` / `mmhub.importers.instructblip`: an ``hf_vision`` BLIP tower (every token of
its last block through ``post_layernorm``; inside a 4-frame ``video`` encoder with ``temporal: concat`` for
InstructBLIP-Video), a ``qformer`` with ``layout: blip2`` (instruction-aware for InstructBLIP) and an
``hf_causal_lm`` / ``hf_seq2seq_lm`` backbone, under the family's template. The folder holds the config, the
weights (transformers' key names), the family's processor (a square-resize image/video processor doing mmhub's
preprocessing, the backbone's tokenizer with the media token, and InstructBLIP's Q-Former tokenizer) and a
generation config. Anything the family cannot express is an `ExportError` naming the component and the fix.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from mmhub.atomic import atomic_dir
from mmhub.errors import ExportError
from mmhub.export.image_processing import read_transform
from mmhub.projectors.qformer_blip2 import hf_qformer_state

FAMILIES = {"blip_2": ("image", False), "instructblip": ("image", True), "instructblipvideo": ("video", True)}
TEMPLATES = {("image", True): "blip-2", ("video", True): "blip-2-video", ("image", False): "blip-2-t5",
             ("video", False): "blip-2-t5"}  # (modality, decoder-only) -> the template the processor's layout is
TOWERS = ("blip_2_vision_model", "instructblip_vision_model", "instructblipvideo_vision_model")
FRAMES = 4


def _tower(model: Any, modality: str) -> tuple[Any, list[str]]:
    """The modality's hf_vision tower (the video encoder's frame encoder for video) and what stops the export."""
    problems: list[str] = []
    encoder = model.encoders[modality]
    if modality == "video":
        if encoder.name != "video" or encoder.config.temporal != "concat" or encoder.config.num_frames != FRAMES:
            problems.append(f"encoders.video must be a video encoder with temporal: concat and num_frames: {FRAMES} "
                            f"(InstructBLIP-Video reads 4 frames, each on its own)")
            return encoder, problems
        encoder = encoder.frames
    cfg = encoder.config
    if encoder.name != "hf_vision" or getattr(encoder, "hf_config", None) is None \
            or encoder.hf_config.model_type not in TOWERS:
        problems.append(f"encoders.{modality}: {encoder.name} is not an hf_vision BLIP tower ({', '.join(TOWERS)})")
    elif (cfg.select_layer, cfg.final_norm, cfg.drop_cls) not in ((-1, True, False),
                                                                  (encoder.hf_config.num_hidden_layers, True, False)):
        problems.append(f"encoders.{modality}: select_layer {cfg.select_layer}, final_norm {cfg.final_norm}, drop_cls "
                        f"{cfg.drop_cls} (BLIP reads every token of the last block after post_layernorm: -1, true, "
                        f"false)")
    return encoder, problems


def check_blip(model: Any, family: str) -> None:
    """Raise `ExportError` listing everything that keeps `model` from being written as `family`."""
    modality, instruct = FAMILIES[family]
    problems = []
    if list(model.encoders) != [modality]:
        problems.append(f"encoders {list(model.encoders)}: {family} takes exactly one {modality} encoder")
    else:
        problems += _tower(model, modality)[1]
        proj = model.projectors[modality]
        cfg = proj.config
        if proj.name != "qformer" or cfg.layout != "blip2":
            problems.append(f"projectors.{modality}: {proj.name} (layout {getattr(cfg, 'layout', '-')}) is not a "
                            f"qformer with layout: blip2")
        elif cfg.instruction_aware != instruct:
            problems.append(f"projectors.{modality}: instruction_aware {cfg.instruction_aware} ({family} has "
                            f"{'an instruction-aware' if instruct else 'no instruction-aware'} Q-Former)")
        elif cfg.frames != (FRAMES if modality == "video" else 1):
            problems.append(f"projectors.{modality}: frames {cfg.frames}")
        want = TEMPLATES[(modality, not model.is_encoder_decoder)]
        if model.plan.template.name != want:
            problems.append(f"template {model.plan.template.name!r}: {family}'s processor lays prompts out as mmhub's "
                            f"{want!r} (set template: {want})")
        mark = model.spec.placeholder(modality)
        if mark != f"<{modality}>":
            problems.append(f"placeholders.{modality} {mark!r}: {family}'s processor writes <{modality}>")
    if model.backbone.name not in ("hf_causal_lm", "hf_seq2seq_lm"):
        problems.append(f"backbone: {model.backbone.name} (BLIP-2 holds a transformers causal or seq2seq LM)")
    if len(model.injectors) or model.generators:
        problems.append("injectors or an output side (BLIP-2 has neither)")
    if problems:
        raise ExportError(f"this model cannot be written as transformers' {family}: " + "; ".join(problems))


def _config(model: Any, family: str, tower: Any) -> Any:
    from transformers import Blip2Config, InstructBlipConfig, InstructBlipVideoConfig

    modality, instruct = FAMILIES[family]
    proj = model.projectors[modality]
    cfg = proj.config
    qformer = {"hidden_size": cfg.width, "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
               "intermediate_size": proj.qformer.blocks[0].ffn.up.out_features,
               "cross_attention_frequency": cfg.cross_attention_every, "encoder_hidden_size": cfg.in_dim,
               "layer_norm_eps": cfg.norm_eps or 1e-12, "hidden_act": "gelu"}
    if instruct:
        qformer |= {"vocab_size": cfg.text_vocab_size, "max_position_embeddings": cfg.text_positions,
                    "pad_token_id": cfg.text_pad_id}
    vision = {k: v for k, v in tower.hf_config.to_dict().items() if k not in ("model_type", "transformers_version")}
    text = model.backbone.model.config.to_dict()
    media_id = model.processor.placeholder_ids[modality]
    cls = {"blip_2": Blip2Config, "instructblip": InstructBlipConfig, "instructblipvideo": InstructBlipVideoConfig}
    index = {f"{modality}_token_index": media_id}
    return cls[family](vision_config=vision, qformer_config=qformer, text_config=text,
                       num_query_tokens=cfg.num_queries, **index)


def blip_tensors(model: Any, family: str, tower: Any) -> dict[str, torch.Tensor]:
    """The model's weights under transformers' BLIP-2 key names."""
    modality = FAMILIES[family][0]
    proj = model.projectors[modality]
    qformer, query_tokens = hf_qformer_state(proj.qformer.state_dict())
    out = {f"vision_model.{k}": v for k, v in tower.model.state_dict().items()}
    out |= {f"qformer.{k}": v for k, v in qformer.items()} | {"query_tokens": query_tokens}
    out |= {f"language_projection.{k}": v for k, v in proj.proj.state_dict().items()}
    out |= {f"language_model.{k}": v for k, v in model.backbone.model.state_dict().items()}
    return {k: v.detach() for k, v in out.items()}


def _processor(model: Any, family: str, tower: Any, num_queries: int) -> Any:
    from transformers import (
        Blip2Processor,
        BlipImageProcessor,
        InstructBlipProcessor,
        InstructBlipVideoProcessor,
        InstructBlipVideoVideoProcessor,
    )

    modality, instruct = FAMILIES[family]
    prep = read_transform(tower.transform, f"encoders.{modality}")
    if prep.resize != "squash":
        raise ExportError(f"encoders.{modality}: resize {prep.resize} (BLIP's processors resize to a square; set "
                          f"resize: squash)")
    common = {"size": {"height": prep.image_size, "width": prep.image_size}, "resample": prep.filter,
              "image_mean": list(prep.mean), "image_std": list(prep.std)}
    tokenizer = copy.deepcopy(model.tokenizer)
    if modality == "video":
        qtok = model.projectors[modality].text_tokenizer
        return InstructBlipVideoProcessor(InstructBlipVideoVideoProcessor(**common), tokenizer, qtok,
                                          num_query_tokens=num_queries)
    images = BlipImageProcessor(**common)
    if instruct:
        return InstructBlipProcessor(images, tokenizer, model.projectors[modality].text_tokenizer,
                                     num_query_tokens=num_queries)
    return Blip2Processor(images, tokenizer, num_query_tokens=num_queries)


def export_blip(model: Any, out_dir: str | Path, family: str) -> Path:
    """Write `model` as a transformers `family` folder (blip_2, instructblip, instructblipvideo); returns its path."""
    from transformers import (
        Blip2ForConditionalGeneration,
        GenerationConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipVideoForConditionalGeneration,
    )

    check_blip(model, family)
    modality = FAMILIES[family][0]
    tower, _ = _tower(model, modality)
    config = _config(model, family, tower)
    classes = {"blip_2": Blip2ForConditionalGeneration, "instructblip": InstructBlipForConditionalGeneration,
               "instructblipvideo": InstructBlipVideoForConditionalGeneration}
    hf = classes[family](config)
    missing, unexpected = hf.load_state_dict(blip_tensors(model, family, tower), strict=False)
    tied = {k for k in missing if k.startswith("language_model.") and hf.get_parameter(k).data_ptr() in {
        p.data_ptr() for n, p in hf.named_parameters() if n not in missing}}
    if set(missing) - tied or unexpected:
        raise ExportError(f"{family} export: transformers' model does not take the tensors (missing "
                          f"{sorted(set(missing) - tied)[:6]}, unexpected {sorted(unexpected)[:6]})")
    stops = model.stop_token_ids()
    generation = GenerationConfig(eos_token_id=stops if len(stops) != 1 else stops[0],
                                  pad_token_id=model.processor.pad_id,
                                  decoder_start_token_id=model.backbone.decoder_start_token_id
                                  if model.is_encoder_decoder else None,
                                  bos_token_id=model.tokenizer.bos_token_id)
    processor = _processor(model, family, tower, config.num_query_tokens)
    out = Path(out_dir).expanduser()
    with atomic_dir(out) as tmp:
        hf.save_pretrained(tmp)
        generation.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return out
