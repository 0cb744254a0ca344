"""LoRA adapters on component slots, through peft: inject, find, merge.

A stage with ``backbone: {lora: {...}}`` injects peft LoRA layers into the slot's
module in place (``peft.inject_adapter_in_model``: no wrapper model, so mmhub's
own slots and hooks keep working); the spec then records the adapter under
``adapters`` so a saved model re-injects it before its weights load. For the
backbone the target is the transformers model (peft's ``all-linear`` rule
excludes its LM head); for other slots the targets are matched by mmhub's
`mmhub.regimes.lora_targets`, which follows peft's rules. `merge_adapters` folds
the adapters into the base weights (for export), after which the slot counts
as trained and is saved in full; `merged_copy` does so on a copy, leaving the
model as it was.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from mmhub.errors import MMHubError
from mmhub.spec import LoraSpec


def slot_module(model: Any, slot: str) -> nn.Module:
    """The module of a slot path (``backbone``, ``encoders.image``, ``projectors.audio``, ``injectors.x``)."""
    head, _, name = slot.partition(".")
    if head == "backbone":
        return model.backbone
    table = getattr(model, head, None)
    if table is None or name not in table:
        raise MMHubError(f"no slot {slot!r} in this model")
    return table[name]


def _target(model: Any, slot: str) -> nn.Module:
    mod = slot_module(model, slot)
    return mod.model if slot == "backbone" and hasattr(mod, "model") else mod


def lora_config(lora: LoraSpec, module: nn.Module, slot: str) -> Any:
    from peft import LoraConfig

    from mmhub.regimes import lora_targets

    targets: Any = lora.target_modules
    if lora.layers is not None or slot != "backbone" or not hasattr(module, "get_output_embeddings"):
        names = [n for n, _ in lora_targets(module, lora)]
        if not names:
            raise MMHubError(f"LoRA on {slot}: no linear layer matches target_modules {lora.target_modules!r}"
                             + (f" in layers {lora.layers}" if lora.layers is not None else ""))
        if lora.layers is not None:
            _check_layers(module, lora, slot, names)
        targets = names
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets)


def _check_layers(module: nn.Module, lora: LoraSpec, slot: str, names: list[str]) -> None:
    """Every layer `lora.layers` names must hold a target; the error gives the layers there are."""
    from mmhub.regimes import layer_index, lora_targets

    assert lora.layers is not None
    hit = {layer_index(n) for n in names}
    missing = [i for i in lora.layers if i not in hit]
    if missing:
        every = lora_targets(module, lora.model_copy(update={"layers": None}))
        there = sorted({i for n, _ in every if (i := layer_index(n)) is not None})
        span = f"layers {there[0]}..{there[-1]}" if there else "no numbered layers"
        raise MMHubError(f"LoRA on {slot}: layers {missing} hold no linear layer matching target_modules "
                         f"{lora.target_modules!r} (the slot has {span}); list layers that exist")


def has_adapter(model: Any, slot: str) -> bool:
    return any(isinstance(m, _lora_layer_type()) for m in _target(model, slot).modules())


def _lora_layer_type() -> type:
    from peft.tuners.lora import LoraLayer

    return LoraLayer


def inject_adapter(model: Any, slot: str, lora: LoraSpec) -> int:
    """Add LoRA layers to `slot` (once); records it in the spec. Returns the number of adapter parameters."""
    from peft import inject_adapter_in_model

    target = _target(model, slot)
    if not has_adapter(model, slot):
        import zlib

        import torch

        # seeded by (spec seed, slot): every process and every resumed run starts from the same adapter weights
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(model.spec.seed * 7919 + zlib.crc32(slot.encode()))
            inject_adapter_in_model(lora_config(lora, target, slot), target, adapter_name="default")
        model.spec.adapters[slot] = lora
    elif model.spec.adapters.get(slot) not in (None, lora):
        raise MMHubError(f"{slot} already carries a LoRA adapter {model.spec.adapters[slot]}; a stage asks for {lora}. "
                         "Use the same LoRA settings in every stage, or merge the adapter first.")
    return sum(p.numel() for n, p in target.named_parameters() if "lora_" in n)


def named_lora_layers(model: Any, slot: str) -> dict[str, nn.Module]:
    """The peft LoRA layers injected into `slot`, by their module path inside the slot's target."""
    kind = _lora_layer_type()
    return {name: m for name, m in _target(model, slot).named_modules() if isinstance(m, kind)}


def lora_layers(model: Any, slot: str) -> list[nn.Module]:
    """The peft LoRA layers injected into `slot`."""
    return list(named_lora_layers(model, slot).values())


def adapter_parameters(model: Any, slot: str) -> list[nn.Parameter]:
    return [p for n, p in _target(model, slot).named_parameters() if "lora_" in n]


def merge_adapters(model: Any) -> list[str]:
    """Fold every LoRA adapter into its base weights and remove the LoRA layers; returns the merged slots."""
    merged = []
    for slot in list(model.spec.adapters):
        target = _target(model, slot)
        if getattr(slot_module(model, slot).config, "quantize", None):
            raise MMHubError(f"{slot} is quantized (4-bit): its LoRA adapter cannot be merged into 4-bit weights; "
                             "keep the adapter, or load the base in full precision to merge")
        for parent in list(target.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, _lora_layer_type()):
                    child.merge()
                    setattr(parent, name, child.get_base_layer())
        del model.spec.adapters[slot]
        if slot not in model.spec.trained:
            model.spec.trained.append(slot)
        merged.append(slot)
    return merged


def merged_copy(model: Any) -> Any:
    """A copy of `model` with every LoRA adapter merged (`merge_adapters`); `model` keeps its adapters. The copy shares
    the build context (it holds the registry, which cannot be copied) and doubles the parameter memory meanwhile."""
    import copy

    twin = copy.deepcopy(model, memo={id(model.plan.ctx): model.plan.ctx})
    merge_adapters(twin)
    return twin
