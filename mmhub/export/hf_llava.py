"""Lossless export of LLaVA-shaped mmhub models to transformers' LLaVA (and, from here too, the import back).

`export_hf_llava(model, out_dir)` writes a folder that
``LlavaForConditionalGeneration.from_pretrained`` and ``AutoProcessor.from_pretrained``
load: ``config.json`` (vision and text configs, ``vision_feature_layer`` = the encoder's
``select_layer``, ``vision_feature_select_strategy`` ``default`` when the CLS token is
dropped, ``image_token_index``, ``image_seq_length``, ``projector_hidden_act``),
``model.safetensors`` under transformers 5's key names (checked against a meta-device
LLaVA built from that config), ``generation_config.json`` (mmhub's stop tokens and pad
id, the image token suppressed), the tokenizer with mmhub's placeholder as a special
token, the chat template rendering like the model's mmhub template
(`mmhub.export.chat_template`) and an image processor doing mmhub's preprocessing
(`mmhub.export.image_processing`). The folder is written to a temporary sibling and
renamed into place; tensors go to safetensors only. Which models can be exported is
`mmhub.export.llava_parts`; how the vision tower is written, `mmhub.export.vision_towers`
(hf_vision as it is, open_clip ViTs converted to CLIP).

Choices made to stay exact:

* LoRA adapters are merged into a copy of the model first (`mmhub.adapters.merged_copy`);
  the model passed in keeps its adapters.
* A ``linear`` projector becomes LLaVA's two-layer projector with the identity activation
  (``projector_hidden_act: linear``) and ``linear_2`` the identity matrix with zero bias:
  multiplying by an identity matrix is exact in floating point.
* transformers' LLaVA loads every part in one dtype (per-module dtypes are deprecated in
  transformers 5). Components in different dtypes (a float32 tower before a bfloat16 LM)
  are refused unless ``dtype=`` names the cast, which then changes outputs by its rounding.
* mmhub's image placeholder may have an id past the language model's vocabulary (mmhub
  replaces it before the embedding lookup). LLaVA looks every id up, so the embedding
  matrix (and an untied ``lm_head``) grow by the rows needed, filled with zeros. Its input
  row is never used (LLaVA puts image features there); its output row gives a logit of
  exactly 0, and ``generation_config.suppress_tokens`` holds the image token, so
  ``generate`` never produces it (as mmhub's ``generate`` suppresses it too). A very
  negative ``lm_head`` row cannot guarantee that: without a bias, a logit is a dot
  product with the final hidden state and takes either sign. Raw logits (outside
  ``generate``) keep that 0 column.

`import_hf_llava` (`mmhub.export.hf_llava_import`) is the reverse.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from mmhub.atomic import atomic_dir
from mmhub.errors import ExportError
from mmhub.export.chat_template import jinja_template
from mmhub.export.hf_llava_import import import_hf_llava, llava_spec
from mmhub.export.image_processing import image_processor, read_transform
from mmhub.export.llava_parts import LlavaParts, check_llava, llava_parts

WEIGHTS = "model.safetensors"
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
__all__ = ["export_hf_llava", "import_hf_llava", "llava_config_and_tensors", "llava_spec"]


def _module_names(root: nn.Module) -> dict[int, str]:
    return {id(m): name for name, m in root.named_modules()}


def _vision(parts: LlavaParts) -> tuple[Any, dict[str, torch.Tensor]]:
    """The transformers vision config and tower tensors LLaVA needs (`mmhub.export.vision_towers`)."""
    from mmhub.export.vision_towers import hf_vision_tower, open_clip_tower

    prep = read_transform(parts.encoder.transform, f"encoders.image ({parts.encoder_type})")
    if parts.encoder_type == "open_clip":
        return open_clip_tower(parts.encoder)
    return hf_vision_tower(parts.encoder, prep.image_size, parts.family)


def _grow(weight: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([weight, weight.new_zeros(rows, weight.shape[1])]) if rows else weight


def _projector(parts: LlavaParts, hidden: int) -> tuple[dict[str, torch.Tensor], bool]:
    first, second = parts.linears
    bias = first.bias is not None
    state = {"linear_1.weight": first.weight.detach()}
    if bias:
        state["linear_1.bias"] = first.bias.detach()
    if second is None:  # identity linear_2: exact
        state["linear_2.weight"] = torch.eye(hidden, dtype=first.weight.dtype, device=first.weight.device)
        if bias:
            state["linear_2.bias"] = first.weight.new_zeros(hidden)
    else:
        state["linear_2.weight"] = second.weight.detach()
        if bias:
            state["linear_2.bias"] = second.bias.detach()
    return state, bias


def _meta_llava(config: Any) -> nn.Module:
    """A LLaVA of `config` on the meta device: its layout and shapes, no memory."""
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        return LlavaForConditionalGeneration(config)


def _check_against(ref: nn.Module, tensors: dict[str, torch.Tensor], tied: bool) -> None:
    """Every tensor the reference LLaVA has, with its shape, and nothing else."""
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    if tied:
        want.pop("lm_head.weight", None)
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    wrong = [f"{k} {got[k]} != {want[k]}" for k in sorted(set(want) & set(got)) if want[k] != got[k]]
    if missing or extra or wrong:
        raise ExportError(f"the LLaVA tensors do not match transformers' LlavaForConditionalGeneration: {len(missing)} "
                          f"missing (e.g. {missing[:3]}), {len(extra)} unexpected (e.g. {extra[:3]}), {len(wrong)} of "
                          f"another shape (e.g. {wrong[:3]}); this transformers version lays LLaVA out differently")


def _prefixes(ref: nn.Module) -> dict[str, str]:
    """Where LLaVA keeps its parts (``model.vision_tower``, ``model.language_model``, ... in transformers 5)."""
    names = _module_names(ref)
    return {"vision": names[id(ref.model.vision_tower)], "projector": names[id(ref.model.multi_modal_projector)],
            "language": names[id(ref.model.language_model)], "head": names[id(ref.lm_head)]}


def _dtype(model: Any, parts: LlavaParts, dtype: str | None) -> torch.dtype:
    """The one dtype LLaVA loads in: the components' own, or `dtype` (a cast) when they differ."""
    if dtype is not None:
        if dtype not in DTYPES:
            raise ExportError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    found = {}
    slots = (("encoders.image", parts.encoder), ("projectors.image", parts.projector), ("backbone", parts.backbone))
    for slot, mod in slots:
        kind = model.plan.backbone.info.name if slot == "backbone" else mod.name
        found[f"{slot} ({kind})"] = {p.dtype for p in mod.parameters() if p.is_floating_point()}
    every = set().union(*found.values())
    if len(every) == 1 and next(iter(every)) not in DTYPE_NAMES:
        raise ExportError(f"the components are {next(iter(every))}; transformers' LLaVA is written in float32, "
                          f"bfloat16 or float16: pass dtype= (CLI --dtype) to cast")
    if len(every) != 1:
        listed = ", ".join(f"{slot} {'/'.join(sorted(DTYPE_NAMES.get(d, str(d)) for d in ds))}"
                           for slot, ds in found.items())
        raise ExportError(f"the components hold different dtypes ({listed}) but transformers' LLaVA loads in "
                          f"one dtype; pass dtype= (CLI --dtype) float32, bfloat16 or float16 to cast them, "
                          f"which changes outputs by that rounding")
    return every.pop()


