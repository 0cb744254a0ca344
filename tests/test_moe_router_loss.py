"""Mixture-of-experts backbones (Mixtral, Qwen2-MoE) train with their load-balancing loss.

The training loss equals transformers' own ``*ForCausalLM`` loss with router logits requested (cross-entropy +
``router_aux_loss_coef`` x the Switch Transformer balance loss); the coefficient comes from the model config or the
backbone's ``router_aux_loss_coef``; the loss shows in the step metrics; and a few hundred steps with it leave the
experts more evenly used than the same steps without it.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

from mmhub import build

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "helpers"))
import train_script  # noqa: E402

SIZE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 256}
MOE = {"mixtral": {"model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2},
       "qwen2_moe": {"model_type": "qwen2_moe", "num_experts": 4, "num_experts_per_tok": 2,
                     "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32}}
CONVERSATIONS = [[{"role": "user", "content": "Which colour is the sky?"}, {"role": "assistant", "content": "Blue."}],
                 [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, how can I help?"}]]


def _moe_spec(tiny_spec: dict, family: str, **backbone) -> dict:
    spec = copy.deepcopy(tiny_spec)
    spec["backbone"] = {"type": "hf_causal_lm", "tokenizer": "byte", "config": {**SIZE, **MOE[family]}, **backbone}
    return spec


def _reference(model, batch) -> object:
    """transformers' own causal-LM forward with router logits: loss = CE + coef x aux_loss."""
    hf = model.backbone.model
    return hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
              output_router_logits=True, use_cache=False)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_moe_training_loss_is_transformers_loss_with_the_router_term(tiny_spec, family):
    model = build(_moe_spec(tiny_spec, family)).train()
    model.backbone.requires_grad_(True)
    b = model.batch(CONVERSATIONS)  # two rows of different lengths: the padding is masked out of the balance loss
    assert b["attention_mask"].min() == 0
    out = model(b["input_ids"], b["attention_mask"], b["labels"])
    ref = _reference(model, b)
    coef = model.backbone.model.config.router_aux_loss_coef
    assert coef == 0.001  # the config's own default
    assert out.router_loss is not None and float(ref.aux_loss.detach()) > 0
    torch.testing.assert_close(out.router_loss, coef * ref.aux_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    out.loss.backward()  # the router learns from it
    gate = next(p for n, p in model.backbone.named_parameters() if n.endswith("gate.weight"))
    assert gate.grad is not None and gate.grad.abs().sum() > 0


def test_moe_router_coefficient_is_overridable_and_absent_outside_training(tiny_spec):
    model = build(_moe_spec(tiny_spec, "mixtral", router_aux_loss_coef=0.5)).train()
    b = model.batch(CONVERSATIONS)
    out = model(b["input_ids"], b["attention_mask"], b["labels"])
    ref = _reference(model, b)
    torch.testing.assert_close(out.router_loss, 0.5 * ref.aux_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.loss - out.router_loss, ref.loss - 0.001 * ref.aux_loss, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # evaluation: the cross-entropy alone
        plain = model.eval()(b["input_ids"], b["attention_mask"], b["labels"])
    assert plain.router_loss is None
    torch.testing.assert_close(plain.loss, out.loss - out.router_loss, rtol=1e-5, atol=1e-6)
    off = build(_moe_spec(tiny_spec, "mixtral", router_aux_loss_coef=0.0)).train()
    assert off(b["input_ids"], b["attention_mask"], b["labels"]).router_loss is None
    dense = build(tiny_spec).train()  # a dense backbone has no router
    assert dense(b["input_ids"], b["attention_mask"], b["labels"]).router_loss is None


def test_moe_router_loss_is_in_the_step_metrics(tmp_path):
    from mmhub.train.run import train

    spec = train_script.spec(4)
    spec["backbone"]["config"] = {**SIZE, **MOE["mixtral"], "initializer_range": 0.02}
    spec["stages"] = [{"name": "moe", "lr": 1e-3, "batch_size": 4, "max_steps": 2, "log_every": 1,
                       "train": {"projectors": "full", "backbone": "full"}}]
    train(spec, out=tmp_path / "run", datasets={"moe": train_script.dataset(8)}, progress_bar=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "moe" / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    assert len(steps) == 2 and all(0 < x["router_loss"] < x["loss"] for x in steps)


def _expert_cv(model, ids: torch.Tensor) -> float:
    """Coefficient of variation (std / mean) of the tokens routed to each expert, all layers, top-k choices."""
    hf = model.backbone.model
    with torch.no_grad():
        logits = hf.base_model(input_ids=ids, output_router_logits=True, use_cache=False).router_logits
    k, n = hf.config.num_experts_per_tok, hf.config.num_local_experts
    counts = torch.stack([torch.bincount(g.topk(k, dim=-1).indices.flatten(), minlength=n) for g in logits]).float()
    return float((counts.std(dim=1) / counts.mean(dim=1)).mean())


def _runs(n: int, g: torch.Generator) -> torch.Tensor:
    """(n, 32) rows of consecutive byte ids from random starts (each token predicts the next): a task whose hidden
    states differ from token to token, so a router can spread them over experts."""
    start = torch.randint(3, 250, (n, 1), generator=g)
    return 3 + (start - 3 + torch.arange(32)) % 247


def _lopsided(hf) -> None:
    """Start from a collapsed router: every token embedding shares one direction, and each layer's expert 0 reads
    it (its router row gains the mean router input, scaled to add about 3 to expert 0's logit)."""
    emb = hf.get_input_embeddings().weight
    u = torch.randn(emb.shape[1], generator=torch.Generator().manual_seed(7))
    emb += u / u.norm() * emb.norm(dim=1).mean() * 2
    seen = {}
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, a[0].mean(0)))
             for i, layer in enumerate(hf.model.layers)]
    hf.base_model(input_ids=_runs(16, torch.Generator().manual_seed(5)))
    for h in hooks:
        h.remove()
    for i, layer in enumerate(hf.model.layers):
        layer.mlp.gate.weight[0] += 3 * seen[i] / seen[i].square().sum()


