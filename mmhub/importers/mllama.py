"""The Llama-3.2-Vision importer: transformers ``mllama`` folders -> mllama_vision -> linear -> Llama + mllama_xattn.

Mllama is a tiled vision tower (``MllamaVisionModel``, imported as the ``mllama_vision`` encoder: the tower is
transformers', the tiling mmhub's, equal to ``MllamaImageProcessor``), a linear ``multi_modal_projector``, and a Llama
text model whose layers listed in ``cross_attention_layers`` are gated cross-attention blocks. mmhub splits the text
model in two: an ``hf_causal_lm`` Llama holding the self-attention layers only (same RoPE, llama3 scaling included)
and the ``mllama_xattn`` injector holding the cross-attention blocks, hooked in at their depth. The embedding table
has ``vocab_size + 8`` rows: the Llama gets the first ``vocab_size`` (its head has as many columns) and the injector
the 8 extra ones, the image token's row (``image_token_index``) being the marker that stands for each image in the
text. Both key layouts are read: ``model.{vision_model,language_model,multi_modal_projector}.`` + ``lm_head.`` and
the older ``vision_model.``, ``language_model.model.``, ``language_model.lm_head.``, ``multi_modal_projector.``.

Export (`export_mllama`) is the reverse, for models of that shape: the Llama's layers and the injector's blocks
interleaved back into one text model, the extra rows appended to the table, the tower and projector as they are, a
MllamaImageProcessor with the encoder's tiling and normalisation and the tokenizer with the model's chat template
(LoRA adapters merged into a copy first). transformers loads one dtype: every part must be float32 or share one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from mmhub.errors import CheckpointError, ExportError
from mmhub.importers.base import Checkpoint, Imported, Importer, ImportOptions

VISION_FIELDS = ("hidden_size", "hidden_act", "num_hidden_layers", "num_global_layers", "attention_heads",
                 "num_channels", "intermediate_size", "vision_output_dim", "image_size", "patch_size", "norm_eps",
                 "max_num_tiles", "intermediate_layers_indices", "supported_aspect_ratios", "initializer_range")
LAYOUTS = {  # vision, language, projector, head
    "current": ("model.vision_model.", "model.language_model.", "model.multi_modal_projector.", "lm_head.weight"),
    "older": ("vision_model.", "language_model.model.", "multi_modal_projector.", "language_model.lm_head.weight"),
}
BILINEAR = 2  # PIL's code; MllamaImageProcessor's resample
INJECTOR = "xattn"


def image_settings(image_cfg: Any, vision: Any, where: str) -> dict[str, Any]:
    """The folder's MllamaImageProcessor settings -> mllama_vision's mean/std, checked against the tower."""
    if not isinstance(image_cfg, dict):
        raise CheckpointError(f"{where}: no image processor config (preprocessor_config.json, or image_processor in "
                              f"processor_config.json); the tiling and normalisation are unknown")
    problems = []
    size = image_cfg.get("size") or {}
    if size.get("height", vision.image_size) != vision.image_size or size.get("width", vision.image_size) \
            != vision.image_size:
        problems.append(f"size {size} != the tower's tile size {vision.image_size}")
    tiles = image_cfg.get("max_image_tiles", 4)
    if tiles != vision.max_num_tiles:
        problems.append(f"max_image_tiles {tiles} != the tower's max_num_tiles {vision.max_num_tiles}")
    if image_cfg.get("resample", BILINEAR) != BILINEAR:
        problems.append(f"resample {image_cfg['resample']} (mllama_vision resizes bilinearly, code {BILINEAR})")
    if abs(float(image_cfg.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-12:
        problems.append(f"rescale_factor {image_cfg['rescale_factor']} (mllama_vision scales by 1/255)")
    off = [k for k in ("do_resize", "do_rescale", "do_normalize", "do_pad") if image_cfg.get(k, True) is False]
    if off:
        problems.append(f"{', '.join(off)} false (mllama_vision always resizes, pads, rescales and normalises)")
    if problems:
        raise CheckpointError(f"{where}: the image processor does what mllama_vision does not: " + "; ".join(problems))
    out: dict[str, Any] = {}
    for key, name in (("image_mean", "mean"), ("image_std", "std")):
        if key in image_cfg:
            out[name] = [float(v) for v in image_cfg[key]]
    return out


def text_settings(text: Any, cross: list[int]) -> dict[str, Any]:
    """The Mllama text config -> a Llama config holding the self-attention layers only."""
    return {
        "model_type": "llama", "vocab_size": text.vocab_size, "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size, "num_hidden_layers": text.num_hidden_layers - len(cross),
        "num_attention_heads": text.num_attention_heads, "num_key_value_heads": text.num_key_value_heads,
        "head_dim": text.hidden_size // text.num_attention_heads, "hidden_act": text.hidden_act,
        "max_position_embeddings": text.max_position_embeddings, "rms_norm_eps": text.rms_norm_eps,
        "rope_parameters": dict(text.rope_parameters), "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": False, "bos_token_id": text.bos_token_id, "eos_token_id": text.eos_token_id,
        "pad_token_id": text.pad_token_id,
    }


def split_language(lm: dict[str, torch.Tensor], cross: list[int], total: int
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The text model's layer tensors -> (self layers renumbered 0.., cross layers renumbered by rank)."""
    self_layers = [i for i in range(total) if i not in cross]
    where = {i: ("self", j) for j, i in enumerate(self_layers)} | {i: ("cross", r) for r, i in enumerate(cross)}
    out: dict[str, dict[str, torch.Tensor]] = {"self": {}, "cross": {}}
    for key, value in lm.items():
        if not key.startswith("layers."):
            continue
        index, rest = key[len("layers."):].split(".", 1)
        kind, new = where[int(index)]
        out[kind][f"layers.{new}.{rest}"] = value
    return out["self"], out["cross"]


