"""The IDEFICS family importer: transformers ``idefics`` folders (open Flamingo) -> mmhub components.

IDEFICS is a CLIP-like vision tower -> a perceiver resampler -> a LLaMA whose blocks are preceded, every
``cross_layer_interval`` blocks starting at block 0, by tanh-gated cross-attention layers over the images, with
"decoupled" embeddings and LM head (``additional_vocab_size`` extra rows for ``<fake_token_around_image>`` and
``<image>``). In mmhub:

* the tower is ``hf_vision`` on a ``clip_vision_model`` config (``IdeficsVisionTransformer`` is CLIP's vision
  transformer; IDEFICS reads its last block's states with the CLS token and without the final LayerNorm:
  ``select_layer: -1, drop_cls: false``), preprocessing from the folder's image processor (resize to a square,
  CLIP mean/std);
* the resampler is ``perceiver`` with ``layout: idefics``;
* the gated layers are the ``gated_xattn`` injector with ``layout: idefics``, keys/values at the vision width
  (``kv_dim``), each image's marker in the text being the ``<image>`` token's own embedding (``marker_token``);
* the LM is ``hf_causal_lm`` on a ``llama`` config whose vocabulary is ``vocab_size + additional_vocab_size``:
  the decoupled tables are concatenated (base rows first), so every id keeps its row.

Which image a token attends to is the IDEFICS processor's ``image_attention_mask``: the latest image at or before
it (mmhub's ``media_index``), and none after an end-of-sequence token until the next image (``reset_token``);
tokens that attend to no image get a zero cross-attention output. `mmhub.importers.idefics_export` writes such a
model back as an ``idefics`` folder. The template ``idefics`` lays prompts out as the IDEFICS processor does
(``<s>``, then the text with each ``<image>`` as ``<fake_token_around_image><image><fake_token_around_image>``, the
pieces stripped of spaces at their ends), so ``"User:<image>Describe this image.\nAssistant:"`` gives the ids of
the processor's ``["User:", image, "Describe this image.\nAssistant:"]``; with ``template="plain"`` prompts are
taken verbatim.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from mmhub.errors import CheckpointError
from mmhub.export.image_processing import hf_vision_settings
from mmhub.importers.base import Checkpoint, Imported, Importer, ImportOptions

IMAGE_TOKEN = "<image>"
FAKE_TOKEN = "<fake_token_around_image>"
VISION_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
               "patch_size", "hidden_act", "layer_norm_eps", "num_channels")
# IDEFICS perceiver block tensors -> mmhub perceiver (layout idefics) layer tensors
PERCEIVER_NAMES = {"0.context_layer_norm": "ln_media", "0.latents_layer_norm": "ln_latents", "0.q_proj": "q",
                   "0.k_proj": "k", "0.v_proj": "v", "0.output_proj": "out", "0.q_layer_norm": "q_norm",
                   "0.k_layer_norm": "k_norm", "1.ln": "ffn.0", "1.fc": "ffn.1", "1.c_proj": "ffn.3"}
# IdeficsGatedCrossAttentionLayer tensors -> gated_xattn (layout idefics) layer tensors
GATED_NAMES = {"alpha_cross_attn": "attn_gate", "alpha_dense": "ff_gate", "input_layernorm.weight": "norm.weight",
               "post_attention_layernorm.weight": "ff_norm.weight", "cross_attn.q_proj.weight": "attn.q.weight",
               "cross_attn.k_proj.weight": "attn.k.weight", "cross_attn.v_proj.weight": "attn.v.weight",
               "cross_attn.o_proj.weight": "attn.out.weight", "cross_attn.q_layer_norm.weight": "attn.q_norm.weight",
               "cross_attn.k_layer_norm.weight": "attn.k_norm.weight", "mlp.gate_proj.weight": "ff_gate_proj.weight",
               "mlp.up_proj.weight": "ff_up.weight", "mlp.down_proj.weight": "ff_down.weight"}


def _rename(state: dict[str, torch.Tensor], names: dict[str, str], what: str) -> dict[str, torch.Tensor]:
    """``<i>.<name>`` keys -> ``<i>.<mmhub name>`` (longest IDEFICS name first); an unknown key is an error."""
    out = {}
    for key, value in state.items():
        index, _, rest = key.partition(".")
        hit = next((n for n in sorted(names, key=len, reverse=True) if rest == n or rest.startswith(n + ".")), None)
        if hit is None:
            raise CheckpointError(f"{what}: tensor {key!r} has no counterpart in mmhub's idefics layout")
        out[f"{index}.{names[hit]}{rest[len(hit):]}"] = value
    return out


def perceiver_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An ``IdeficsPerceiverResampler`` state dict -> mmhub ``perceiver`` (layout idefics) state dict."""
    blocks = {k[len("blocks."):]: v for k, v in state.items() if k.startswith("blocks.")}
    out = {f"layers.{k}": v for k, v in _rename(blocks, PERCEIVER_NAMES, "perceiver_resampler").items()}
    out["latents"] = state["latents"]
    out.update({f"norm.{k[len('layer_norm.'):]}": v for k, v in state.items() if k.startswith("layer_norm.")})
    return out


