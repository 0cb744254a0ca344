"""The BLIP-2 family importer: transformers ``blip-2`` folders -> hf_vision -> qformer (layout blip2) -> OPT / Flan-T5.

The parts, each an mmhub component with the checkpoint's weights:

* ``hf_vision`` over transformers' BLIP-2 vision tower (built from ``vision_config``), every token of its last
  block through ``post_layernorm`` (``select_layer: -1``, ``final_norm: true``, ``drop_cls: false``: exactly
  transformers' ``last_hidden_state``), preprocessing from the folder's image processor;
* ``qformer`` with ``layout: blip2``: ``query_tokens``, the Q-Former (`mmhub.projectors.qformer_blip2`) and
  ``language_projection`` as its output linear;
* ``hf_causal_lm`` (OPT, LLaMA, ...) or ``hf_seq2seq_lm`` (Flan-T5) from ``text_config``, tokenizer from the folder;
* template ``blip-2`` (image tokens, then the prompt as the tokenizer encodes it: bos first) or ``blip-2-t5``
  (eos last), the layouts of transformers' BLIP-2 processor.

`blip_parts` is shared with the InstructBLIP importer (`mmhub.importers.instructblip`), which differs only in its
instruction-aware Q-Former.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from mmhub.errors import CheckpointError
from mmhub.export.hf_llava_import import META_KEYS
from mmhub.export.image_processing import hf_vision_settings
from mmhub.importers.base import Checkpoint, Imported, Importer, ImportOptions
from mmhub.projectors.qformer_blip2 import qformer_state

QFORMER_ACT = "gelu"  # the Q-Former's FFN activation mmhub's blip2 layout computes (BERT's erf GELU)


def _settings(config: Any) -> dict[str, Any]:
    """A transformers sub-config as mmhub ``config:`` settings (bookkeeping keys dropped)."""
    return {k: v for k, v in config.to_dict().items() if k not in META_KEYS}


def _image_settings(ckpt: Checkpoint, kind: str = "image") -> dict[str, Any]:
    """hf_vision preprocessing from the folder's image (or video: per frame) processor config."""
    own = "preprocessor_config.json" if kind == "image" else "video_preprocessor_config.json"
    raw, where = ckpt.json(own), own
    if not isinstance(raw, dict):
        raw = (ckpt.json("processor_config.json") or {}).get(f"{kind}_processor")
        where = f"processor_config.json {kind}_processor"
    if not isinstance(raw, dict):
        raise CheckpointError(f"{ckpt.folder}: no {kind} processor config ({own}, or {kind}_processor in "
                              f"processor_config.json); save the model with its processor")
    if kind == "video" and raw.get("do_sample_frames"):
        raise CheckpointError(f"{ckpt.folder}: {where} samples frames itself (do_sample_frames: true); mmhub's video "
                              f"encoder samples num_frames evenly instead")
    return hf_vision_settings(raw, f"{ckpt.folder}: {where}")


def _qformer_settings(config: Any, ckpt: Checkpoint) -> dict[str, Any]:
    q = config.qformer_config
    problems = []
    if q.hidden_act != QFORMER_ACT:
        problems.append(f"qformer_config.hidden_act {q.hidden_act!r} (the blip2 layout computes {QFORMER_ACT!r})")
    if getattr(q, "position_embedding_type", "absolute") != "absolute":
        problems.append(f"qformer_config.position_embedding_type {q.position_embedding_type!r} (only absolute)")
    if q.encoder_hidden_size != config.vision_config.hidden_size:
        problems.append(f"qformer_config.encoder_hidden_size {q.encoder_hidden_size} != vision hidden_size "
                        f"{config.vision_config.hidden_size}")
    if problems:
        raise CheckpointError(f"{ckpt.folder}: the Q-Former cannot be built as mmhub's qformer (layout blip2): "
                              + "; ".join(problems))
    return {"type": "qformer", "layout": "blip2", "num_queries": config.num_query_tokens,
            "layers": q.num_hidden_layers, "width": q.hidden_size, "heads": q.num_attention_heads,
            "cross_attention_every": q.cross_attention_frequency, "mlp_ratio": q.intermediate_size / q.hidden_size,
            "norm_eps": q.layer_norm_eps}


