"""Import of a local transformers LLaVA folder as an mmhub model (the reverse of `mmhub.export.hf_llava`).

`import_hf_llava(folder)` reads a LLaVA folder written by `export_hf_llava` or by
transformers (current ``model.language_model.`` key layout, or the older
``language_model.model.`` one; sharded or not; safetensors only) and builds: an
``hf_vision`` encoder reading the CLIP/SigLIP tower from the folder (``source:``) at
``vision_feature_layer``, dropping the CLS token under the ``default`` strategy, with
the folder's image preprocessing (`mmhub.export.image_processing`); an ``mlp`` (depth 2,
its activation) or ``linear`` projector (LLaVA's identity activation with an identity
``linear_2``); and an ``hf_causal_lm`` backbone from the text config with the folder's
weights and tokenizer. Its logits equal transformers' (loaded in float32). The chat
template is the mmhub template the folder's was written from (`named_template`), else
the tokenizer's own Jinja template when it renders plain-string messages; llava-hf's
templates only take transformers' list content, so those need ``template=``.

The imported model keeps referring to the folder for its vision tower and tokenizer (as
any ``source:`` does); ``save_pretrained`` writes the projector and backbone weights.
mmhub's projectors compute in float32, so the tower does too; ``dtype`` sets the
backbone's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mmhub.errors import ExportError
from mmhub.export.chat_template import named_template
from mmhub.export.image_processing import hf_vision_settings
from mmhub.export.llava_parts import ACTIVATIONS, FAMILIES, IDENTITY
from mmhub.importers.base import Checkpoint

WEIGHTS = "model.safetensors"
DTYPES = ("float32", "bfloat16", "float16")
# config keys that do not shape the language model (bookkeeping and classification-head fields)
META_KEYS = ("transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype", "output_attentions",
             "output_hidden_states", "return_dict", "id2label", "label2id", "problem_type", "chunk_size_feed_forward")


def _chat_template(folder: Path, tokenizer: Any) -> str | None:
    """The folder's chat template: the processor's (chat_template.jinja / .json) or the tokenizer's."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    if (folder / "chat_template.json").is_file():
        return json.loads((folder / "chat_template.json").read_text()).get("chat_template")
    return getattr(tokenizer, "chat_template", None)


def _choose_template(folder: Path, tokenizer: Any, placeholder: str, template: str | None) -> str:
    if template is not None:
        return template
    chat = _chat_template(folder, tokenizer)
    name = named_template(chat, tokenizer, placeholder)
    if name is not None:
        return name
    if chat:
        probe = "mmhub-probe-text"
        try:
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": probe}], tokenize=False,
                                                     chat_template=chat)
        except Exception:  # a template that only takes list content may fail on a string
            rendered = ""
        if probe in rendered and getattr(tokenizer, "chat_template", None) == chat:
            return "tokenizer"
        if probe in rendered:
            raise ExportError(f"{folder}: its chat template is the processor's only (the tokenizer does not load "
                              f"it), so mmhub's `tokenizer` template cannot use it; pass template= one of plain, "
                              f"vicuna_v1, llama-2, chatml")
        raise ExportError(f"{folder}: its chat template does not render plain-string messages (it expects "
                          f"transformers' list content), so mmhub cannot use it; pass template= one of plain, "
                          f"vicuna_v1, llama-2, chatml")
    raise ExportError(f"{folder} has no chat template; pass template= one of plain, vicuna_v1, llama-2, chatml")