def gated_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``gated_cross_attn_layers`` tensors (keys ``<i>.<name>``) -> mmhub ``gated_xattn`` (layout idefics) state
    dict (rotary buffers are not persistent, so none are here)."""
    return {f"layers.{k}": v for k, v in _rename(state, GATED_NAMES, "gated_cross_attn_layers").items()}


def language_state(embed: torch.Tensor, embed_extra: torch.Tensor | None, head: torch.Tensor,
                   head_extra: torch.Tensor | None, body: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The decoupled embedding and head (base rows, additional rows) concatenated into a LlamaForCausalLM state."""
    return {**{f"model.{k}": v for k, v in body.items()}, "model.embed_tokens.weight": _rows(embed, embed_extra),
            "lm_head.weight": _rows(head, head_extra)}


def _rows(base: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
    return base if extra is None else torch.cat([base, extra], 0)


def vision_settings(vision: Any) -> dict[str, Any]:
    """An ``IdeficsVisionConfig`` as a ``clip_vision_model`` config dict (the same transformer)."""
    values = {k: getattr(vision, k) for k in VISION_KEYS if hasattr(vision, k)}
    values["hidden_size"] = vision.embed_dim
    return {"model_type": "clip_vision_model", **values}


def llama_settings(cfg: Any) -> dict[str, Any]:
    """The IDEFICS LM as a ``llama`` config dict (the decoupled tables as one vocabulary)."""
    rope = dict(cfg.rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
    return {"model_type": "llama", "vocab_size": cfg.vocab_size + cfg.additional_vocab_size,
            "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_attention_heads, "hidden_act": cfg.hidden_act,
            "rms_norm_eps": cfg.rms_norm_eps, "max_position_embeddings": cfg.max_position_embeddings,
            "rope_parameters": rope, "attention_bias": False, "mlp_bias": False,
            "tie_word_embeddings": bool(cfg.tie_word_embeddings), "pad_token_id": cfg.pad_token_id,
            "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}


def _check(cfg: Any, where: str) -> None:
    problems = []
    if not cfg.use_resampler:
        problems.append("use_resampler is false (the images' tower states go to the cross-attention directly; "
                        "mmhub imports the resampler variant, as published)")
    if cfg.num_hidden_layers % cfg.cross_layer_interval:
        problems.append(f"num_hidden_layers {cfg.num_hidden_layers} is not a multiple of cross_layer_interval "
                        f"{cfg.cross_layer_interval} (transformers itself fails on it)")
    if cfg.alpha_type not in ("float", "vector"):
        problems.append(f"alpha_type {cfg.alpha_type!r} (float or vector)")
    if cfg.hidden_size % cfg.num_attention_heads:
        problems.append(f"hidden_size {cfg.hidden_size} is not divisible by num_attention_heads "
                        f"{cfg.num_attention_heads}")
    if problems:
        raise CheckpointError(f"{where}: this IDEFICS checkpoint cannot be imported: " + "; ".join(problems))


class IdeficsImporter(Importer):
    """IDEFICS (HuggingFaceM4/idefics-9b, -80b and their instruct versions; open Flamingo)."""

    name: ClassVar[str] = "idefics"
    model_types: ClassVar[tuple[str, ...]] = ("idefics",)
    description: ClassVar[str] = ("IDEFICS (open Flamingo): CLIP tower -> perceiver (layout idefics) -> LLaMA with "
                                  "gated cross-attention (gated_xattn layout idefics), decoupled vocab concatenated")

    def convert(self, ckpt: Checkpoint, options: ImportOptions) -> Imported:
        cfg = ckpt.hf_config()
        where = str(ckpt.folder / "config.json")
        _check(cfg, where)
        vision, perceiver = cfg.vision_config, cfg.perceiver_config
        proc = ckpt.json("processor_config.json") or {}
        image_cfg = ckpt.json("preprocessor_config.json") or proc.get("image_processor")
        if not isinstance(image_cfg, dict):
            raise CheckpointError(f"{ckpt.folder}: no image processor config (preprocessor_config.json, or "
                                  f"image_processor in processor_config.json): the image preprocessing is unknown")
        prep = hf_vision_settings(image_cfg, f"{ckpt.folder}: image processor")
        tokenizer = ckpt.tokenizer()
        vocab = tokenizer.get_vocab()
        rows = cfg.vocab_size + cfg.additional_vocab_size
        for token in (IMAGE_TOKEN, FAKE_TOKEN):
            if token not in vocab or vocab[token] >= rows:
                raise CheckpointError(f"{ckpt.folder}: the tokenizer has {token} at id {vocab.get(token)}, not a row "
                                      f"of the {rows}-row embedding table (vocab_size {cfg.vocab_size} + "
                                      f"additional_vocab_size {cfg.additional_vocab_size})")
        p = "model."
        body = {f"layers.{k}": v for k, v in ckpt.take(p + "layers.").items()}
        body["norm.weight"] = ckpt.tensor(p + "norm.weight")
        extra = cfg.additional_vocab_size > 0
        language = language_state(
            ckpt.tensor(p + "embed_tokens.weight"),
            ckpt.tensor(p + "embed_tokens.additional_embedding.weight") if extra else None,
            ckpt.tensor("lm_head.weight") if ckpt.has("lm_head.weight") else ckpt.tensor(p + "embed_tokens.weight"),
            (ckpt.tensor("lm_head.additional_fc.weight") if ckpt.has("lm_head.additional_fc.weight")
             else ckpt.tensor(p + "embed_tokens.additional_embedding.weight")) if extra else None,
            body)
        tower = ckpt.take(p + "vision_model.")  # CLIPVisionModel keys: embeddings., pre_layrnorm., encoder., ...
        resampler = perceiver_state(ckpt.take(p + "perceiver_resampler."))
        gated = gated_state(ckpt.take(p + "gated_cross_attn_layers."))
        spec = {
            "name": ckpt.folder.name,
            "description": f"imported from the transformers IDEFICS folder {ckpt.folder}",
            "encoders": {"image": {"type": "hf_vision", "config": vision_settings(vision), "select_layer": -1,
                                   "drop_cls": False, "dtype": "float32", **prep}},
            "projectors": {"image": {"type": "perceiver", "layout": "idefics",
                                     "num_latents": perceiver.resampler_n_latents,
                                     "depth": perceiver.resampler_depth, "heads": perceiver.resampler_n_heads,
                                     "head_dim": perceiver.resampler_head_dim, "ff_mult": 4,
                                     "qk_norm": bool(perceiver.qk_layer_norms_perceiver)}},
            "backbone": {"type": "hf_causal_lm", "config": llama_settings(cfg), "tokenizer": str(ckpt.folder),
                         "dtype": options.dtype},
            "injectors": {"xattn": {"type": "gated_xattn", "layout": "idefics", "modalities": ["image"],
                                    "every": cfg.cross_layer_interval, "heads": cfg.num_attention_heads,
                                    "kv_dim": vision.embed_dim, "ff_dim": cfg.intermediate_size,
                                    "activation": cfg.hidden_act, "norm_eps": cfg.rms_norm_eps,
                                    "qk_norm": bool(cfg.qk_layer_norms), "gate": cfg.alpha_type,
                                    "marker_token": IMAGE_TOKEN, "reset_token": tokenizer.eos_token,
                                    "only_immediate": True}},
            "template": options.template or "idefics",
            "placeholders": {"image": IMAGE_TOKEN},
        }
        notes = [f"template {spec['template']}: write {IMAGE_TOKEN} where an image goes (IDEFICS's processor format "
                 f"{FAKE_TOKEN}{IMAGE_TOKEN}{FAKE_TOKEN} is what template idefics writes)"]
        return Imported(spec=spec, weights={"encoders.image.model": tower, "projectors.image": resampler,
                                            "injectors.xattn": gated, "backbone.model": language}, notes=notes)

    def export(self, model: Any, out: Path) -> Path:
        from mmhub.importers.idefics_export import export_idefics

        return export_idefics(model, out)
