"""The LLaVA-NeXT family importer: transformers ``llava_next`` folders -> anyres(hf_vision) -> mlp/linear -> causal LM.

LLaVA-NeXT is LLaVA-1.5 at high resolution (AnyRes): the image is fitted into the best of ``image_grid_pinpoints``,
cut into tiles of the tower's size plus a resized base image, every tile goes through the CLIP/SigLIP tower at
``vision_feature_layer``, the projector maps every token, and the tiles' tokens are reassembled into one grid, the
padding rows/columns cut off, an ``image_newline`` embedding put after each row, the base tokens first. How the pieces
map onto mmhub:

* encoder: ``anyres`` (`mmhub.encoders.anyres`) around an ``hf_vision`` tower built from the folder's vision config
  (``select_layer`` = ``vision_feature_layer``, the CLS token dropped under the ``default`` strategy), with the image
  processor's pinpoints, tile size, resampling, mean/std and rescale factor; tower tensors from ``vision_tower.``;
* projector: ``mlp`` (depth 2, the folder's activation) or ``linear`` (LLaVA's identity activation with an identity
  ``linear_2``), ``newline: true`` holding ``image_newline``;
* LLM: ``hf_causal_lm`` over the text config, the folder's tokenizer and chat template (as the ``llava`` importer).

`next_spec` also serves LLaVA-OneVision (`mmhub.importers.llava_onevision`), whose only difference here is the
``anyres_max_N`` downscale of large grids. The number of image tokens depends on the image's size (the encoder's
``token_mask``): the prompt gets exactly LlavaNextProcessor's count per image, and the spec's token budget counts the
most any image can take.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

from mmhub.errors import CheckpointError
from mmhub.importers.base import Checkpoint, Imported, Importer, ImportOptions
from mmhub.importers.paligemma import image_processor_config, settings_of

FILTERS = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL resampling codes the AnyRes resize has
TOWERS = ("clip_vision_model", "siglip_vision_model")


def _side(value: Any) -> int | None:
    """The square side of a processor size entry ({height, width} equal, {shortest_edge}, or an int)."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        if "shortest_edge" in value:
            return value["shortest_edge"]
        if value.get("height") == value.get("width"):
            return value.get("height")
    return None


def anyres_settings(raw: dict[str, Any], where: str, tower_size: int) -> dict[str, Any]:
    """LlavaNext/LlavaOnevision image processor settings -> ``anyres`` settings; what AnyRes does not do is an error
    naming the key."""
    problems = []
    for key in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
        if raw.get(key, True) is False:
            problems.append(f"{key}: false (AnyRes always does it)")
    if raw.get("resample", 3) not in FILTERS:
        problems.append(f"resample: {raw.get('resample')} (AnyRes resizes with nearest 0, bilinear 2 or bicubic 3)")
    size, crop = _side(raw.get("size")), _side(raw.get("crop_size")) if raw.get("do_center_crop") else None
    tile = crop or size
    if tile != tower_size or (size is not None and size != tile):
        problems.append(f"size {raw.get('size')} / crop_size {raw.get('crop_size')} (AnyRes needs the base image and "
                        f"the tiles both at the tower's {tower_size} x {tower_size})")
    pins = raw.get("image_grid_pinpoints")
    if not isinstance(pins, list) or not pins:
        problems.append("image_grid_pinpoints missing (AnyRes needs the candidate resolutions)")
    if problems:
        raise CheckpointError(f"{where}: the image processor cannot be expressed as AnyRes: " + "; ".join(problems))
    return {"grid_pinpoints": [[int(h), int(w)] for h, w in pins], "tile_size": tile,
            "mean": tuple(float(x) for x in raw.get("image_mean", (0.48145466, 0.4578275, 0.40821073))),
            "std": tuple(float(x) for x in raw.get("image_std", (0.26862954, 0.26130258, 0.27577711))),
            "rescale_factor": float(raw.get("rescale_factor", 1 / 255)),
            "interpolation": FILTERS[raw.get("resample", 3)]}


def max_tiles_of(aspect: Any, where: str) -> int:
    """OneVision's ``vision_aspect_ratio`` (``anyres_max_N``) -> N."""
    found = re.fullmatch(r"anyres_max_(\d+)", str(aspect))
    if found is None:
        raise CheckpointError(f"{where}: vision_aspect_ratio {aspect!r} is not anyres_max_N, the only form "
                              f"LLaVA-OneVision's pack_image_features reads")
    return int(found.group(1))


