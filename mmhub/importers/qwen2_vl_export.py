"""Export of a Qwen2-VL-shaped mmhub model back to a transformers ``qwen2_vl`` (or ``qwen2_5_vl``) folder.

A model whose image encoder is ``qwen2_vl_vision``, projector a ``patch_merger`` (LayerNorm; Qwen2.5-VL: RMSNorm) of
the LLM's width and backbone ``hf_causal_lm`` over ``qwen2_vl_text`` (``qwen2_5_vl_text``) with the ``qwen2-vl``
template is written as the family's ``...ForConditionalGeneration`` weights (``model.visual.*`` with the merger under
``model.visual.merger.``, ``model.language_model.*``, ``lm_head.weight``), its config, and a ``Qwen2VLProcessor``
(the image processor with the encoder's pixel budget and normalisation, the tokenizer, Qwen2-VL's chat template), so
transformers loads the folder and computes what mmhub computes. LoRA adapters are merged into a copy first. Anything
else is refused by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmhub.atomic import atomic_dir
from mmhub.errors import ExportError

# Qwen2-VL's own chat template (images and string or list content); renders like mmhub's qwen2-vl template
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
# text model_type -> (family, transformers config / model class names, the merger's norm, vision config output width)
FAMILIES = {"qwen2_vl_text": ("qwen2_vl", "Qwen2VLConfig", "Qwen2VLForConditionalGeneration", "layernorm",
                              "hidden_size"),
            "qwen2_5_vl_text": ("qwen2_5_vl", "Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", "rmsnorm",
                                "out_hidden_size")}


def _check(model: Any) -> None:
    problems = []
    text = model.backbone.model.config if model.backbone.name == "hf_causal_lm" else None
    if text is None or text.model_type not in FAMILIES:
        problems.append(f"backbone ({model.backbone.name}"
                        f"{', model_type ' + text.model_type if text is not None else ''}): Qwen2-VL's LLM is "
                        "hf_causal_lm over qwen2_vl_text (Qwen2.5-VL: qwen2_5_vl_text)")
    norm = FAMILIES[text.model_type][3] if text is not None and text.model_type in FAMILIES else "layernorm"
    encoders = model.encoders
    if set(encoders) not in ({"image"}, {"image", "video"}) or encoders["image"].name != "qwen2_vl_vision" \
            or ("video" in encoders and encoders["video"] is not encoders["image"]):
        problems.append(f"encoders {', '.join(f'{m} ({e.name})' for m, e in encoders.items())}: Qwen2-VL has one "
                        "qwen2_vl_vision encoder for images (and videos)")
    elif model.projectors["image"].name != "patch_merger" or model.projectors["image"].config.norm != norm:
        problems.append(f"projectors.image ({model.projectors['image'].name}): this family's merger is a {norm} "
                        "patch_merger")
    elif "video" in encoders:
        image, video = model.projectors["image"].state_dict(), model.projectors["video"].state_dict()
        if image.keys() != video.keys() or not all(torch.equal(image[k], video[k]) for k in image):
            problems.append("projectors.video: Qwen2-VL has one merger for images and videos, but the video "
                            "projector's weights differ from the image one's (trained apart)")
        if model.spec.placeholder("video") != "<|video_pad|>":
            problems.append(f"placeholder {model.spec.placeholder('video')!r}: Qwen2-VL's video one is <|video_pad|>")
    if len(model.injectors) or len(model.generators):
        problems.append("injectors/generators: Qwen2-VL has none")
    if model.plan.template.name != "qwen2-vl":
        problems.append(f"template {model.plan.template.name}: the exported processor renders Qwen2-VL's (qwen2-vl)")
    if model.spec.placeholder("image") != "<|image_pad|>":
        problems.append(f"placeholder {model.spec.placeholder('image')!r}: Qwen2-VL's is <|image_pad|>")
    if problems:
        raise ExportError("this model cannot be written as a transformers Qwen2-VL: " + "; ".join(problems))


def export_qwen2_vl(model: Any, out_dir: str | Path) -> Path:
    """Write `model` (a Qwen2-VL-shaped `MMModel`) as a transformers ``qwen2_vl`` folder with its processor."""
    import importlib

    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    _check(model)
    if model.spec.adapters:
        from mmhub.adapters import merged_copy

        model = merged_copy(model)
    out = Path(out_dir).expanduser()
    enc, merger, lm = model.encoders["image"], model.projectors["image"], model.backbone.model
    tok = model.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in TOKENS}
    missing = [t for t, i in ids.items() if not isinstance(i, int) or i == tok.unk_token_id]
    if missing:
        raise ExportError(f"the tokenizer has no {', '.join(missing)} token(s), which a Qwen2-VL processor needs")
    family, config_name, model_name, _, width = FAMILIES[lm.config.model_type]
    modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    configs = importlib.import_module(f"transformers.models.{family}.configuration_{family}")
    vision = enc.hf_config.to_dict()
    vision[width] = merger.config.out_dim
    text = lm.config.to_dict()
    tied = bool(getattr(lm.config, "tie_word_embeddings", False))
    config = getattr(configs, config_name)(vision_config=vision, text_config=text, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=tied)
    hf = getattr(modeling, model_name)(config).to(lm.dtype)
    state = {**{f"model.visual.{k}": v for k, v in enc.model.state_dict().items()},
             **{f"model.visual.merger.{k}": v for k, v in merger.state_dict().items()},
             **{f"model.language_model.{k}": v for k, v in lm.model.state_dict().items()},
             "lm_head.weight": lm.lm_head.weight}
    missing_keys, unexpected = hf.load_state_dict(state, strict=False)
    missing_keys = [k for k in missing_keys if not (tied and k == "lm_head.weight")]
    if missing_keys or unexpected:
        raise ExportError(f"the Qwen2-VL weights do not fit: missing {missing_keys}, unexpected {unexpected}")
    cfg = enc.config
    images = Qwen2VLImageProcessor(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels, image_mean=list(cfg.mean),
                                   image_std=list(cfg.std), patch_size=enc.patch, merge_size=enc.merge,
                                   temporal_patch_size=enc.temporal)
    videos = Qwen2VLVideoProcessor(size={"shortest_edge": cfg.video_min_pixels, "longest_edge": cfg.video_max_pixels},
                                   image_mean=list(cfg.mean), image_std=list(cfg.std), patch_size=enc.patch,
                                   merge_size=enc.merge, temporal_patch_size=enc.temporal)
    processor = Qwen2VLProcessor(image_processor=images, tokenizer=tok, video_processor=videos,
                                 chat_template=CHAT_TEMPLATE)
    with atomic_dir(out) as tmp:
        hf.save_pretrained(str(tmp))
        processor.save_pretrained(str(tmp))
    return out
