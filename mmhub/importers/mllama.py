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
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from mmhub.errors import CheckpointError
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