def _train(tiny_spec: dict, coef: float, steps: int) -> tuple[float, float]:
    """Expert-load CV before and after `steps` Adam steps of the whole backbone with router loss weight `coef`."""
    torch.manual_seed(0)
    model = build(_moe_spec(tiny_spec, "mixtral", router_aux_loss_coef=coef)).train()
    model.backbone.requires_grad_(True)
    with torch.no_grad():
        _lopsided(model.backbone.model)
    g = torch.Generator().manual_seed(1)
    data, held_out = _runs(steps * 8, g).view(steps, 8, 32), _runs(16, g)
    before = _expert_cv(model, held_out)
    opt = torch.optim.Adam(model.backbone.parameters(), lr=3e-3)
    for ids in data:
        out = model(ids, torch.ones_like(ids), ids, return_logits=False)
        assert (out.router_loss is not None) == (coef > 0)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return before, _expert_cv(model, held_out)


@pytest.mark.slow
def test_moe_router_loss_evens_expert_usage(tiny_spec):
    (start, with_loss), (_, without) = _train(tiny_spec, 0.05, 300), _train(tiny_spec, 0.0, 300)
    print(f"expert-load CV: start {start:.3f}; after 300 steps with router loss {with_loss:.3f}, without {without:.3f}")
    assert start > 0.6 and without > 0.4  # lopsided at the start, and still without the router loss
    assert with_loss < 0.5 * without and with_loss < 0.2


def test_router_coefficient_on_a_dense_backbone_is_refused(tiny_spec):
    from mmhub.errors import SpecError

    spec = copy.deepcopy(tiny_spec)
    spec["backbone"]["router_aux_loss_coef"] = 0.01
    with pytest.raises(SpecError, match=r"router_aux_loss_coef: the llama model routes no tokens to experts"):
        build(spec)