class MllamaImporter(Importer):
    """Llama-3.2-Vision (the 11B/90B layout at any size): tiles -> MllamaVisionModel -> linear -> Llama + xattn."""

    name: ClassVar[str] = "mllama"
    model_types: ClassVar[tuple[str, ...]] = ("mllama",)
    description: ClassVar[str] = ("Llama-3.2-Vision: tiled mllama_vision -> linear -> hf_causal_lm Llama "
                                  "(self-attention layers) + mllama_xattn (its gated cross-attention layers)")

    def convert(self, ckpt: Checkpoint, options: ImportOptions) -> Imported:
        from mmhub.export.hf_llava_import import _choose_template

        cfg = ckpt.hf_config()
        vision, text = cfg.vision_config, cfg.text_config
        where = str(ckpt.folder)
        image_cfg = ckpt.json("preprocessor_config.json") or (ckpt.json("processor_config.json") or {}).get(
            "image_processor")
        prep = image_settings(image_cfg, vision, where)
        vis_prefix = ckpt.first_prefix(LAYOUTS["current"][0], LAYOUTS["older"][0], what="vision tower tensors")
        layout = LAYOUTS["current" if vis_prefix == LAYOUTS["current"][0] else "older"]
        lm = ckpt.take(layout[1])
        proj = ckpt.take(layout[2])
        head = ckpt.tensor(layout[3])
        cross = sorted(text.cross_attention_layers)
        vocab, emb = text.vocab_size, lm.pop("embed_tokens.weight")
        extra = emb.shape[0] - vocab
        if extra < 1:
            raise CheckpointError(f"{where}: embed_tokens has {emb.shape[0]} rows, not more than vocab_size {vocab}; "
                                  f"Mllama's table has vocab_size + 8 rows (the image token's among the extra ones)")
        image_id = cfg.image_token_index
        if not vocab <= image_id < vocab + extra:
            raise CheckpointError(f"{where}: image_token_index {image_id} is not one of the embedding table's extra "
                                  f"rows {vocab}..{vocab + extra - 1}; mmhub's mllama import keeps the image token's "
                                  f"row as the injector's marker and needs it past the vocabulary")
        tokenizer = ckpt.tokenizer()
        placeholder = getattr(tokenizer, "image_token", None) or "<|image|>"
        if tokenizer.convert_tokens_to_ids(placeholder) != image_id:
            raise CheckpointError(f"{where}: the tokenizer gives {placeholder!r} id "
                                  f"{tokenizer.convert_tokens_to_ids(placeholder)} but config.image_token_index is "
                                  f"{image_id}; the folder is inconsistent")
        self_state, cross_state = split_language(lm, cross, text.num_hidden_layers)
        backbone_state = {f"model.{k}": v for k, v in self_state.items()}
        backbone_state.update({"model.embed_tokens.weight": emb[:vocab], "model.norm.weight": lm["norm.weight"],
                               "lm_head.weight": head})
        injector_state = {**cross_state, "extra_rows": emb[vocab:]}
        vision_settings = {k: getattr(vision, k) for k in VISION_FIELDS}
        spec = {
            "name": ckpt.folder.name,
            "description": f"imported from the transformers Mllama folder {ckpt.folder}",
            "encoders": {"image": {"type": "mllama_vision", "config": vision_settings, "dtype": "float32", **prep}},
            "projectors": {"image": {"type": "linear", "bias": "bias" in proj}},
            "backbone": {"type": "hf_causal_lm", "config": text_settings(text, cross), "tokenizer": where,
                         "dtype": options.dtype},
            "injectors": {INJECTOR: {
                "type": "mllama_xattn", "modality": "image", "layers": cross, "heads": text.num_attention_heads,
                "kv_heads": text.num_key_value_heads, "intermediate_size": text.intermediate_size,
                "rms_norm_eps": text.rms_norm_eps, "hidden_act": text.hidden_act, "extra_rows": extra,
                "marker_row": image_id - vocab}},
            "template": _choose_template(ckpt.folder, tokenizer, placeholder, options.template),
            "placeholders": {"image": placeholder},
        }
        weights = {"encoders.image.model": ckpt.take(vis_prefix),
                   "projectors.image": {f"proj.{k}": v for k, v in proj.items()},
                   "backbone.model": backbone_state,
                   f"injectors.{INJECTOR}": injector_state}
        notes = [f"{len(cross)} cross-attention layer(s) at stack positions {cross} run as the mllama_xattn injector; "
                 f"the Llama backbone holds the other {text.num_hidden_layers - len(cross)} layers"]
        return Imported(spec=spec, weights=weights, notes=notes)

    def export(self, model: Any, out: Path) -> Path:
        return export_mllama(model, out)


