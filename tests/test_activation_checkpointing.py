"""Activation checkpointing per block (`runtime.activation_checkpointing`): same loss and gradients, packed rows
included, with far fewer activations kept; off without gradients; names, copies and refusals."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from test_packing import encode_all, spec

from mmhub import build
from mmhub.activation_checkpointing import is_checkpointed, uncheckpoint_blocks
from mmhub.errors import SpecError
from mmhub.packing import collate_packed, pack, spliced_length

from conftest import TINY_LLAMA

LLAMA = {**TINY_LLAMA, "num_hidden_layers": 3}


def _model(checkpointing: bool, train_backbone: bool = True):
    torch.manual_seed(0)
    model = build(spec(LLAMA, runtime={"activation_checkpointing": checkpointing}))
    model.requires_grad_(False)
    model.projectors.requires_grad_(True)
    model.backbone.requires_grad_(train_backbone)
    return model.eval()


def _saved_bytes_and_grads(model, batch: dict[str, Any]) -> tuple[int, torch.Tensor, dict[str, torch.Tensor]]:
    """Bytes of the tensors autograd keeps for the backward pass during the forward, the loss, and the gradients."""
    kept: list[int] = []

    def pack_hook(t: torch.Tensor) -> torch.Tensor:
        kept.append(t.numel() * t.element_size())
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        out = model(**batch)
    out.loss.backward()
    return sum(kept), out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                          if p.grad is not None}


def _batches(model) -> dict[str, dict[str, Any]]:
    enc = encode_all(model)
    tokens_of = spliced_length(model)
    rows = pack(enc, 2 * max(tokens_of(e) for e in enc), tokens_of)
    assert any(len(r) > 1 for r in rows)
    return {"padded": model.processor.collate(enc), "packed": collate_packed(model.processor, enc, rows)}


@pytest.mark.parametrize("train_backbone", [True, False], ids=["llm-trained", "llm-frozen"])
def test_checkpointed_blocks_give_the_same_gradients_with_fewer_activations_kept(train_backbone: bool) -> None:
    """Padded and packed batches (the packed segments are re-entered for the recomputation): loss and every gradient
    equal, and the activations kept for the backward pass at most half; a frozen language model in eval mode (an
    alignment stage) is checkpointed too, since the projector's gradient still runs through its blocks."""
    plain, ckpt = _model(False, train_backbone), _model(True, train_backbone)
    assert all(is_checkpointed(b) for b in ckpt.backbone.checkpoint_blocks())
    assert len(ckpt.backbone.checkpoint_blocks()) == LLAMA["num_hidden_layers"]
    for kind, batch in _batches(plain).items():
        kept_p, loss_p, grads_p = _saved_bytes_and_grads(plain, batch)
        kept_c, loss_c, grads_c = _saved_bytes_and_grads(ckpt, batch)
        torch.testing.assert_close(loss_c, loss_p, atol=1e-6, rtol=0)
        assert grads_c.keys() == grads_p.keys() and any(n.startswith("backbone.") for n in grads_p) == train_backbone
        for name in grads_p:
            torch.testing.assert_close(grads_c[name], grads_p[name], atol=1e-5, rtol=1e-4,
                                       msg=lambda m, name=name, kind=kind: f"{kind} {name}: {m}")
        assert kept_c < 0.5 * kept_p, (kind, kept_c, kept_p)


def test_without_gradients_blocks_run_as_before_and_names_copies_survive() -> None:
    """Generation and no-grad forwards keep nothing and give the same logits; the state dict's names are unchanged;
    a deep copy stays checkpointed (its own blocks); undoing restores the original classes."""
    plain, ckpt = _model(False), _model(True)
    assert list(plain.state_dict()) == list(ckpt.state_dict())
    batch = _batches(plain)["padded"]
    with torch.no_grad():
        torch.testing.assert_close(ckpt(**batch).logits, plain(**batch).logits)
    twin = copy.deepcopy(ckpt.backbone)
    blocks = twin.checkpoint_blocks()
    assert all(is_checkpointed(b) for b in blocks)
    assert not any(b is o for b, o in zip(blocks, ckpt.backbone.checkpoint_blocks(), strict=True))
    uncheckpoint_blocks(blocks)
    assert not any(is_checkpointed(b) for b in blocks)
    assert type(blocks[0]) is type(plain.backbone.checkpoint_blocks()[0])


def test_a_backbone_without_blocks_is_refused_at_the_option(monkeypatch) -> None:
    from mmhub.backbones.hf_causal_lm import HFCausalLM

    monkeypatch.setattr(HFCausalLM, "checkpoint_blocks", lambda self: [])
    with pytest.raises(SpecError, match=r"runtime.activation_checkpointing.*offers no blocks to checkpoint"):
        build(spec(LLAMA, runtime={"activation_checkpointing": True}))


@pytest.mark.slow
def test_compiled_blocks_compute_what_eager_blocks_compute() -> None:
    """`runtime.compile`: each block compiled (inductor on CPU); loss, gradients (padded and packed rows) and greedy
    generation equal the eager model's."""
    torch.manual_seed(0)
    eager = build(spec(LLAMA))
    torch.manual_seed(0)
    compiled = build(spec(LLAMA, runtime={"compile": True}))
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in compiled.backbone.checkpoint_blocks())
    for m in (eager, compiled):
        m.requires_grad_(False)
        m.projectors.requires_grad_(True)
        m.backbone.requires_grad_(True)
    for kind, batch in _batches(eager).items():
        _, loss_e, grads_e = _saved_bytes_and_grads(eager, batch)
        _, loss_c, grads_c = _saved_bytes_and_grads(compiled, batch)
        torch.testing.assert_close(loss_c, loss_e, atol=1e-5, rtol=1e-5)
        for name in grads_e:
            torch.testing.assert_close(grads_c[name], grads_e[name], atol=1e-4, rtol=1e-3,
                                       msg=lambda m, name=name, kind=kind: f"{kind} {name}: {m}")
    with torch.no_grad():
        a = eager.eval().generate(["Say something", "More"], max_new_tokens=6)
        b = compiled.eval().generate(["Say something", "More"], max_new_tokens=6)
    assert [r.text for r in a] == [r.text for r in b] and any(r.text for r in a)


def test_compile_and_checkpointing_together_are_refused() -> None:
    with pytest.raises(SpecError, match=r"runtime: compile and activation_checkpointing are not supported together"):
        build(spec(LLAMA, runtime={"compile": True, "activation_checkpointing": True}))
