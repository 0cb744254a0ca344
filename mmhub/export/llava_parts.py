"""Which mmhub models are LLaVA-shaped, and their parts: the check behind the transformers LLaVA export.

transformers' ``LlavaForConditionalGeneration`` is a CLIP or SigLIP vision tower read at one
hidden layer (dropping the CLS token or not), a projector ``linear_1 -> activation ->
linear_2`` over every token, and a decoder-only language model whose input embeddings
take the projected tokens in place of the image token. An mmhub model expresses that
exactly when it has one ``image`` modality with an ``hf_vision`` encoder (CLIP/SigLIP,
no ``final_norm``) or an ``open_clip`` ViT encoder (converted to CLIP, see
`mmhub.export.vision_towers`), an ``mlp`` projector of depth <= 2 whose activation transformers
has (gelu, relu, silu, tanh) or a ``linear`` one (written with the identity activation
and an identity ``linear_2``), an unquantized ``hf_causal_lm`` backbone made of a base
model and a bias-free ``lm_head``, and nothing else (no other modality, injector,
output projector or generator). `check_llava` raises an `ExportError` naming every
component slot and type that stands in the way, and why; `llava_parts` returns the parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from mmhub.errors import ExportError

FAMILIES = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "silu": "silu", "tanh": "tanh"}  # mmhub mlp -> transformers ACT2FN
IDENTITY = "linear"  # ACT2FN's identity


@dataclass(frozen=True)
class LlavaParts:
    """The components of a LLaVA-shaped model and how each maps onto transformers' LLaVA."""

    encoder: nn.Module
    encoder_type: str  # hf_vision | open_clip
    projector: nn.Module
    backbone: nn.Module
    family: str  # clip | siglip
    feature_strategy: str  # LLaVA's vision_feature_select_strategy: default (drop CLS) | full
    feature_layer: int
    activation: str  # LLaVA's projector_hidden_act
    linears: tuple[nn.Linear, nn.Linear | None]  # linear_1, linear_2 (None: the identity, for a linear projector)
    image_tokens: int
    placeholder: str
    placeholder_id: int


def _type(model: Any, kind: str, slot: str) -> str:
    table = model.plan.backbone if kind == "backbone" else getattr(model.plan, kind).get(slot)
    return table.info.name if table is not None else "?"


def _encoder_problems(model: Any) -> list[str]:
    problems = []
    spec = model.spec
    for m in spec.encoders:
        if m != "image":
            kind = _type(model, "encoders", m) if m in model.plan.encoders else spec.encoders[m]
            problems.append(f"encoders.{m} ({kind}): LLaVA reads images only; this model also takes {m} items "
                            f"(fix: export an image-only model)")
    if "image" not in spec.encoders:
        problems.append("encoders: the model has no image encoder; LLaVA needs encoders.image (hf_vision or open_clip)")
        return problems
    kind = _type(model, "encoders", "image")
    if kind == "open_clip":
        from mmhub.export.vision_towers import open_clip_problems

        return problems + open_clip_problems(model.encoders["image"])
    if kind != "hf_vision":
        problems.append(f"encoders.image ({kind}): LLaVA's vision tower is a transformers CLIP or SigLIP vision model; "
                        f"{kind} towers are not converted (fix: use an hf_vision or open_clip ViT encoder)")
        return problems
    enc = model.encoders["image"]
    mt = enc.hf_config.model_type
    if mt not in FAMILIES:
        problems.append(f"encoders.image (hf_vision, model_type {mt}): LLaVA export takes clip_vision_model or "
                        f"siglip_vision_model towers, whose prefix tokens LLaVA's feature selection knows")
    if enc.config.final_norm:
        problems.append("encoders.image (hf_vision): final_norm: true applies the tower's final LayerNorm to the "
                        "selected layer, which LLaVA never does (fix: final_norm: false)")
    return problems


def _projector_problems(model: Any, hidden: int) -> list[str]:
    if "image" not in model.plan.projectors:
        return []
    kind = _type(model, "projectors", "image")
    cfg = model.projectors["image"].config
    where = f"projectors.image ({kind})"
    if kind == "linear":
        return []
    if kind != "mlp":
        return [f"{where}: LLaVA's projector is linear_1 -> activation -> linear_2 on each token; a {kind} projector "
                f"is not (fix: use mlp with depth 2, or linear)"]
    problems = []
    if cfg.depth > 2:
        problems.append(f"{where}: depth {cfg.depth} > 2; LLaVA's projector has 2 linear layers (fix: depth: 2)")
    if cfg.activation not in ACTIVATIONS:
        problems.append(f"{where}: activation {cfg.activation} has no transformers counterpart (fix: gelu)")
    if cfg.depth == 2 and (cfg.hidden_dim or cfg.out_dim) != hidden:
        problems.append(f"{where}: hidden_dim {cfg.hidden_dim} != the LM hidden size {hidden}; LLaVA's linear_1 "
                        f"outputs the LM width (fix: leave hidden_dim out)")
    return problems


