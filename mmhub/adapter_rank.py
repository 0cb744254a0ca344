"""Shrinking a model's LoRA adapters to a lower rank by truncated SVD of each update, in place.

Each LoRA layer adds ``delta = scaling * B @ A`` to its base weight (peft's `get_delta_weight`). The best rank-``k``
approximation of ``delta`` in Frobenius norm is its truncated SVD (Eckart-Young), ``U_k S_k V_k^T``; the layer is
given ``B' = U_k S_k^(1/2)``, ``A' = S_k^(1/2) V_k^T`` and scaling 1 (``lora_alpha = r = k``: the convention of
peft's ``add_weighted_adapter(combination_type="svd")``), and the spec's adapter record follows, so the saved
folder re-injects adapters of the new rank. The report gives, per slot, the share of each update's energy
(``sum S_k^2 / sum S^2``) kept: the worst layer and the mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmhub.adapters import lora_layers
from mmhub.errors import MMHubError

ADAPTER = "default"  # the adapter name mmhub injects under


@dataclass(frozen=True)
class RankReport:
    """What one slot's truncation kept."""

    slot: str
    layers: int
    rank_before: int
    rank_after: int
    energy_min: float
    energy_mean: float
    params_before: int
    params_after: int


def set_low_rank_update(layer: Any, delta: torch.Tensor, rank: int) -> float:
    """Give `layer` a LoRA pair of rank `rank` (scaling 1) whose update is the truncated SVD of `delta`
    (``out x in``); returns the share of the update's energy kept."""
    a_old, b_old = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
    with torch.no_grad():
        u, s, vh = torch.linalg.svd(delta.to(torch.float32), full_matrices=False)
        k = min(rank, s.numel())
        total = float((s ** 2).sum())
        kept = float((s[:k] ** 2).sum()) / total if total > 0 else 1.0
        root = s[:k].sqrt()
        new_a = nn.Linear(delta.shape[1], rank, bias=False, dtype=a_old.weight.dtype)
        new_b = nn.Linear(rank, delta.shape[0], bias=False, dtype=b_old.weight.dtype)
        new_a.weight.zero_()
        new_b.weight.zero_()
        new_a.weight[:k] = root[:, None] * vh[:k]
        new_b.weight[:, :k] = u[:, :k] * root[None, :]
    new_a.weight.requires_grad_(a_old.weight.requires_grad)
    new_b.weight.requires_grad_(b_old.weight.requires_grad)
    layer.lora_A[ADAPTER], layer.lora_B[ADAPTER] = new_a, new_b
    layer.r[ADAPTER], layer.lora_alpha[ADAPTER], layer.scaling[ADAPTER] = rank, rank, 1.0
    return kept


def _truncate(layer: Any, rank: int) -> tuple[float, int, int]:
    """Replace `layer`'s LoRA pair by the rank-`rank` SVD truncation of its update.
    Returns (energy kept, parameters before, parameters after)."""
    before = layer.lora_A[ADAPTER].weight.numel() + layer.lora_B[ADAPTER].weight.numel()
    with torch.no_grad():
        delta = layer.get_delta_weight(ADAPTER)
    kept = set_low_rank_update(layer, delta, rank)
    return kept, before, layer.lora_A[ADAPTER].weight.numel() + layer.lora_B[ADAPTER].weight.numel()


def reduce_adapter_rank(model: Any, rank: int, slots: list[str] | None = None) -> list[RankReport]:
    """Truncate the LoRA adapters of `slots` (default: every adapter the model carries) to `rank`, in place."""
    if not model.spec.adapters:
        raise MMHubError("the model carries no LoRA adapter: there is no rank to reduce (drop --lora-rank)")
    chosen = list(model.spec.adapters) if slots is None else slots
    unknown = [s for s in chosen if s not in model.spec.adapters]
    if unknown:
        raise MMHubError(f"no LoRA adapter on {unknown}; the model carries adapters on {sorted(model.spec.adapters)}")
    too_high = {s: model.spec.adapters[s].r for s in chosen if not 1 <= rank <= model.spec.adapters[s].r}
    if too_high:
        raise MMHubError(f"rank {rank} must be between 1 and the adapters' rank ({too_high}); a higher rank stores "
                         "more numbers for the same update")
    reports = []
    for slot in chosen:
        spec = model.spec.adapters[slot]
        layers = lora_layers(model, slot)
        if any(getattr(m, "use_dora", {}).get(ADAPTER) for m in layers):
            raise MMHubError(f"{slot}: DoRA adapters keep a magnitude vector per layer; truncating their rank is "
                             "not supported, merge them instead")
        stats = [_truncate(m, rank) for m in layers]
        model.spec.adapters[slot] = spec.model_copy(update={"r": rank, "alpha": float(rank)})
        energy = [e for e, _, _ in stats]
        reports.append(RankReport(slot=slot, layers=len(layers), rank_before=spec.r, rank_after=rank,
                                  energy_min=min(energy), energy_mean=sum(energy) / len(energy),
                                  params_before=sum(b for _, b, _ in stats), params_after=sum(a for _, _, a in stats)))
    return reports
