"""The PaliGemma family importer: transformers ``paligemma`` folders -> hf_vision (SigLIP) -> linear -> Gemma.

PaliGemma (1 and 2) is a SigLIP tower whose last hidden state (after its final LayerNorm, no attention-pooling head)
goes through one linear map to Gemma's width; the image tokens come first, then bos, the prompt and "\\n" (mmhub
template ``paligemma``), and the LLM reads that whole prefix bidirectionally while the answer (the suffix) is causal:
the backbone runs with ``prefix_lm: true``. How the pieces map:

* tower: ``hf_vision`` over the folder's vision config, ``select_layer: -1`` + ``final_norm`` (SigLIP's
  ``last_hidden_state``), the processor's resize and normalisation; its weights from ``vision_tower.``;
* projector: ``linear`` (with bias) from ``multi_modal_projector.linear``;
* LLM: ``hf_causal_lm`` over the text config, ``prefix_lm: true``, the head tied or from ``lm_head``.

Export writes such a model back as a transformers PaliGemma folder (config, safetensors, ``PaliGemmaProcessor`` with a
``SiglipImageProcessor`` doing the tower's resize and the tokenizer), refusing, by name, a part that PaliGemma has no
place for.

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

import copy
import shutil
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import torch

from mmhub.errors import CheckpointError, ExportError
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

    def export(self, model: Any, out: Path) -> Path:
        """`model` (SigLIP hf_vision at its last layer -> linear -> prefix-LM Gemma) as a transformers PaliGemma folder
        at `out`, written through a temporary folder beside it."""
        from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor

        from mmhub.export.image_processing import image_processor, read_transform

        tower, proj, lm = export_parts(model)
        text_cfg = lm.config.to_dict() | {"use_bidirectional_attention": None}  # PaliGemma sets it itself
        vision_cfg = tower.hf_config.to_dict() | {"vision_use_head": False}
        hidden = lm.config.hidden_size
        placeholder = model.spec.placeholder("image")
        config = PaliGemmaConfig(vision_config=vision_cfg, text_config=text_cfg, projection_dim=hidden,
                                 hidden_size=hidden, vocab_size=lm.config.vocab_size,
                                 tie_word_embeddings=bool(lm.config.tie_word_embeddings),
                                 image_token_index=model.tokenizer.convert_tokens_to_ids(placeholder))
        hf = PaliGemmaForConditionalGeneration(config).eval()
        load_exact(hf.model.vision_tower, tower.model.state_dict(), "vision tower")
        load_exact(hf.model.multi_modal_projector.linear, proj.proj.state_dict(), "projector")
        load_exact(hf.model.language_model, lm.base_model.state_dict(), "language model")
        if not lm.config.tie_word_embeddings:
            load_exact(hf.lm_head, lm.get_output_embeddings().state_dict(), "lm_head")
        prep = read_transform(tower.transform, "encoders.image")
        images = image_processor(prep, "siglip")
        images.image_seq_length = model.plan.tokens_per_item("image")
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            hf.save_pretrained(str(tmp))
            tokenizer = copy.deepcopy(model.tokenizer)  # the processor adds its tokens and switches bos off in place
            PaliGemmaProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(str(tmp))
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out


def export_parts(model: Any) -> tuple[Any, Any, Any]:
    """The tower, projector and transformers LM of a PaliGemma-shaped model; anything else names the blocking part."""
    enc, proj, backbone = model.spec.encoders.get("image"), model.spec.projectors.get("image"), model.spec.backbone
    problems = []
    if list(model.spec.encoders) != ["image"] or enc is None or enc.type != "hf_vision":
        problems.append(f"encoders {', '.join(model.spec.encoders) or '-'} (PaliGemma has one hf_vision image tower)")
    else:
        tower = model.encoders["image"]
        settings = tower.config
        if not tower.hf_config.model_type.startswith("siglip"):
            problems.append(f"encoders.image: a {tower.hf_config.model_type} tower (PaliGemma's is SigLIP)")
        if settings.select_layer not in (-1, tower.hf_config.num_hidden_layers) or not settings.final_norm:
            problems.append(f"encoders.image: select_layer {settings.select_layer}, final_norm {settings.final_norm} "
                            f"(PaliGemma reads the last layer after the final LayerNorm)")
    if proj is None or proj.type != "linear":
        problems.append(f"projectors.image: {proj.type if proj else 'none'} (PaliGemma's is one linear with bias)")
    elif not model.projectors["image"].config.bias:
        problems.append("projectors.image: linear without bias (PaliGemma's has one)")
    lm = model.backbone.language_model() if backbone.type == "hf_causal_lm" else None
    if lm is None or not lm.config.model_type.startswith("gemma"):
        problems.append(f"backbone: {backbone.type} {getattr(getattr(lm, 'config', None), 'model_type', '')} "
                        f"(PaliGemma's LLM is Gemma or Gemma-2, hf_causal_lm)")
    elif not model.backbone.prefix_lm:
        problems.append("backbone: prefix_lm false (PaliGemma reads the prompt bidirectionally)")
    if model.spec.template != "paligemma":
        problems.append(f"template {model.spec.template!r} (PaliGemma's processor lays out images, bos, prompt, "
                        f"newline: template paligemma)")
    if len(model.injectors) or len(model.generators):
        problems.append("injectors or generators (PaliGemma has neither)")
    if problems:
        raise ExportError("this model cannot be written as a transformers PaliGemma: " + "; ".join(problems))
    return model.encoders["image"], model.projectors["image"], lm


def load_exact(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Copy `state` into `module` strictly (tied parameters count as loaded)."""
    from mmhub.importers.run import load_strict

    load_strict(module, {k: v.detach().to(torch.float32) for k, v in state.items()}, f"PaliGemma export: {what}")