def _backbone_problems(model: Any) -> list[str]:
    kind = _type(model, "backbone", "")
    if kind != "hf_causal_lm":
        why = "an encoder-decoder LM" if model.is_encoder_decoder else f"a {kind} backbone"
        return [f"backbone ({kind}): LLaVA's language model is a transformers decoder-only causal LM (hf_causal_lm), "
                f"not {why}"]
    problems = []
    if model.backbone.config.quantize:
        problems.append(f"backbone (hf_causal_lm): quantize: {model.backbone.config.quantize}; 4-bit weights are not "
                        f"exported (fix: build the backbone without quantize, merging any LoRA into full weights)")
        return problems
    lm = model.backbone.language_model()
    text = lm.config.get_text_config()
    head = lm.get_output_embeddings()
    from transformers import AutoModel

    try:
        base_cls = AutoModel._model_mapping[type(text)]
    except KeyError:
        base_cls = None
    if base_cls is None or type(lm.base_model) is not base_cls:
        problems.append(f"backbone (hf_causal_lm, model_type {text.model_type}): its base model "
                        f"{type(lm.base_model).__name__} is not the AutoModel LLaVA builds for this config")
    if not isinstance(head, nn.Linear) or head.bias is not None or getattr(lm, "lm_head", None) is not head:
        problems.append(f"backbone (hf_causal_lm, model_type {text.model_type}): its output layer is not a bias-free "
                        f"Linear lm_head, as LLaVA's is")
    if getattr(text, "final_logit_softcapping", None):
        problems.append(f"backbone (hf_causal_lm, model_type {text.model_type}): final_logit_softcapping "
                        f"{text.final_logit_softcapping} is applied by the causal LM's own head, which LLaVA replaces")
    return problems


def check_llava(model: Any) -> None:
    """Raise an ExportError listing every slot (and type) that keeps `model` from being a transformers LLaVA."""
    problems = (_encoder_problems(model) + _projector_problems(model, model.plan.backbone_facts.hidden_size)
                + _backbone_problems(model))
    spec = model.spec
    for part in ("injectors", "output_projectors", "generators"):
        for name, cs in getattr(spec, part).items():
            problems.append(f"{part}.{name} ({cs.type}): LLaVA has no counterpart for it "
                            "(fix: export a model without it)")
    if problems:
        raise ExportError(f"cannot export {spec.name!r} as a transformers LLaVA model: " + "; ".join(problems))


def llava_parts(model: Any, allow_adapters: bool = False) -> LlavaParts:
    """The LLaVA mapping of `model` (whose LoRA adapters, if any, are merged: `allow_adapters` only to plan an
    export, never to read tensors), or the ExportError of `check_llava`."""
    check_llava(model)
    spec = model.spec
    if spec.adapters and not allow_adapters:
        raise ExportError(f"{', '.join(spec.adapters)} still carry LoRA adapters; merge them first "
                          f"(mmhub.adapters.merge_adapters)")
    enc, proj = model.encoders["image"], model.projectors["image"]
    encoder_type = _type(model, "encoders", "image")
    family = FAMILIES[enc.hf_config.model_type] if encoder_type == "hf_vision" else "clip"  # open_clip ViT -> CLIP
    # CLIP has one CLS token (LLaVA's "default" drops it); SigLIP has none, so drop_cls changes nothing there
    strategy = "default" if family == "clip" and enc.config.drop_cls else "full"
    if _type(model, "projectors", "image") == "linear":
        activation, linears = IDENTITY, (proj.proj, None)
    else:
        layers = [m for m in proj.net if isinstance(m, nn.Linear)]
        activation = ACTIVATIONS[proj.config.activation] if len(layers) == 2 else IDENTITY
        linears = (layers[0], layers[1] if len(layers) == 2 else None)
    placeholder = spec.placeholder("image")
    return LlavaParts(encoder=enc, encoder_type=encoder_type, projector=proj, backbone=model.backbone, family=family,
                      feature_strategy=strategy,
                      feature_layer=enc.config.select_layer, activation=activation, linears=linears,
                      image_tokens=model.plan.tokens_per_item("image"), placeholder=placeholder,
                      placeholder_id=model.processor.placeholder_ids["image"])
