"""The Qwen2-VL family importer: ``qwen2_vl`` and ``qwen2_5_vl`` folders -> qwen2_vl_vision -> patch_merger -> LLM.

Qwen2-VL's parts become mmhub components: the vision tower (2D rotary ViT at dynamic resolution; Qwen2.5-VL's has
RMSNorm, SwiGLU and window attention) is the ``qwen2_vl_vision`` encoder, with the folder's resize budget
(``min_pixels``/``max_pixels``) and normalisation; its ``merger`` is the ``patch_merger`` projector (LayerNorm;
RMSNorm for Qwen2.5-VL); the language model (Qwen2 with M-RoPE) is ``hf_causal_lm`` over transformers'
``qwen2_vl_text`` (``qwen2_5_vl_text``) model, whose positions mmhub computes from where each image's tokens sit and
their grid (`mmhub.backbones.mrope`). The chat template is mmhub's ``qwen2-vl`` (chatml, each ``<|image_pad|>``
wrapped in ``<|vision_start|>``/``<|vision_end|>``), the placeholder ``<|image_pad|>``: a prompt reads
``"<|image_pad|>What is this?"`` and mmhub expands the pad into the image's tokens as the family's processor does.

Both key layouts load: transformers 5's (``model.visual.``, ``model.language_model.``, ``lm_head.``) and the one the
published checkpoints use (``visual.``, ``model.``, ``lm_head.``). Qwen2-VL's videos come through the same tower (a
shared encoder, ``video: image``) at a fixed frame count, placed as ``<|video_pad|>``; Qwen2.5-VL imports images only
(its video positions follow the frame rate, which mmhub does not carry).
Export (`mmhub.importers.qwen2_vl_export`) writes the family's folder back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from mmhub.errors import CheckpointError
from mmhub.importers.base import Checkpoint, Imported, Importer, ImportOptions

# config keys that do not shape a model (bookkeeping)
META_KEYS = ("transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype", "output_attentions",
             "output_hidden_states", "return_dict", "id2label", "label2id", "problem_type", "chunk_size_feed_forward")
PLACEHOLDER = "<|image_pad|>"
VIDEO_PLACEHOLDER = "<|video_pad|>"
VIDEO_FRAMES = 8  # frames per video item when the folder does not say (transformers' processor takes all it is given)
WRAPPED = "<|vision_start|><|image_pad|><|vision_end|>"


def _settings(cfg: Any) -> dict[str, Any]:
    return {k: v for k, v in cfg.to_dict().items() if k not in META_KEYS}


def image_settings(image_cfg: dict[str, Any], vision: Any, where: str) -> dict[str, Any]:
    """The qwen2_vl_vision encoder's resize budget and normalisation from the folder's image processor config; its
    patch, temporal and merge sizes must be the tower's."""
    size = image_cfg.get("size") if isinstance(image_cfg.get("size"), dict) else {}
    out: dict[str, Any] = {
        "min_pixels": int(image_cfg.get("min_pixels") or size.get("shortest_edge") or 56 * 56),
        "max_pixels": int(image_cfg.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 1280)}
    if "image_mean" in image_cfg and "image_std" in image_cfg:
        out["mean"], out["std"] = tuple(image_cfg["image_mean"]), tuple(image_cfg["image_std"])
    for key, tower_key in (("patch_size", "patch_size"), ("temporal_patch_size", "temporal_patch_size"),
                           ("merge_size", "spatial_merge_size")):
        if key in image_cfg and image_cfg[key] != getattr(vision, tower_key):
            raise CheckpointError(f"{where}: the image processor's {key} is {image_cfg[key]} but the vision tower's "
                                  f"{tower_key} is {getattr(vision, tower_key)}; the folder is inconsistent")
    if image_cfg.get("do_rescale") is False or image_cfg.get("do_normalize") is False:
        raise CheckpointError(f"{where}: do_rescale/do_normalize off, which mmhub's qwen2_vl_vision always does")
    return out


def video_settings(ckpt: Checkpoint, cfg: Any, tokenizer: Any, notes: list[str]) -> dict[str, Any] | None:
    """The qwen2_vl_vision encoder's video settings from the folder's video processor config, or None (with a note)
    when the folder's videos cannot be read as transformers reads them."""
    video_cfg = ckpt.json("video_preprocessor_config.json") or (ckpt.json("processor_config.json") or {}).get(
        "video_processor")
    pad = getattr(tokenizer, "video_token", None) or VIDEO_PLACEHOLDER
    why = None
    if not isinstance(video_cfg, dict):
        why = "the folder has no video processor config"
    elif cfg.model_type != "qwen2_vl":
        why = "Qwen2.5-VL spaces video positions by frame rate, which mmhub does not carry"
    elif video_cfg.get("cap_pixels_per_frame"):
        why = "its video processor caps pixels per frame by the whole video's budget, which mmhub does not"
    elif tokenizer.convert_tokens_to_ids(pad) != getattr(cfg, "video_token_id", None):
        why = f"the tokenizer's {pad} id is not config.video_token_id"
    if why is not None:
        notes.append(f"images only: {why}")
        return None
    size = video_cfg.get("size") if isinstance(video_cfg.get("size"), dict) else {}
    frames = int(video_cfg.get("num_frames") or VIDEO_FRAMES)
    notes.append(f"videos: {frames} frames sampled uniformly per item, placed as {pad}; the video merger starts as "
                 "a copy of the image one (Qwen2-VL shares it)")
    return {"video_frames": frames,
            "video_min_pixels": int(video_cfg.get("min_pixels") or size.get("shortest_edge") or 128 * 28 * 28),
            "video_max_pixels": int(video_cfg.get("max_pixels") or size.get("longest_edge") or 768 * 28 * 28)}


