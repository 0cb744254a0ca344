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

import re
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


_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_index(name: str) -> int | None:
    """A module's layer: the first number in its path (``model.layers.3.mlp.up_proj`` -> 3); None when unnumbered."""
    found = _LAYER_INDEX.search(name)
    return int(found.group(1)) if found else None


def _output_heads(module: nn.Module) -> list[nn.Module]:
    """The output head(s) peft's ``all-linear`` leaves out: of the module itself or of the model it wraps."""
    heads = []
    for owner in (module, getattr(module, "model", None)):
        get_out = getattr(owner, "get_output_embeddings", None)
        head = get_out() if callable(get_out) else None
        if head is not None:
            heads.append(head)
    return heads


def lora_targets(module: nn.Module, lora: LoraSpec) -> list[tuple[str, nn.Linear]]:
    """The linear layers of `module` that get adapters for these LoRA settings (peft's matching rules, then the
    ``layers`` filter)."""
    heads = _output_heads(module)
    found = []
    for name, sub in module.named_modules():
        if not isinstance(sub, nn.Linear):
            continue
        if lora.layers is not None and layer_index(name) not in lora.layers:
            continue
        if lora.target_modules == "all-linear":
            if not any(sub is h for h in heads):
                found.append((name, sub))
        elif isinstance(lora.target_modules, str):
            if re.fullmatch(lora.target_modules, name):
                found.append((name, sub))
        elif any(name == t or name.endswith(f".{t}") for t in lora.target_modules):
            found.append((name, sub))
    return found


def layer_ranges(layers: list[int]) -> str:
    """Layer indices as runs: ``[0, 1, 2, 5]`` -> ``0-2,5``."""
    nums = sorted(set(layers))
    runs: list[str] = []
    start = prev = nums[0]
    for i in [*nums[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        runs.append(f"{start}-{prev}" if prev > start else f"{start}")
        if i is not None:
            start = prev = i
    return ",".join(runs)


def lora_label(lora: LoraSpec) -> str:
    """How a LoRA regime is shown in plans and logs: ``lora(r=8)``, ``lora(r=16, layers=0-14)``."""
    if lora.layers is None:
        return f"lora(r={lora.r})"
    return f"lora(r={lora.r}, layers={layer_ranges(lora.layers)})"


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
            label = regime if isinstance(regime, str) else lora_label(regime.lora)
            parts[path] = {"regime": label, "trainable": trainable_count(mod, regime)}
        rows.append({"stage": st.name, "parts": parts, "trainable": sum(p["trainable"] for p in parts.values())})
    return rows
