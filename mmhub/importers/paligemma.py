"""The PaliGemma family importer: transformers ``paligemma`` folders -> hf_vision (SigLIP) -> linear -> Gemma.

PaliGemma (1 and 2) is a SigLIP tower whose last hidden state (after its final LayerNorm, no attention-pooling head)
goes through one linear map to Gemma's width; the image tokens come first, then bos, the prompt and "\\n" (mmhub
template ``paligemma``), and the LLM reads that whole prefix bidirectionally while the answer (the suffix) is causal:
the backbone runs with ``prefix_lm: true``. How the pieces map:

* tower: ``hf_vision`` over the folder's vision config, ``select_layer: -1`` + ``final_norm`` (SigLIP's
  ``last_hidden_state``), the processor's resize and normalisation; its weights from ``vision_tower.``;
* projector: ``linear`` (with bias) from ``multi_modal_projector.linear``;
* LLM: ``hf_causal_lm`` over the text config, ``prefix_lm: true``, the head tied or from ``lm_head``.

The image-feature scale: older transformers divided the projected features by sqrt(hidden_size) and then scaled the
whole sequence by sqrt(hidden_size) inside Gemma; current Gemma scales only the token embeddings (in its embedding
layer). Both leave the image features unscaled, and so does mmhub (the backbone's ``embed`` is Gemma's scaled
embedding; the projector's output goes in as is). PaliGemma counts positions from 1, mmhub from 0: RoPE depends only
on the distance between positions, so the logits agree to float rounding. transformers sets Gemma's
``use_bidirectional_attention`` for PaliGemma because its own model always builds the prefix mask; mmhub builds it
itself (`mmhub.passes.prefix_lm_mask`), so the imported text config turns it off (a mask transformers would skip
must stay causal).
"""

from __future__ import annotations

from typing import Any, ClassVar

from mmhub.errors import CheckpointError
from mmhub.importers.base import Checkpoint, Imported, Importer, ImportOptions

# config keys that do not shape a sub-model (bookkeeping and classification-head fields)
META_KEYS = ("transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype", "output_attentions",
             "output_hidden_states", "return_dict", "id2label", "label2id", "problem_type", "chunk_size_feed_forward")
IMAGE_TOKEN = "<image>"  # PaliGemmaProcessor's image token (its template puts bos after the last one)