def llava_config_and_tensors(model: Any, parts: LlavaParts,
                             dtype: str | None = None) -> tuple[Any, dict[str, torch.Tensor]]:
    """The ``LlavaConfig`` and the safetensors state (transformers' key names) of a LLaVA-shaped model, in one dtype
    (the components' own, or `dtype`)."""
    from transformers import LlavaConfig

    target = _dtype(model, parts, dtype)
    vision_cfg, vision_state = _vision(parts)
    lm = parts.backbone.language_model()
    text_cfg = copy.deepcopy(lm.config.get_text_config())
    emb, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    tied = emb.weight.data_ptr() == head.weight.data_ptr()
    rows = max(0, parts.placeholder_id + 1 - text_cfg.vocab_size)
    text_cfg.vocab_size += rows
    text_cfg.tie_word_embeddings = tied
    vision_cfg.dtype = text_cfg.dtype = DTYPE_NAMES[target]  # LLaVA loads every part in one dtype
    proj_state, bias = _projector(parts, text_cfg.hidden_size)
    config = LlavaConfig(vision_config=vision_cfg.to_dict(), text_config=text_cfg.to_dict(),
                         image_token_index=parts.placeholder_id, image_seq_length=parts.image_tokens,
                         projector_hidden_act=parts.activation, vision_feature_select_strategy=parts.feature_strategy,
                         vision_feature_layer=parts.feature_layer, multimodal_projector_bias=bias,
                         tie_word_embeddings=tied)
    config.dtype = DTYPE_NAMES[target]
    ref = _meta_llava(config)
    where = _prefixes(ref)
    tensors = {f"{where['vision']}.{k}": v for k, v in vision_state.items()}
    tensors.update({f"{where['projector']}.{k}": v for k, v in proj_state.items()})
    emb_key = _module_names(lm.base_model)[id(emb)] + ".weight"
    for k, v in lm.base_model.state_dict().items():
        tensors[f"{where['language']}.{k}"] = _grow(v.detach(), rows) if k == emb_key else v.detach()
    if not tied:
        tensors[f"{where['head']}.weight"] = _grow(head.weight.detach(), rows)
    _check_against(ref, tensors, tied)
    return config, {k: v.to(target) if v.is_floating_point() else v for k, v in tensors.items()}


