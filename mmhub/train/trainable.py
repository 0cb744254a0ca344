"""Applying a stage to a model: its ``train`` mapping (`mmhub.regimes`) becomes requires_grad flags, LoRA adapters
and the optimizer's parameter groups.

``full`` makes a slot's parameters trainable (and marks the slot as trained, so it
is saved in full); ``{lora: ...}`` injects a peft LoRA adapter (once; later stages
reuse it) and trains only the adapter; anything unnamed stays frozen. Parameter
groups give projectors and injectors the stage's ``lr`` and the backbone
``backbone_lr`` (default ``lr``), and exempt biases and norms from weight decay.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from mmhub.adapters import adapter_parameters, inject_adapter
from mmhub.errors import MMHubError
from mmhub.regimes import lora_label, regime_of, slots
from mmhub.spec import LoraRegime, StageSpec


@dataclass
class StagePlan:
    """What a stage trains: slot -> regime label and trainable parameter count."""

    regimes: dict[str, str] = field(default_factory=dict)
    trainable: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.trainable.values())

    def frozen_encoders(self) -> list[str]:
        return [s.split(".", 1)[1] for s, r in self.regimes.items() if s.startswith("encoders.") and r == "frozen"]


def apply_stage(model: Any, stage: StageSpec) -> StagePlan:
    """Set requires_grad for `stage` (injecting LoRA adapters where asked); returns what trains."""
    model.requires_grad_(False)
    plan = StagePlan()
    for path, module in slots(model):
        regime = regime_of(stage, path)
        if regime == "full":
            if getattr(getattr(module, "config", None), "quantize", None):
                raise MMHubError(f"stage {stage.name!r}: {path} is quantized (4-bit) and cannot be trained in full; "
                                 "use {lora: {...}} (QLoRA)")
            module.requires_grad_(True)
            for n, p in module.named_parameters():
                if "lora_" in n:  # an adapter from an earlier stage stays as it is while its base trains
                    p.requires_grad_(False)
            if module.has_weight_source() and path not in model.spec.trained:
                model.spec.trained.append(path)
            plan.regimes[path] = "full"
        elif isinstance(regime, LoraRegime):
            inject_adapter(model, path, regime.lora)
            for p in adapter_parameters(model, path):
                p.requires_grad_(True)
            plan.regimes[path] = lora_label(regime.lora)
        else:
            plan.regimes[path] = "frozen"
        plan.trainable[path] = sum(p.numel() for p in module.parameters() if p.requires_grad)
    if plan.total == 0:
        raise MMHubError(f"stage {stage.name!r} trains nothing: every slot is frozen. "
                         "Set e.g. train: {projectors: full}")
    return plan


def _no_decay(name: str, p: nn.Parameter) -> bool:
    return p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias")


def param_groups(model: Any, stage: StageSpec) -> list[dict[str, Any]]:
    """AdamW groups: (backbone | the rest) x (decay | no decay), each with its learning rate."""
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for path, module in slots(model):
        side = "backbone" if path == "backbone" else "other"
        for n, p in module.named_parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                groups.setdefault((side, _no_decay(n, p)), []).append(p)
    out = []
    for (side, no_decay), params in sorted(groups.items()):
        lr = stage.backbone_lr if (side == "backbone" and stage.backbone_lr) else stage.lr
        out.append({"params": params, "lr": lr, "weight_decay": 0.0 if no_decay else stage.weight_decay,
                    "name": f"{side}{'.no_decay' if no_decay else ''}"})
    return out