def shape_problems(model: Any) -> list[str]:
    """Why `model` is not an Mllama (empty when it is one)."""
    problems = []
    kinds = {"encoders": ("image", "mllama_vision"), "projectors": ("image", "linear")}
    for slot, (m, name) in kinds.items():
        parts = getattr(model, slot)
        if list(parts) != [m] or parts[m].name != name:
            problems.append(f"{slot}: {[f'{k}: {v.name}' for k, v in parts.items()]} (Mllama has one {m} {name})")
    lm = model.backbone.language_model()
    if model.backbone.name != "hf_causal_lm" or lm is None or lm.config.model_type != "llama":
        problems.append(f"backbone: {model.backbone.name} (Mllama's text model is an hf_causal_lm Llama)")
    injectors = [i for i in model.injectors.values() if i.name == "mllama_xattn"]
    if len(model.injectors) != 1 or len(injectors) != 1:
        problems.append(f"injectors: {[i.name for i in model.injectors.values()]} (Mllama has one mllama_xattn)")
    elif lm is not None and not problems:
        inj, cfg = injectors[0].config, lm.config
        pairs = {"intermediate_size": (inj.intermediate_size, cfg.intermediate_size),
                 "heads": (inj.heads, cfg.num_attention_heads), "kv_heads": (inj.kv_heads, cfg.num_key_value_heads),
                 "rms_norm_eps": (inj.rms_norm_eps, cfg.rms_norm_eps), "hidden_act": (inj.hidden_act, cfg.hidden_act)}
        problems += [f"injectors: {k} {a} != the Llama's {b} (Mllama's layers share them)"
                     for k, (a, b) in pairs.items() if a != b]
        if cfg.tie_word_embeddings:
            problems.append("backbone: tie_word_embeddings (Mllama's head is its own)")
    if not problems and len({p.dtype for p in model.parameters()}) > 1:
        problems.append(f"dtypes {sorted(str(d) for d in {p.dtype for p in model.parameters()})} differ between "
                        f"parts; transformers loads Mllama in one (cast the model first)")
    return problems


