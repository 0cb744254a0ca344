"""The backbone's weight layout (mmhub.layout, spec `weight_layout`): which weights lie column-major, and that only
strides change: same values, outputs, greedy tokens, training step, saved files and load."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from mmhub import MMModel, build
from mmhub.layout import is_column_major, set_decode_layout, set_row_layout, wide_linear_weights

from conftest import TINY_LLAMA


def spec(**extra: Any) -> dict[str, Any]:
    llama = {**TINY_LLAMA, "vocab_size": 400}  # LM head 400 x 48 (wide), MLP 96 x 48 (wide), k/v 24 x 48 (narrow)
    return copy.deepcopy({"name": "test-layout",
                          "backbone": {"type": "hf_causal_lm", "config": llama, "tokenizer": "byte"},
                          "template": "chatml", **extra})


def linears(model: MMModel) -> dict[str, torch.Tensor]:
    return {n: m.weight for n, m in model.backbone.named_modules() if isinstance(m, torch.nn.Linear)}


def test_wide_weights_lie_column_major_and_narrow_ones_row_major() -> None:
    model = build(spec())
    ws = linears(model)
    assert ws and {n for n, w in ws.items() if is_column_major(w)} == {
        n for n, w in ws.items() if w.shape[0] >= w.shape[1]}
    assert any(n.endswith("lm_head") for n, w in ws.items() if is_column_major(w))
    assert all(w.is_contiguous() for n, w in ws.items() if n.endswith(("k_proj", "v_proj", "down_proj")))
    row = build(spec(weight_layout="row"))
    assert not any(is_column_major(w) for w in linears(row).values())
    a, b = model.state_dict(), row.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same seed, same values
    n_col = sum(is_column_major(w) for w in ws.values())
    assert set_row_layout(model.backbone) == n_col > 0
    assert not any(is_column_major(w) for w in linears(model).values())
    assert set_decode_layout(model.backbone) == set_row_layout(model.backbone)


def test_a_tied_lm_head_keeps_the_embedding_table_row_major() -> None:
    model = build(spec(backbone={"type": "hf_causal_lm", "tokenizer": "byte",
                                 "config": {**TINY_LLAMA, "vocab_size": 400, "tie_word_embeddings": True}}))
    hf = model.backbone.model
    assert hf.get_output_embeddings().weight is hf.get_input_embeddings().weight
    assert hf.get_input_embeddings().weight.is_contiguous()
    assert all(w is not hf.get_input_embeddings().weight for w in wide_linear_weights(model.backbone))
    assert is_column_major(hf.model.layers[0].mlp.up_proj.weight)  # the rest still moves


def test_outputs_greedy_tokens_and_a_training_step_match_the_row_layout() -> None:
    col, row = build(spec()), build(spec(weight_layout="row"))
    ids = torch.tensor([[1, 72, 101, 108, 108, 111, 2, 33], [1, 87, 104, 97, 116, 63, 44, 32]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        torch.testing.assert_close(col(ids, mask).logits, row(ids, mask).logits, atol=1e-5, rtol=1e-5)
    assert col.generate_ids(ids, mask, max_new_tokens=12, do_sample=False) == \
        row.generate_ids(ids, mask, max_new_tokens=12, do_sample=False)
    for m in (col, row):
        m.requires_grad_(True).train()
        # plain SGD: the step is the gradient itself, so the two layouts' float summation orders stay at rounding
        # size (Adam's first step divides by |g| and turns a rounding difference of a near-zero gradient into ~lr)
        opt = torch.optim.SGD(m.parameters(), lr=1e-1)
        m(ids, mask, labels=ids).loss.backward()
        opt.step()
        assert all(p.grad is None or p.grad.stride() == p.stride() for p in m.parameters())  # grads follow the layout
    a, b = col.state_dict(), row.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=lambda msg, k=k: f"{k}: {msg}")
    assert any(is_column_major(w) for w in linears(col).values())  # the step kept the layout


def test_save_writes_the_same_tensors_and_load_restores_the_layout(tmp_path: Path) -> None:
    model = build(spec())
    for w in model.backbone.parameters():
        w.data.add_(0.01)  # trained-looking weights that no seed reproduces
    model.save_pretrained(tmp_path / "col", full=True)
    row = build(spec(weight_layout="row"))
    row.load_state_dict(model.state_dict())
    row.save_pretrained(tmp_path / "row", full=True)
    a = load_file(str(tmp_path / "col" / "model.safetensors"))
    b = load_file(str(tmp_path / "row" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    back = MMModel.from_pretrained(tmp_path / "col")
    assert {n for n, w in linears(back).items() if is_column_major(w)} == \
        {n for n, w in linears(model).items() if is_column_major(w)}
    want = model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in back.state_dict().items())