def _placeholder(ckpt: Checkpoint, config: Any, modality: str = "image") -> str:
    """The media token string: the tokenizer's token at ``image_token_index`` (``video_token_index``), checked to be a
    single token."""
    tok = ckpt.tokenizer()
    index = getattr(config, f"{modality}_token_index", None)
    if index is None:
        raise CheckpointError(f"{ckpt.folder}: config.json has no {modality}_token_index, so the {modality} tokens "
                              f"cannot be found in the text; re-save the model with a transformers that writes it")
    token = tok.convert_ids_to_tokens(int(index))
    if not isinstance(token, str) or tok.convert_tokens_to_ids(token) != index:
        raise CheckpointError(f"{ckpt.folder}: image_token_index {index} is not a token of the folder's tokenizer "
                              f"({len(tok)} tokens); the folder is inconsistent")
    return token


Weights = dict[str, dict[str, torch.Tensor]]


def blip_parts(ckpt: Checkpoint, options: ImportOptions, qformer_extra: dict[str, Any] | None = None,
               frames: int | None = None) -> tuple[dict[str, Any], Weights]:
    """A BLIP-2-shaped checkpoint (BLIP-2, InstructBLIP) -> (mmhub spec, weight map). `qformer_extra` adds settings to
    the Q-Former (InstructBLIP: instruction-aware, its tokenizer and text embeddings). With `frames` the input is
    video (InstructBLIP-Video): the tower reads `frames` frames (``video`` encoder, ``temporal: concat``) and the
    Q-Former reads each frame on its own."""
    config = ckpt.hf_config()
    qformer = _qformer_settings(config, ckpt) | (qformer_extra or {})
    decoder_only = bool(config.use_decoder_only_language_model)
    text = config.text_config
    text_settings = _settings(text)
    lm_state = ckpt.take(ckpt.first_prefix("language_model.", what="language model tensors"))
    head_tied = bool(getattr(text, "tie_word_embeddings", True))
    if not head_tied and "lm_head.weight" not in lm_state:
        raise CheckpointError(f"{ckpt.folder}: no language_model.lm_head.weight and text_config.tie_word_embeddings "
                              f"is false")
    q_state = ckpt.take("qformer.")
    text_ffn = bool(qformer.get("instruction_aware"))
    projector = {f"qformer.{k}": v for k, v in qformer_state(q_state, ckpt.tensor("query_tokens"), text_ffn).items()}
    projector |= {f"proj.{k}": v for k, v in ckpt.take("language_projection.").items()}
    m = "image" if frames is None else "video"
    tower = {"type": "hf_vision", "config": _settings(config.vision_config), "select_layer": -1, "final_norm": True,
             "drop_cls": False, "dtype": "float32", **_image_settings(ckpt, m)}
    encoder = tower if frames is None else {"type": "video", "frames": tower, "num_frames": frames,
                                            "temporal": "concat"}
    if frames is not None:
        qformer["frames"] = frames
    template = "blip-2" if m == "image" else "blip-2-video"
    spec = {
        "name": ckpt.folder.name,
        "description": f"imported from the transformers {config.model_type} folder {ckpt.folder}",
        "encoders": {m: encoder},
        "projectors": {m: qformer},
        "backbone": {"type": "hf_causal_lm" if decoder_only else "hf_seq2seq_lm", "config": text_settings,
                     "tokenizer": str(ckpt.folder), "dtype": options.dtype},
        "template": options.template or (template if decoder_only else "blip-2-t5"),
        "placeholders": {m: _placeholder(ckpt, config, m)},
    }
    tower_path = f"encoders.{m}.model" if frames is None else f"encoders.{m}.frames.model"
    weights = {tower_path: ckpt.take("vision_model."), f"projectors.{m}": projector, "backbone.model": lm_state}
    return spec, weights


class Blip2Importer(Importer):
    """BLIP-2 (Salesforce/blip2-opt-*, blip2-flan-t5-*): ViT-g tower -> Q-Former + projection -> OPT / Flan-T5."""

    name: ClassVar[str] = "blip_2"
    model_types: ClassVar[tuple[str, ...]] = ("blip-2",)
    description: ClassVar[str] = ("BLIP-2: ViT tower (post-LN tokens) -> qformer (layout blip2) + language projection "
                                  "-> OPT / Flan-T5")

    def convert(self, ckpt: Checkpoint, options: ImportOptions) -> Imported:
        spec, weights = blip_parts(ckpt, options)
        notes = []
        if getattr(ckpt.hf_config().qformer_config, "use_qformer_text_input", False):
            notes.append("the Q-Former's text FFN (use_qformer_text_input) is not used for generation; dropped")
        return Imported(spec=spec, weights=weights, notes=notes)

    def export(self, model: Any, out: Path) -> Path:
        from mmhub.importers.blip2_export import export_blip

        return export_blip(model, out, self.name)