def _tensors(model: Any) -> dict[str, torch.Tensor]:
    """The model's weights under transformers' current Mllama key names."""
    enc, proj = model.encoders["image"], model.projectors["image"]
    lm, inj = model.backbone.language_model(), next(iter(model.injectors.values()))
    out = {f"model.vision_model.{k}": v for k, v in enc.model.state_dict().items()}
    out.update({f"model.multi_modal_projector.{k}": v for k, v in proj.proj.state_dict().items()})
    text = "model.language_model."
    out[f"{text}embed_tokens.weight"] = torch.cat([lm.get_input_embeddings().weight, inj.extra_rows]).detach()
    out[f"{text}norm.weight"] = lm.model.norm.weight
    out["lm_head.weight"] = lm.get_output_embeddings().weight
    cross = inj.config.layers
    self_layers = [i for i in range(len(lm.model.layers) + len(cross)) if i not in cross]
    for j, i in enumerate(self_layers):
        out.update({f"{text}layers.{i}.{k}": v for k, v in lm.model.layers[j].state_dict().items()})
    for r, i in enumerate(cross):
        out.update({f"{text}layers.{i}.{k}": v for k, v in inj.layers[r].state_dict().items()})
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def export_mllama(model: Any, out_dir: str | Path) -> Path:
    """Write `model` (an imported or Mllama-shaped `MMModel`) as a transformers Mllama folder; returns its path."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig, MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor
    from transformers.models.mllama.image_processing_mllama import MllamaImageProcessor

    from mmhub.adapters import merged_copy
    from mmhub.atomic import atomic_dir
    from mmhub.export.chat_template import jinja_template

    problems = shape_problems(model)
    if problems:
        raise ExportError("this model is not shaped like Mllama, so it cannot be written as one: "
                          + "; ".join(problems))
    if model.spec.adapters:
        model = merged_copy(model)
    enc, lm = model.encoders["image"], model.backbone.language_model()
    inj = next(iter(model.injectors.values()))
    llama, vocab = lm.config, lm.config.vocab_size
    placeholder = model.spec.placeholder("image")
    image_id = vocab + inj.config.marker_row
    if model.tokenizer.convert_tokens_to_ids(placeholder) != image_id:
        raise ExportError(f"the tokenizer gives {placeholder!r} id {model.tokenizer.convert_tokens_to_ids(placeholder)}"
                          f" but the injector's marker is extra row {inj.config.marker_row}, id {image_id}; Mllama "
                          f"looks the image token up in its table, so they must agree")
    text = {"vocab_size": vocab, "hidden_size": llama.hidden_size, "intermediate_size": llama.intermediate_size,
            "num_hidden_layers": llama.num_hidden_layers + len(inj.config.layers),
            "num_attention_heads": llama.num_attention_heads, "num_key_value_heads": llama.num_key_value_heads,
            "hidden_act": llama.hidden_act, "max_position_embeddings": llama.max_position_embeddings,
            "rms_norm_eps": llama.rms_norm_eps, "rope_parameters": dict(llama.rope_parameters),
            "cross_attention_layers": list(inj.config.layers), "bos_token_id": llama.bos_token_id,
            "eos_token_id": llama.eos_token_id, "pad_token_id": llama.pad_token_id, "tie_word_embeddings": False}
    vision = {k: getattr(enc.hf_config, k) for k in VISION_FIELDS}
    dtype = next(model.parameters()).dtype
    config = MllamaConfig(vision_config=vision, text_config=text, image_token_index=image_id, dtype=dtype)
    tensors = _tensors(model)
    with torch.device("meta"):
        want = MllamaForConditionalGeneration(config).state_dict()
    wrong = sorted(set(want) ^ set(tensors)) + [f"{k}: {tuple(v.shape)} vs {tuple(want[k].shape)}"
                                                for k, v in tensors.items() if k in want and v.shape != want[k].shape]
    if wrong:
        raise ExportError(f"the exported tensors do not fit transformers' Mllama: {wrong[:8]}")
    tokenizer = model.tokenizer
    chat = jinja_template(model.plan.template, tokenizer, placeholder)
    image_processor = MllamaImageProcessor(size={"height": enc.tile, "width": enc.tile}, max_image_tiles=enc.max_tiles,
                                           image_mean=list(enc.config.mean), image_std=list(enc.config.std))
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat)
    stops = model.stop_token_ids()
    generation = GenerationConfig(eos_token_id=stops if len(stops) != 1 else stops[0],
                                  pad_token_id=model.processor.pad_id, bos_token_id=tokenizer.bos_token_id)
    out = Path(out_dir).expanduser()
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        generation.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return out