def _projector_spec(config: Any, proj: dict[str, torch.Tensor],
                    folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """LLaVA's projector tensors -> (mmhub projector settings, its state dict)."""
    act = config.projector_hidden_act
    w1, w2 = proj["linear_1.weight"], proj["linear_2.weight"]
    b1, b2 = proj.get("linear_1.bias"), proj.get("linear_2.bias")
    if act == IDENTITY:
        eye = torch.eye(w2.shape[0], dtype=w2.dtype)
        if w2.shape[0] == w2.shape[1] and torch.equal(w2, eye) and (b2 is None or not bool(b2.any())):
            state = {"proj.weight": w1} | ({"proj.bias": b1} if b1 is not None else {})
            return {"type": "linear", "bias": b1 is not None}, state
        raise ExportError(f"{folder}: projector_hidden_act linear with a linear_2 other than the identity is two "
                          f"stacked linear maps, which no mmhub projector computes in the same order")
    names = {v: k for k, v in ACTIVATIONS.items()} | {"swish": "silu"}
    if act not in names:
        raise ExportError(f"{folder}: projector_hidden_act {act!r} has no mmhub mlp activation "
                          f"({', '.join(sorted(names))} do)")
    zeros = [torch.zeros(w1.shape[0], dtype=w1.dtype), torch.zeros(w2.shape[0], dtype=w2.dtype)]
    state = {"net.0.weight": w1, "net.0.bias": b1 if b1 is not None else zeros[0],
             "net.2.weight": w2, "net.2.bias": b2 if b2 is not None else zeros[1]}
    return {"type": "mlp", "depth": 2, "activation": names[act]}, state


def llava_spec(folder: str | Path, template: str | None = None, dtype: str = "float32", ckpt: Checkpoint | None = None,
               inline_tower: bool = False) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """An mmhub spec for a local LLaVA folder and the projector/backbone tensors to load into it (the backbone in
    `dtype`; the tower in float32, the dtype mmhub's projectors compute in). With `inline_tower` the tower is built
    from the folder's vision config and its tensors come back under ``tower`` (the spec then needs no ``source``);
    else the encoder reads the folder itself."""
    from transformers import AutoConfig, AutoTokenizer

    folder = Path(folder).expanduser().resolve()
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if not (folder / "config.json").is_file():
        raise ExportError(f"{folder} is not a transformers model folder (no config.json)")
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    if config.model_type != "llava":
        raise ExportError(f"{folder} holds a {config.model_type!r} model, not a transformers LLaVA (model_type llava)")
    vision, text = config.vision_config, config.text_config
    problems = []
    if vision.model_type not in FAMILIES:
        problems.append(f"vision_config.model_type {vision.model_type!r} (mmhub's import takes {', '.join(FAMILIES)})")
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        problems.append(f"vision_feature_layer {layer} (several layers concatenated; hf_vision selects one)")
    strategy = config.vision_feature_select_strategy
    if vision.model_type == "siglip_vision_model" and strategy == "default":
        problems.append("vision_feature_select_strategy default on a SigLIP tower (it drops the first patch token, "
                        "SigLIP having no CLS token; hf_vision keeps every patch)")
    processor_cfg = json.loads((folder / "processor_config.json").read_text()) \
        if (folder / "processor_config.json").is_file() else {}
    if (folder / "preprocessor_config.json").is_file():
        image_cfg = json.loads((folder / "preprocessor_config.json").read_text())
        image_where = "preprocessor_config.json"
    else:
        image_cfg, image_where = processor_cfg.get("image_processor"), "processor_config.json image_processor"
    if not isinstance(image_cfg, dict):
        problems.append("no image processor config (preprocessor_config.json, or image_processor in "
                        "processor_config.json): the image preprocessing is unknown")
    if problems:
        raise ExportError(f"{folder} cannot be imported as an mmhub model: " + "; ".join(problems))
    prep = hf_vision_settings(image_cfg, f"{folder}: {image_where}")
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    placeholder = getattr(tokenizer, "image_token", None) or processor_cfg.get("image_token") or "<image>"
    if tokenizer.convert_tokens_to_ids(placeholder) != config.image_token_index:
        raise ExportError(f"{folder}: the tokenizer gives {placeholder!r} id "
                          f"{tokenizer.convert_tokens_to_ids(placeholder)} but config.image_token_index is "
                          f"{config.image_token_index}; the folder is inconsistent")
    template_name = _choose_template(folder, tokenizer, placeholder, template)
    ckpt = ckpt or Checkpoint(folder)
    proj_prefix = ckpt.first_prefix("model.multi_modal_projector.", "multi_modal_projector.", what="projector tensors")
    proj_settings, proj_state = _projector_spec(config, ckpt.take(proj_prefix), folder)
    lm_prefix = ckpt.first_prefix("model.language_model.", "language_model.model.", what="language model tensors")
    lm_state = ckpt.take(lm_prefix)
    head_key = "lm_head.weight" if lm_prefix == "model.language_model." else "language_model.lm_head.weight"
    tied = bool(config.tie_word_embeddings or text.tie_word_embeddings)
    if tied:
        ckpt.ignore(head_key, "the head is tied to the input embeddings")
        head = {}
    elif ckpt.has(head_key):
        head = {"weight": ckpt.tensor(head_key)}
    else:
        raise ExportError(f"{folder}: no {head_key} and the embeddings are not tied (tie_word_embeddings false)")
    tower_prefix = ckpt.first_prefix("model.vision_tower.", "vision_tower.", what="vision tower tensors")
    tower = ckpt.take(tower_prefix) if inline_tower else {}
    text_settings = {k: v for k, v in text.to_dict().items() if k not in META_KEYS}
    text_settings["tie_word_embeddings"] = tied
    tower_from = ({"config": {k: v for k, v in vision.to_dict().items() if k not in META_KEYS}} if inline_tower
                  else {"source": str(folder)})
    spec = {
        "name": folder.name,
        "description": f"imported from the transformers LLaVA folder {folder}",
        "encoders": {"image": {"type": "hf_vision", **tower_from, "select_layer": layer,
                               "drop_cls": strategy == "default" or vision.model_type == "siglip_vision_model",
                               "dtype": "float32",
                               **prep}},
        "projectors": {"image": proj_settings},
        "backbone": {"type": "hf_causal_lm", "config": text_settings, "tokenizer": str(folder),
                     "dtype": dtype},
        "template": template_name,
        "placeholders": {"image": placeholder},
    }
    return spec, {"projector": proj_state, "language": lm_state, "head": head, "tower": tower}


def import_hf_llava(folder: str | Path, template: str | None = None, dtype: str = "float32") -> Any:
    """A local transformers LLaVA folder -> an `MMModel` (hf_vision -> mlp/linear -> hf_causal_lm) whose logits equal
    transformers' (loaded in float32). `template` names the mmhub chat template when the folder's cannot be used or
    recognised; `dtype` is the backbone's (the vision tower and projector compute in float32 in mmhub). The same as
    `mmhub.importers.import_checkpoint` on a ``llava`` folder."""
    from mmhub.importers.run import import_checkpoint

    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file():
        raise ExportError(f"{folder} is not a transformers model folder (no config.json)")
    model_type = Checkpoint(folder).model_type
    if model_type != "llava":
        raise ExportError(f"{folder} holds a {model_type!r} model, not a transformers LLaVA (model_type llava)")
    return import_checkpoint(folder, template=template, dtype=dtype)