def _processor(model: Any, parts: LlavaParts, config: Any) -> Any:
    from transformers import LlavaProcessor

    tokenizer = copy.deepcopy(model.tokenizer)
    if parts.placeholder not in tokenizer.all_special_tokens:  # same id; read back as special, never as text
        tokenizer.add_special_tokens({"extra_special_tokens": [parts.placeholder]}, replace_extra_special_tokens=False)
    chat = jinja_template(model.plan.template, tokenizer, parts.placeholder)
    if chat is not None:
        tokenizer.chat_template = chat
    prep = read_transform(parts.encoder.transform, f"encoders.image ({parts.encoder_type})")
    return LlavaProcessor(image_processor=image_processor(prep, parts.family), tokenizer=tokenizer,
                          patch_size=config.vision_config.patch_size,
                          vision_feature_select_strategy=parts.feature_strategy, chat_template=chat,
                          image_token=parts.placeholder, num_additional_image_tokens=1 if parts.family == "clip" else 0)


def _generation_config(model: Any, parts: LlavaParts) -> Any:
    from transformers import GenerationConfig

    stops = model.stop_token_ids()
    return GenerationConfig(eos_token_id=stops if len(stops) != 1 else stops[0], pad_token_id=model.processor.pad_id,
                            bos_token_id=model.tokenizer.bos_token_id, suppress_tokens=[parts.placeholder_id])


def export_hf_llava(model: Any, out_dir: str | Path, dtype: str | None = None) -> Path:
    """Write `model` (an `MMModel`) as a transformers LLaVA folder; returns its path.

    LLaVA loads in one dtype: components in different dtypes need `dtype` (float32, bfloat16, float16), a cast.
    Raises `ExportError` naming every component that LLaVA cannot express."""
    out = Path(out_dir).expanduser()
    check_llava(model)
    if model.spec.adapters:
        from mmhub.adapters import merged_copy

        model = merged_copy(model)
    parts = llava_parts(model)
    config, tensors = llava_config_and_tensors(model, parts, dtype)
    processor = _processor(model, parts, config)
    generation = _generation_config(model, parts)
    with atomic_dir(out) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp / WEIGHTS), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        generation.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        processor.image_processor.save_pretrained(tmp)  # preprocessor_config.json too, for readers before v5
    return out
