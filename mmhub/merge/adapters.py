"""Merging LoRA adapters as adapters (``adapters: combine``): the merged slot keeps a LoRA adapter over the shared base.

Each model's adapter on a slot adds an update ``delta_i = scaling_i * B_i @ A_i`` to weights ``W0`` that all the
models share (checked). The slot's method merges the updates layer by layer exactly as it would merge the full
weights ``W0 + delta_i`` (linear, task arithmetic, TIES and DARE are all unchanged by adding the same ``W0`` to every
model; the base's own update, zero when it carries no adapter, plays the base), and the merged update is stored as a
new adapter of rank ``adapter_rank`` by truncated SVD, the way peft's ``add_weighted_adapter`` builds its ``svd``
combinations (`mmhub.adapter_rank.set_low_rank_update`). With the default rank, the sum of the merged adapters'
ranks, linear and task-arithmetic merges are exact (their update's rank is at most that sum); TIES and DARE updates
are full-rank and lose what the truncation drops (the energy kept is reported). SLERP interpolates the updates, not
the weights. The merged model stays small: saved, it holds the adapter, not the backbone.
"""

from __future__ import annotations

from typing import Any

import torch

from mmhub.adapter_rank import ADAPTER, set_low_rank_update
from mmhub.adapters import _target, named_lora_layers, slot_module
from mmhub.merge.methods import MergeMethod
from mmhub.merge.tensor_weights import WeightValue, positions, weight_for


def adapter_slots(models: dict[str, Any], names: list[str], slot: str) -> bool:
    """Whether any of the `names` models carries a LoRA adapter on `slot`."""
    return any(slot in models[n].spec.adapters for n in names)


def base_weights(module: Any) -> dict[str, torch.Tensor]:
    """A slot's own weights without its adapters, named as without them (peft moves ``x.weight`` to
    ``x.base_layer.weight``), so a model with an adapter compares with one without."""
    return {k.replace(".base_layer.", "."): v for k, v in module.state_dict().items() if "lora_" not in k}


def combine_problems(where: str, slot: str, models: dict[str, Any], names: list[str], base: str,
                     slot_maps: dict[str, dict[str, Any]]) -> list[str]:
    """What stops the `names` models' adapters on `slot` from being combined over `base`'s weights."""
    problems = []
    lacking = [n for n in names if slot not in models[n].spec.adapters]
    if lacking:
        problems.append(f"{where}: {lacking} carry no LoRA adapter on {slot} (adapters: combine merges adapters); "
                        "give only models with one, or use adapters: fold")
        return problems
    layer_names = {n: set(named_lora_layers(models[n], slot))
                   for n in [*names, base] if slot in models[n].spec.adapters}
    first = names[0]
    for n, found in layer_names.items():
        if found != layer_names[first]:
            odd = sorted(found ^ layer_names[first])[:3]
            problems.append(f"{where}: model {n}'s adapter targets other layers than {first}'s (e.g. {odd}); "
                            "combine adapters trained with the same target_modules, or use adapters: fold")
    want = base_weights(slot_maps[base][slot])
    for n in names:
        have = base_weights(slot_maps[n][slot])
        differ = [k for k, t in want.items()
                  if k not in have or have[k].shape != t.shape or not torch.equal(have[k], t)]
        if differ:
            problems.append(f"{where}: model {n}'s base weights differ from {base}'s in {len(differ)} tensor(s) "
                            f"(e.g. {differ[0]}); adapters combine only over the same base, use adapters: fold")
    return problems


@torch.no_grad()
def combine_adapters(slot: str, method: MergeMethod, weights: dict[str, WeightValue], models: dict[str, Any], base: str,
                     rank: int | None) -> dict[str, float]:
    """Merge the `weights` models' adapters on `slot` into `base`'s adapter (in place); returns the rank used and
    the update energy the truncation kept (worst layer, mean). A weight that varies over the slot's tensors is read
    at each adapted layer's weight (``NAME.weight``), as when the adapters are folded."""
    names = list(weights)
    rank = rank or sum(models[n].spec.adapters[slot].r for n in names)
    layers = {n: named_lora_layers(models[n], slot) for n in names}
    base_model = models[base]
    if slot not in base_model.spec.adapters:  # the base gets an adapter to hold the merged update
        from mmhub.adapters import inject_adapter

        inject_adapter(base_model, slot, models[names[0]].spec.adapters[slot])
    base_layers = named_lora_layers(base_model, slot)
    energies = []
    slot_mod = slot_module(base_model, slot)
    inner = next(n for n, m in slot_mod.named_modules() if m is _target(base_model, slot))  # "" or "model"
    where = positions(base_weights(slot_mod))  # the slot's tensor names, as a folded merge sees them
    for name, layer in base_layers.items():
        deltas = [layers[n][name].get_delta_weight(ADAPTER).to(torch.float64) for n in names]
        own = layer.get_delta_weight(ADAPTER).to(torch.float64)  # zero for an adapter injected just now
        key = f"{inner}.{name}.weight" if inner else f"{name}.weight"
        layer_no, pos = where.get(key, (None, 0.0))
        merged = method.merge(own if method.needs_base else None, deltas,
                              [weight_for(w, key, layer_no, pos) for w in weights.values()])
        energies.append(set_low_rank_update(layer, merged.to(torch.float32), rank))
    spec = base_model.spec.adapters[slot]
    base_model.spec.adapters[slot] = spec.model_copy(update={"r": rank, "alpha": float(rank)})
    return {"rank": rank, "energy_min": min(energies), "energy_mean": sum(energies) / len(energies)}
