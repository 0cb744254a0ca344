"""Export of LLaVA-NeXT-shaped mmhub models back to transformers' ``llava_next`` / ``llava_onevision`` folders.

A model is LLaVA-NeXT-shaped when it has one ``image`` modality read by an ``anyres`` encoder (``newline: true``)
around an ``hf_vision`` CLIP or SigLIP tower (no ``final_norm``), an ``mlp`` projector of depth 2 (gelu, relu, silu
or tanh) or a ``linear`` one (written as LLaVA's identity activation with an identity ``linear_2``), both with
``newline: true``, and an ``hf_causal_lm`` backbone (no 4-bit weights), nothing else. OneVision is the same with the
encoder's ``max_tiles`` (``anyres_max_N``); without ``max_tiles`` the folder is ``llava_next``.

The folder holds ``config.json``, ``model.safetensors`` under transformers' key names (checked against a meta-device
model built from that config), the tokenizer with the placeholder as a special token and the chat template
rendering like the model's mmhub template, and the family's processor doing AnyRes' preprocessing (pinpoints, tile
size, resampling, mean/std, rescale factor). Every part is written in one dtype, the components' own (mixed dtypes
are refused). An image placeholder past the LLM's vocabulary grows the embedding (and an untied head) by zero rows,
as the LLaVA export does (`mmhub.export.hf_llava`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from mmhub.errors import ExportError

ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "silu": "silu", "tanh": "tanh"}
FILTER_CODES = {"nearest": 0, "bilinear": 2, "bicubic": 3}
TOWERS = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}


def _slot_type(model: Any, kind: str) -> str:
    slot = model.plan.backbone if kind == "backbone" else getattr(model.plan, kind).get("image")
    return slot.info.name if slot is not None else "-"


def next_problems(model: Any) -> list[str]:
    """Every slot that keeps `model` from being a transformers LLaVA-NeXT / OneVision, with why."""
    problems = []
    spec = model.spec
    video_ok = spec.encoders.get("video") == "image" and _same_projectors(model)
    if set(spec.encoders) - ({"video"} if video_ok else set()) != {"image"}:
        problems.append(f"encoders: {', '.join(spec.encoders) or 'none'}; LLaVA-NeXT reads one image modality (and "
                        f"OneVision a video through the image encoder, with one projector: a video slot that shares "
                        f"the image encoder and whose projector equals the image one)")
    elif _slot_type(model, "encoders") != "anyres":
        problems.append(f"encoders.image ({_slot_type(model, 'encoders')}): LLaVA-NeXT tiles with AnyRes (anyres)")
    else:
        enc = model.encoders["image"]
        tower_type = getattr(enc.tower, "name", "?")
        if tower_type != "hf_vision" or enc.tower.hf_config.model_type not in TOWERS:
            problems.append(f"encoders.image.tower ({tower_type}): LLaVA-NeXT's tower is a transformers CLIP or "
                            f"SigLIP vision model (hf_vision)")
        elif enc.tower.config.final_norm:
            problems.append("encoders.image.tower (hf_vision): final_norm: true, which LLaVA-NeXT never applies")
        if not enc.config.newline:
            problems.append("encoders.image (anyres): newline: false; LLaVA-NeXT always ends rows with image_newline")
    proj_type = _slot_type(model, "projectors")
    proj = model.projectors["image"] if "image" in model.projectors else None
    if proj_type not in ("mlp", "linear") or proj is None:
        problems.append(f"projectors.image ({proj_type}): LLaVA-NeXT's projector is linear_1 -> act -> linear_2")
    else:
        if not getattr(proj.config, "newline", False):
            problems.append(f"projectors.image ({proj_type}): newline: false; LLaVA-NeXT has an image_newline")
        if proj_type == "mlp" and (proj.config.depth != 2 or proj.config.activation not in ACTIVATIONS):
            problems.append(f"projectors.image (mlp): depth {proj.config.depth}, {proj.config.activation}; "
                            f"LLaVA-NeXT's is depth 2 with gelu, relu, silu or tanh")
    if _slot_type(model, "backbone") != "hf_causal_lm":
        problems.append(f"backbone ({_slot_type(model, 'backbone')}): LLaVA-NeXT's LLM is a causal LM (hf_causal_lm)")
    elif model.backbone.config.quantize:
        problems.append(f"backbone (hf_causal_lm): quantize: {model.backbone.config.quantize}; 4-bit weights are "
                        f"not exported")
    for part in ("injectors", "output_projectors", "generators"):
        for name, cs in getattr(spec, part).items():
            problems.append(f"{part}.{name} ({cs.type}): LLaVA-NeXT has no counterpart")
    return problems


def _same_projectors(model: Any) -> bool:
    """Whether the video projector holds exactly the image projector's settings and weights."""
    if "video" not in model.projectors or "image" not in model.projectors:
        return False
    image, video = model.projectors["image"], model.projectors["video"]
    a, b = image.state_dict(), video.state_dict()
    return (image.config == video.config and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a))