def settings_of(config: Any, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """A transformers sub-config as an mmhub ``config:`` dict (model_type kept, bookkeeping dropped)."""
    return {k: v for k, v in config.to_dict().items() if k not in META_KEYS and k not in drop}


def tower_tensors(ckpt: Checkpoint, prefixes: tuple[str, ...], head_reason: str) -> dict[str, Any]:
    """The vision tower's tensors under the first layout present (any inner ``vision_model.`` stripped: transformers'
    tower modules hold ``embeddings``/``encoder``/``post_layernorm`` directly); an attention-pooling ``head.`` is
    ignored with `head_reason`."""
    prefix = ckpt.first_prefix(*prefixes, what="vision tower")
    if ckpt.has(prefix + "vision_model."):
        prefix += "vision_model."
    ckpt.ignore(prefix + "head.", head_reason)
    return {k: v for k, v in ckpt.take(prefix).items() if not k.startswith("head.")}


def image_processor_config(ckpt: Checkpoint) -> tuple[dict[str, Any], str]:
    """The folder's image processor settings and where they were found."""
    raw = ckpt.json("preprocessor_config.json")
    if isinstance(raw, dict):
        return raw, "preprocessor_config.json"
    raw = (ckpt.json("processor_config.json") or {}).get("image_processor")
    if isinstance(raw, dict):
        return raw, "processor_config.json image_processor"
    raise CheckpointError(f"{ckpt.folder}: no image processor config (preprocessor_config.json, or image_processor in "
                          f"processor_config.json): the image preprocessing is unknown")


def language_tensors(ckpt: Checkpoint, tied: bool,
                     prefixes: tuple[str, ...] = ("model.language_model.", "language_model.model.")) -> dict[str, Any]:
    """The LLM's tensors as a transformers causal LM names them (``model.``..., ``lm_head.weight`` when untied),
    from under the first of `prefixes` present."""
    prefix = ckpt.first_prefix(*prefixes, what="language model")
    state = {"model." + k: v for k, v in ckpt.take(prefix).items()}
    head = next((k for k in ("lm_head.weight", "language_model.lm_head.weight") if ckpt.has(k)), None)
    if tied:
        if head is not None:
            ckpt.ignore(head, "the LM head is tied to the token embeddings (tie_word_embeddings)")
    elif head is None:
        raise CheckpointError(f"{ckpt.folder}: no lm_head.weight and the embeddings are not tied "
                              f"(tie_word_embeddings false); the checkpoint is incomplete")
    else:
        state["lm_head.weight"] = ckpt.tensor(head)
    return state


class PaliGemmaImporter(Importer):
    """PaliGemma 1/2: SigLIP -> linear -> Gemma with prefix-LM attention."""

    name: ClassVar[str] = "paligemma"
    model_types: ClassVar[tuple[str, ...]] = ("paligemma",)
    description: ClassVar[str] = ("PaliGemma: SigLIP last layer -> linear -> Gemma/Gemma-2, image+prompt prefix read "
                                  "bidirectionally (prefix_lm)")

    def convert(self, ckpt: Checkpoint, options: ImportOptions) -> Imported:
        from mmhub.export.image_processing import hf_vision_settings

        config = ckpt.hf_config()
        vision, text = config.vision_config, config.text_config
        if not vision.model_type.startswith("siglip"):
            raise CheckpointError(f"{ckpt.folder}: vision_config.model_type {vision.model_type!r}; PaliGemma's import "
                                  f"takes a SigLIP tower (siglip_vision_model)")
        image_cfg, where = image_processor_config(ckpt)
        prep = hf_vision_settings(image_cfg, f"{ckpt.folder}: {where}")
        patches = (prep["image_size"] // vision.patch_size) ** 2
        seq = image_cfg.get("image_seq_length")
        if seq is not None and seq != patches:
            raise CheckpointError(f"{ckpt.folder}: {where} image_seq_length {seq} != the tower's {patches} patch "
                                  f"tokens at {prep['image_size']} px (patch {vision.patch_size}); the folder is "
                                  f"inconsistent")
        tokenizer = ckpt.tokenizer()
        placeholder = getattr(tokenizer, "image_token", None) or IMAGE_TOKEN
        image_id = tokenizer.convert_tokens_to_ids(placeholder)
        if image_id != config.image_token_id:
            raise CheckpointError(f"{ckpt.folder}: the tokenizer gives {placeholder!r} id {image_id} but "
                                  f"config.image_token_index is {config.image_token_id}; the folder is inconsistent")
        tied = bool(config.tie_word_embeddings or text.tie_word_embeddings)
        tower = tower_tensors(ckpt, ("model.vision_tower.", "vision_tower."),
                              "SigLIP's attention-pooling head: PaliGemma reads the patch tokens")
        proj_prefix = ckpt.first_prefix("model.multi_modal_projector.", "multi_modal_projector.", what="projector")
        projector = {"proj." + k: v for k, v in ckpt.take(proj_prefix + "linear.").items()}
        language = language_tensors(ckpt, tied)
        text_settings = settings_of(text) | {"tie_word_embeddings": tied, "use_bidirectional_attention": False}
        spec = {
            "name": ckpt.folder.name,
            "description": f"imported from the transformers PaliGemma folder {ckpt.folder}",
            "encoders": {"image": {"type": "hf_vision", "config": settings_of(vision) | {"vision_use_head": False},
                                   "select_layer": -1, "final_norm": True, "drop_cls": False, "dtype": "float32",
                                   **prep}},
            "projectors": {"image": {"type": "linear", "bias": "proj.bias" in projector}},
            "backbone": {"type": "hf_causal_lm", "config": text_settings, "prefix_lm": True,
                         "tokenizer": str(ckpt.folder), "dtype": options.dtype},
            "template": options.template or "paligemma",
            "placeholders": {"image": placeholder},
        }
        notes = ["positions count from 0 in mmhub and from 1 in PaliGemma: RoPE sees only their differences"]
        if getattr(text, "attn_logit_softcapping", None):  # PaliGemma 2's Gemma-2: transformers runs it eagerly only
            spec["attention"] = "eager"
            notes.append("attention: eager (Gemma-2 soft-caps its attention logits, which only transformers' eager "
                         "attention does)")
        return Imported(spec=spec, weights={"encoders.image.model": tower, "projectors.image": projector,
                                            "backbone.model": language}, notes=notes)
