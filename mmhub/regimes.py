"""Training regimes, read without touching the model: how a stage trains each component slot (frozen / full /
LoRA) and how many parameters that is. `mmhub.train.trainable` applies them.

A stage's ``train`` mapping names parts (``projectors``) or single slots
(``encoders.image``); the most specific key wins and anything unnamed is frozen.
LoRA parameter counts follow peft's matching rules (a target matches a module
whose name equals it or ends with ``.target``; ``all-linear`` means every
``nn.Linear`` except the output head), so they can be shown before any adapter
is injected.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import nn

from mmhub.spec import LoraSpec, Regime, StageSpec


def slots(model: Any) -> Iterator[tuple[str, nn.Module]]:
    """(slot path, module) for every component of an assembled model; a shared encoder is listed once."""
    seen: set[int] = set()
    signals = getattr(model, "signal_tokens", None)
    parts = [("encoders", model.encoders), ("projectors", model.projectors), ("backbone", {"": model.backbone}),
             ("injectors", getattr(model, "injectors", {})),
             ("signal_tokens", {"": signals} if signals is not None else {}),
             ("output_projectors", getattr(model, "output_projectors", {})),
             ("generators", getattr(model, "generators", {}))]
    for part, modules in parts:
        for m, mod in modules.items():
            if id(mod) in seen:
                continue
            seen.add(id(mod))
            yield (f"{part}.{m}" if m else part), mod


def regime_of(stage: StageSpec, slot: str) -> Regime:
    """The regime `stage` gives `slot` (``encoders.image`` beats ``encoders``; default frozen).

    The signal tokens' rows, unless named, train (in full) whenever the backbone trains in any
    way: a stage that tunes the LLM also tunes the tokens it emits."""
    if slot in stage.train:
        return stage.train[slot]
    if slot == "signal_tokens" and "signal_tokens" not in stage.train:
        return "full" if stage.train.get("backbone", "frozen") != "frozen" else "frozen"
    return stage.train.get(slot.split(".")[0], "frozen")


def lora_targets(module: nn.Module, lora: LoraSpec) -> list[tuple[str, nn.Linear]]:
    """The linear layers of `module` that peft would give adapters for these LoRA settings."""
    out_head = None
    get_out = getattr(getattr(module, "model", None), "get_output_embeddings", None)
    if callable(get_out):
        out_head = get_out()
    found = []
    for name, sub in module.named_modules():
        if not isinstance(sub, nn.Linear):
            continue
        if lora.target_modules == "all-linear":
            if sub is not out_head:
                found.append((name, sub))
        elif isinstance(lora.target_modules, str):
            import re

            if re.fullmatch(lora.target_modules, name):
                found.append((name, sub))
        elif any(name == t or name.endswith(f".{t}") for t in lora.target_modules):
            found.append((name, sub))
    return found


def trainable_count(module: nn.Module, regime: Regime) -> int:
    """Parameters that train under `regime` (LoRA: the adapter parameters it would add)."""
    if regime == "frozen":
        return 0
    if regime == "full":
        return sum(p.numel() for p in module.parameters())
    return sum(regime.lora.r * (lin.in_features + lin.out_features) for _, lin in lora_targets(module, regime.lora))


def stage_table(model: Any) -> list[dict[str, Any]]:
    """Per stage: the regime and trainable parameter count of every slot."""
    rows = []
    for st in model.spec.stages:
        parts = {}
        for path, mod in slots(model):
            regime = regime_of(st, path)
            label = regime if isinstance(regime, str) else f"lora(r={regime.lora.r})"
            parts[path] = {"regime": label, "trainable": trainable_count(mod, regime)}
        rows.append({"stage": st.name, "parts": parts, "trainable": sum(p["trainable"] for p in parts.values())})
    return rows