def _projector_state(proj: nn.Module, hidden: int) -> tuple[dict[str, torch.Tensor], str]:
    """linear_1/linear_2 tensors and the activation name."""
    if hasattr(proj, "net"):
        first, second = (m for m in proj.net if isinstance(m, nn.Linear))
        act = ACTIVATIONS[proj.config.activation]
        return {"linear_1.weight": first.weight, "linear_1.bias": first.bias, "linear_2.weight": second.weight,
                "linear_2.bias": second.bias}, act
    lin = proj.proj
    bias = lin.bias if lin.bias is not None else lin.weight.new_zeros(hidden)
    return {"linear_1.weight": lin.weight, "linear_1.bias": bias,
            "linear_2.weight": torch.eye(hidden, dtype=lin.weight.dtype), "linear_2.bias": lin.weight.new_zeros(hidden)
            }, "linear"


def _grow(weight: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([weight, weight.new_zeros(rows, weight.shape[1])]) if rows else weight


def config_and_tensors(model: Any) -> tuple[Any, dict[str, torch.Tensor], str]:
    """The transformers config, the safetensors state under its key names and the family (llava_next or
    llava_onevision) of a LLaVA-NeXT-shaped model."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
    )

    enc, proj = model.encoders["image"], model.projectors["image"]
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) != 1:
        raise ExportError(f"the components hold {len(dtypes)} dtypes ({', '.join(sorted(map(str, dtypes)))}); "
                          f"transformers' LLaVA-NeXT loads in one: cast the model first (model.to(dtype))")
    lm = model.backbone.language_model()
    text_cfg = copy.deepcopy(lm.config.get_text_config())
    emb, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    tied = emb.weight.data_ptr() == head.weight.data_ptr()
    image_id = model.processor.placeholder_ids["image"]
    video_id = model.processor.placeholder_ids.get("video")
    rows = max(0, max(image_id, video_id or 0) + 1 - text_cfg.vocab_size)
    text_cfg.vocab_size += rows
    text_cfg.tie_word_embeddings = tied
    proj_state, act = _projector_state(proj, text_cfg.hidden_size)
    family = "llava_onevision" if enc.config.max_tiles is not None else "llava_next"
    clip = enc.tower.hf_config.model_type == "clip_vision_model"
    common = dict(vision_config=enc.tower.hf_config.to_dict(), text_config=text_cfg.to_dict(),
                  image_token_index=image_id, image_grid_pinpoints=[list(p) for p in enc.config.grid_pinpoints],
                  vision_feature_layer=enc.tower.config.select_layer, projector_hidden_act=act,
                  vision_feature_select_strategy="default" if clip and enc.tower.config.drop_cls else "full",
                  tie_word_embeddings=tied)
    if family == "llava_onevision":
        video = {"video_token_index": video_id} if video_id is not None else {}
        config = LlavaOnevisionConfig(**common, vision_aspect_ratio=f"anyres_max_{enc.config.max_tiles}", **video)
        cls = LlavaOnevisionForConditionalGeneration
    else:
        config = LlavaNextConfig(**common)
        cls = LlavaNextForConditionalGeneration
    with torch.device("meta"):
        ref = cls(config)
    tensors = {f"model.vision_tower.{k}": v for k, v in enc.tower.model.state_dict().items()}
    tensors.update({f"model.multi_modal_projector.{k}": v for k, v in proj_state.items()})
    tensors["model.image_newline"] = proj.image_newline
    emb_key = {id(m): n for n, m in lm.base_model.named_modules()}[id(emb)] + ".weight"
    for k, v in lm.base_model.state_dict().items():
        tensors[f"model.language_model.{k}"] = _grow(v, rows) if k == emb_key else v
    if not tied:
        tensors["lm_head.weight"] = _grow(head.weight, rows)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items() if not (tied and k == "lm_head.weight")}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if want != got:
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        wrong = [f"{k} {got[k]} != {want[k]}" for k in sorted(set(want) & set(got)) if want[k] != got[k]]
        raise ExportError(f"the tensors do not match transformers' {cls.__name__}: {len(missing)} missing "
                          f"({missing[:3]}), {len(extra)} unexpected ({extra[:3]}), {len(wrong)} of another shape "
                          f"({wrong[:3]}); this transformers version lays {family} out differently")
    config.dtype = str(dtypes.pop()).removeprefix("torch.")
    config.architectures = [cls.__name__]
    return config, {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, family


def _processor(model: Any, family: str, config: Any) -> Any:
    import transformers

    from mmhub.export.chat_template import jinja_template

    enc = model.encoders["image"]
    placeholder = model.spec.placeholder("image")
    video_mark = model.spec.placeholder("video") if "video" in model.spec.encoders else None
    tokenizer = copy.deepcopy(model.tokenizer)
    for mark in (placeholder, video_mark):
        if mark is not None and mark not in tokenizer.all_special_tokens:  # same id; read back as special
            tokenizer.add_special_tokens({"extra_special_tokens": [mark]}, replace_extra_special_tokens=False)
    chat = jinja_template(model.plan.template, tokenizer, placeholder)
    if chat is not None:
        tokenizer.chat_template = chat
    s, c = enc.config.tile_size, enc.config
    prep = dict(image_grid_pinpoints=[list(p) for p in c.grid_pinpoints], resample=FILTER_CODES[c.interpolation],
                image_mean=list(c.mean), image_std=list(c.std), rescale_factor=c.rescale_factor)
    clip = config.vision_config.model_type == "clip_vision_model"
    if family == "llava_onevision":
        images = transformers.LlavaOnevisionImageProcessor(size={"height": s, "width": s}, **prep)
        frames = {"num_frames": c.video_frames} if c.video_frames else {}
        videos = transformers.LlavaOnevisionVideoProcessor(size={"height": s, "width": s}, **frames, **{
            k: v for k, v in prep.items() if k != "image_grid_pinpoints"})
        side = s // config.vision_config.patch_size
        return transformers.LlavaOnevisionProcessor(
            image_processor=images, tokenizer=tokenizer, video_processor=videos, num_image_tokens=side * side,
            vision_feature_select_strategy=config.vision_feature_select_strategy, chat_template=chat,
            vision_aspect_ratio=config.vision_aspect_ratio, image_token=placeholder,
            video_token=video_mark or "<video>")
    images = transformers.LlavaNextImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s},
                                                  **prep)
    return transformers.LlavaNextProcessor(
        image_processor=images, tokenizer=tokenizer, patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy, chat_template=chat,
        num_additional_image_tokens=1 if clip else 0, image_token=placeholder)


def export_next(model: Any, out_dir: str | Path) -> Path:
    """Write `model` as a transformers ``llava_next`` (or, with ``max_tiles``, ``llava_onevision``) folder."""
    from mmhub.atomic import atomic_dir

    problems = next_problems(model)
    if problems:
        raise ExportError(f"cannot export {model.spec.name!r} as a transformers LLaVA-NeXT model: "
                          + "; ".join(problems))
    if model.spec.adapters:
        from mmhub.adapters import merged_copy

        model = merged_copy(model)
    config, tensors, family = config_and_tensors(model)
    processor = _processor(model, family, config)
    out = Path(out_dir).expanduser()
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return out