def _template(ckpt: Checkpoint, tokenizer: Any, options: ImportOptions) -> str:
    if options.template is not None:
        return options.template
    chat = getattr(tokenizer, "chat_template", None) or ""
    if (ckpt.folder / "chat_template.jinja").is_file():
        chat = (ckpt.folder / "chat_template.jinja").read_text()
    elif isinstance(ckpt.json("chat_template.json"), dict):
        chat = ckpt.json("chat_template.json").get("chat_template") or chat
    if WRAPPED in chat and "<|im_start|>" in chat:
        return "qwen2-vl"
    raise CheckpointError(f"{ckpt.folder}: its chat template is not Qwen2-VL's (no <|im_start|> turns with "
                          f"{WRAPPED}); pass template= (qwen2-vl, chatml, plain)")


class Qwen2VLImporter(Importer):
    """Qwen2-VL and Qwen2.5-VL (dynamic-resolution ViT, patch merger, Qwen2 with M-RoPE); images, and Qwen2-VL's
    videos."""

    name: ClassVar[str] = "qwen2_vl"
    model_types: ClassVar[tuple[str, ...]] = ("qwen2_vl", "qwen2_5_vl")
    description: ClassVar[str] = ("Qwen2-VL / Qwen2.5-VL: dynamic-resolution 2D-RoPE ViT -> patch_merger (2x2) -> "
                                  "Qwen2 LM with M-RoPE")

    def convert(self, ckpt: Checkpoint, options: ImportOptions) -> Imported:
        cfg = ckpt.hf_config()
        vision, text = cfg.vision_config, cfg.text_config
        where = str(ckpt.folder)
        image_cfg = ckpt.json("preprocessor_config.json") or (ckpt.json("processor_config.json") or {}).get(
            "image_processor")
        if not isinstance(image_cfg, dict):
            raise CheckpointError(f"{where}: no image processor config (preprocessor_config.json, or image_processor "
                                  "in processor_config.json): the resize budget and normalisation are unknown")
        qwen25 = cfg.model_type == "qwen2_5_vl"
        merged = "out_hidden_size" if qwen25 else "hidden_size"  # the merger's output width
        if getattr(vision, merged) != text.hidden_size:
            raise CheckpointError(f"{where}: vision_config.{merged} {getattr(vision, merged)} (the merger's output) "
                                  f"!= text_config.hidden_size {text.hidden_size}")
        tokenizer = ckpt.tokenizer()
        placeholder = getattr(tokenizer, "image_token", None) or PLACEHOLDER
        if tokenizer.convert_tokens_to_ids(placeholder) != cfg.image_token_id:
            raise CheckpointError(f"{where}: the tokenizer gives {placeholder!r} id "
                                  f"{tokenizer.convert_tokens_to_ids(placeholder)} but config.image_token_id is "
                                  f"{cfg.image_token_id}; the folder is inconsistent")
        visual = ckpt.take(ckpt.first_prefix("model.visual.", "visual.", what="vision tower tensors"))
        merger = {k[len("merger."):]: v for k, v in visual.items() if k.startswith("merger.")}
        tower = {k: v for k, v in visual.items() if not k.startswith("merger.")}
        lm_prefix = "model.language_model." if ckpt.has("model.language_model.") else "model."
        lm = ckpt.take(lm_prefix)
        tied = bool(getattr(cfg, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False))
        weights = {"encoders.image.model": tower, "projectors.image": merger, "backbone.model.model": lm}
        notes = []
        if tied:
            ckpt.ignore("lm_head.", "the head is tied to the input embeddings")
        elif ckpt.has("lm_head.weight"):
            weights["backbone.model.lm_head"] = {"weight": ckpt.tensor("lm_head.weight")}
        else:
            raise CheckpointError(f"{where}: no lm_head.weight and the embeddings are not tied "
                                  "(tie_word_embeddings false)")
        text_settings = _settings(text)
        text_settings["tie_word_embeddings"] = tied
        vision_settings = _settings(vision)
        notes.append(f"images resized to multiples of {vision.patch_size * vision.spatial_merge_size} px; "
                     f"prompts place each image as {PLACEHOLDER}")
        merger_settings = {"type": "patch_merger", "merge": vision.spatial_merge_size,
                           "norm": "rmsnorm" if qwen25 else "layernorm"}
        spec = {
            "name": ckpt.folder.name,
            "description": f"imported from the transformers {cfg.model_type} folder {ckpt.folder}",
            "encoders": {"image": {"type": "qwen2_vl_vision", "config": vision_settings, "dtype": "float32",
                                   **image_settings(image_cfg, vision, where)}},
            "projectors": {"image": merger_settings},
            "backbone": {"type": "hf_causal_lm", "config": text_settings, "tokenizer": str(ckpt.folder),
                         "dtype": options.dtype},
            "template": _template(ckpt, tokenizer, options),
            "placeholders": {"image": placeholder},
        }
        video = video_settings(ckpt, cfg, tokenizer, notes)
        if video is not None:  # one tower for both (a shared encoder); the video merger a copy of the image one
            spec["encoders"]["image"].update(video)
            spec["encoders"]["video"] = "image"
            spec["projectors"]["video"] = dict(merger_settings)
            spec["placeholders"]["video"] = getattr(tokenizer, "video_token", None) or VIDEO_PLACEHOLDER
            weights["projectors.video"] = {k: v.clone() for k, v in merger.items()}
        return Imported(spec=spec, weights=weights, notes=notes)

    def export(self, model: Any, out: Path) -> Path:
        from mmhub.importers.qwen2_vl_export import export_qwen2_vl

        return export_qwen2_vl(model, out)