def next_spec(ckpt: Checkpoint, options: ImportOptions, family: str, max_tiles: int | None = None) -> Imported:
    """A LLaVA-NeXT-shaped folder (``llava_next`` or ``llava_onevision``) as an mmhub spec and weight map."""
    from mmhub.export.hf_llava_import import _choose_template, _projector_spec
    from mmhub.importers.llava import _load_language

    folder = ckpt.folder
    config = ckpt.hf_config()
    vision, text = config.vision_config, config.text_config
    problems = []
    if vision.model_type not in TOWERS:
        problems.append(f"vision_config.model_type {vision.model_type!r} (mmhub's import takes {', '.join(TOWERS)})")
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        problems.append(f"vision_feature_layer {layer} (several layers concatenated; hf_vision selects one)")
    strategy = config.vision_feature_select_strategy
    if vision.model_type == "clip_vision_model" and strategy != "default":
        problems.append(f"vision_feature_select_strategy {strategy} on a CLIP tower (its CLS token makes the tile's "
                        f"tokens no square grid; transformers' {family} cannot reassemble them either)")
    if vision.model_type == "siglip_vision_model" and strategy == "default":
        problems.append("vision_feature_select_strategy default on a SigLIP tower (it drops a patch token)")
    if problems:
        raise CheckpointError(f"{folder} cannot be imported as an mmhub model: " + "; ".join(problems))
    image_cfg, image_where = image_processor_config(ckpt)
    anyres = anyres_settings(image_cfg, f"{folder}: {image_where}", vision.image_size)
    model_pins = [[int(h), int(w)] for h, w in (config.image_grid_pinpoints or [])]
    if model_pins != anyres["grid_pinpoints"]:
        raise CheckpointError(f"{folder}: config.json image_grid_pinpoints {model_pins} differ from the image "
                              f"processor's {anyres['grid_pinpoints']} ({image_where}); transformers would reassemble "
                              f"tiles on another grid than it cut them, so the folder is inconsistent")
    tokenizer = ckpt.tokenizer()
    processor_cfg = ckpt.json("processor_config.json") or {}
    placeholder = getattr(tokenizer, "image_token", None) or processor_cfg.get("image_token") or "<image>"
    image_id = getattr(config, "image_token_id", None)
    image_id = image_id if image_id is not None else config.image_token_index
    if tokenizer.convert_tokens_to_ids(placeholder) != image_id:
        raise CheckpointError(f"{folder}: the tokenizer gives {placeholder!r} id "
                              f"{tokenizer.convert_tokens_to_ids(placeholder)} but config.image_token_id is "
                              f"{image_id}; the folder is inconsistent")
    template = _choose_template(folder, tokenizer, placeholder, options.template)

    proj_prefix = ckpt.first_prefix("model.multi_modal_projector.", "multi_modal_projector.", what="projector")
    proj_settings, proj_state = _projector_spec(config, ckpt.take(proj_prefix), folder)
    newline_key = next((k for k in ("model.image_newline", "image_newline") if ckpt.has(k)), None)
    if newline_key is None:
        raise CheckpointError(f"{folder}: no image_newline tensor (model.image_newline); a {family} checkpoint has one")
    proj_state["image_newline"] = ckpt.tensor(newline_key)
    tower_prefix = ckpt.first_prefix("model.vision_tower.", "vision_tower.", what="vision tower")
    heads = ("vision_model.head.", "head.")  # SigLIP's attention-pooling head (under either tower layout)
    for head in heads:
        ckpt.ignore(tower_prefix + head, "SigLIP's attention-pooling head: the tokens are read before it")
    tower = {k: v for k, v in ckpt.take(tower_prefix).items() if not k.startswith(heads)}
    lm_prefix = ckpt.first_prefix("model.language_model.", "language_model.model.", what="language model")
    lm_state = ckpt.take(lm_prefix)
    head_key = "lm_head.weight" if lm_prefix == "model.language_model." else "language_model.lm_head.weight"
    tied = bool(config.tie_word_embeddings or text.tie_word_embeddings)
    if tied:
        ckpt.ignore(head_key, "the LM head is tied to the input embeddings")
        head = {}
    elif ckpt.has(head_key):
        head = {"weight": ckpt.tensor(head_key)}
    else:
        raise CheckpointError(f"{folder}: no {head_key} and the embeddings are not tied (tie_word_embeddings false)")

    text_settings = settings_of(text)
    text_settings["tie_word_embeddings"] = tied
    tower_settings = {"type": "hf_vision", "config": settings_of(vision), "select_layer": layer,
                      "drop_cls": True, "dtype": "float32"}  # CLIP: LLaVA's default strategy; SigLIP: no CLS
    spec = {
        "name": folder.name,
        "description": f"imported from the transformers {family} folder {folder}",
        "encoders": {"image": {"type": "anyres", "tower": tower_settings, **anyres, "newline": True,
                               **({"max_tiles": max_tiles} if max_tiles is not None else {})}},
        "projectors": {"image": {**proj_settings, "newline": True}},
        "backbone": {"type": "hf_causal_lm", "config": text_settings, "tokenizer": str(folder), "dtype": options.dtype},
        "template": template,
        "placeholders": {"image": placeholder},
    }
    weights = {"encoders.image.tower.model": tower, "projectors.image": proj_state}
    notes = [f"AnyRes over {len(anyres['grid_pinpoints'])} pinpoints with {anyres['tile_size']}-pixel tiles"
             + (f", grids over {max_tiles} tiles downscaled" if max_tiles is not None else "")]
    return Imported(spec=spec, weights=weights, notes=notes,
                    after_load=_load_language({"language": lm_state, "head": head}, str(folder)))


class LlavaNextImporter(Importer):
    """LLaVA-NeXT (LLaVA-1.6): AnyRes tiles through a CLIP/SigLIP tower, mlp projector with image_newline, causal LM."""

    name: ClassVar[str] = "llava_next"
    model_types: ClassVar[tuple[str, ...]] = ("llava_next",)
    description: ClassVar[str] = ("LLaVA-NeXT: AnyRes tiles -> CLIP/SigLIP tower -> mlp (+ image_newline) -> "
                                  "causal LM")

    def convert(self, ckpt: Checkpoint, options: ImportOptions) -> Imported:
        return next_spec(ckpt, options, "llava_next")

    def export(self, model: Any, out: Path) -> Path:
        from mmhub.importers.llava_next_export import export_next

        return export_next(model, out)
