"""Mixture-of-experts load balancing: which backbones route tokens, and the router loss they train with.

Mixtral, Qwen2-MoE and the other transformers MoE models route each token to ``num_experts_per_tok`` of
``num_local_experts`` / ``num_experts`` experts and are trained with the Switch Transformer auxiliary loss
(Fedus et al. 2021, eqs. 4-6, with top-k routing as Mixtral uses it)::

    loss = N * sum_i f_i * P_i

over all layers' routed tokens, where f_i is the fraction of tokens whose top-k choices include expert i and P_i
the mean router probability of expert i; it is smallest when the experts share the load evenly. It enters the
training loss times ``router_aux_loss_coef`` (the model config's, unless the backbone setting overrides it), as
transformers' ``*ForCausalLM`` add it when asked for router logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


@dataclass(frozen=True)
class Routing:
    """How a MoE backbone routes: experts per layer, experts per token, and the router loss's coefficient."""

    num_experts: int
    top_k: int
    coef: float


def routing_of(cfg: Any, coef: float | None = None) -> Routing | None:
    """The routing of a transformers text config, or None for a dense model (no experts or no router loss).
    `coef` overrides the config's ``router_aux_loss_coef``."""
    experts = next((getattr(cfg, k) for k in EXPERT_COUNT_KEYS if getattr(cfg, k, None)), None)
    top_k = getattr(cfg, "num_experts_per_tok", None)
    if not experts or not top_k or not hasattr(cfg, "router_aux_loss_coef"):
        return None
    return Routing(int(experts), int(top_k), float(cfg.router_aux_loss_coef if coef is None else coef))


def real_positions(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The (B, L) padding mask as 0/1 weights, or None for a (B, 1, L, L) mask or none (packed or prefix-LM rows),
    whose padding cannot be told apart: every position of those rows then counts."""
    return attention_mask if attention_mask is not None and attention_mask.ndim == 2 else None


def load_balancing_loss(router_logits: Sequence[torch.Tensor], num_experts: int, top_k: int,
                        real: torch.Tensor | None = None) -> torch.Tensor:
    """Switch Transformer balance loss over every layer's (B*L, num_experts) router logits; `real` (B, L) weights
    the positions (0 = padding, left out)."""
    if not router_logits:
        raise ValueError("load_balancing_loss: no router logits (the backbone returned none; is it a MoE model?)")
    device = router_logits[0].device
    weight = None if real is None else real.reshape(-1, 1).to(device=device, dtype=torch.float32)
    chosen_sum = torch.zeros(num_experts, device=device)
    prob_sum = torch.zeros(num_experts, device=device)
    rows = torch.zeros((), device=device)
    for logits in router_logits:
        probs = logits.to(device).float().softmax(dim=-1)  # (B*L, N)
        if weight is not None and weight.shape[0] != probs.shape[0]:
            raise ValueError(f"load_balancing_loss: {probs.shape[0]} routed tokens per layer but a padding mask of "
                             f"{weight.shape[0]} positions; pass the (B, L) mask of the same forward")
        chosen = torch.zeros_like(probs).scatter_(1, probs.topk(top_k, dim=-1).indices, 1.0)  # (B*L, N) 0/1
        w = torch.ones_like(probs[:, :1]) if weight is None else weight
        chosen_sum = chosen_sum + (chosen * w).sum(0)
        prob_sum = prob_sum + (probs * w).sum(0)
        rows = rows + w.sum()
    return num_experts * torch.sum((chosen_sum / rows) * (prob_sum / rows))
