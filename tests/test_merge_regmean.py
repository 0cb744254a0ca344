"""RegMean (`mmhub.merge.methods.RegMean`, `mmhub.merge.inputs`): the closed form against the paper's least-squares
objective, the input Gram matrices a model's own data gives, and `mmhub merge` with an ``inputs:`` section."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import mmhub
from mmhub.errors import MMHubError
from mmhub.merge import methods as M
from mmhub.merge.config import read_config
from mmhub.merge.inputs import ModelInputs, gram_matrices
from mmhub.merge.run import merge

from conftest import saved_tiny


def _regmean(alpha: float) -> M.RegMean:
    return M.RegMean(M.RegMean.Settings(alpha=alpha))


def test_regmean_solves_the_papers_least_squares_and_alpha_0_is_the_per_feature_mean() -> None:
    """alpha 1: the merged W minimises sum_i ||X_i Wᵀ - X_i W_iᵀ||² (numpy's lstsq on the stacked rows); alpha 0: each
    input feature's column is the mean of the models' columns weighted by that feature's energy in each model's data."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(40, 6, generator=g, dtype=torch.float64) * torch.tensor([1, 2, 0.5, 1, 3, 1.0]),
          torch.randn(25, 6, generator=g, dtype=torch.float64)]
    ws = [torch.randn(4, 6, generator=g, dtype=torch.float64) for _ in xs]
    grams = [x.T @ x for x in xs]
    got = _regmean(1.0).merge_inputs(None, ws, [1.0, 1.0], grams)
    a = np.concatenate([x.numpy() for x in xs])
    b = np.concatenate([(x @ w.T).numpy() for x, w in zip(xs, ws, strict=True)])
    want = np.linalg.lstsq(a, b, rcond=None)[0].T
    assert np.allclose(got.numpy(), want, atol=1e-9)
    got0 = _regmean(0.0).merge_inputs(None, ws, [1.0, 2.0], grams)
    e = [torch.diagonal(gr) for gr in grams]
    want0 = (e[0] * ws[0] + 2 * e[1] * ws[1]) / (e[0] + 2 * e[1])
    assert torch.allclose(got0, want0, atol=1e-10)
    assert torch.allclose(_regmean(0.9).merge_inputs(None, [ws[0], ws[0]], [1.0, 1.0], grams), ws[0], atol=1e-10)
    # a feature no model's data moved: least squares still returns a finite answer
    grams[0][:, 2] = grams[0][2, :] = 0
    grams[1][:, 2] = grams[1][2, :] = 0
    assert torch.isfinite(_regmean(1.0).merge_inputs(None, ws, [1.0, 1.0], grams)).all()
    # tensors that are no linear layer's weight: the weighted mean
    assert torch.allclose(_regmean(0.9).merge(None, [ws[0], ws[1]], [1.0, 3.0]), (ws[0] + 3 * ws[1]) / 4)


def _data(tmp_path: Path, name: str, colours: list[tuple[int, int, int]], answer: str) -> dict:
    folder = tmp_path / name
    folder.mkdir()
    rows = []
    for i, c in enumerate(colours):
        Image.new("RGB", (32, 32), c).save(folder / f"{i}.png")
        rows.append({"id": f"{name}{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": f"{answer} {i}"}]})
    (folder / "data.json").write_text(json.dumps(rows))
    return {"type": "llava_json", "path": str(folder / "data.json")}



def test_gram_matrices_are_the_mean_input_outer_product_of_each_linear_layer(tmp_path: Path) -> None:
    """Every untied linear layer of the slot gets the mean x xᵀ of its inputs over the tokens of the samples (checked
    on q_proj against inputs captured separately); a head tied to the embeddings gets none."""
    model = mmhub.load(saved_tiny(tmp_path / "m", 0, llm={"tie_word_embeddings": True})).eval()
    data = _data(tmp_path, "d", [(255, 0, 0), (0, 200, 30), (10, 10, 250)], "thing")
    grams = gram_matrices(model, model.backbone, ModelInputs(data=data, limit=2), "inputs.m")
    q = next(k for k in grams if k.endswith("layers.0.self_attn.q_proj.weight"))
    assert not any(k.endswith("lm_head.weight") for k in grams)
    assert any(k.endswith("mlp.down_proj.weight") for k in grams)
    seen: list[torch.Tensor] = []
    module = model.backbone.get_submodule(q[: -len(".weight")])
    handle = module.register_forward_hook(lambda m, args, out: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    from mmhub.data import load_dataset

    ds = load_dataset(data)
    with torch.no_grad():
        for i in range(2):
            batch = model.processor.collate([model.processor.encode(ds[i].messages, ds[i].media)])
            model(batch["input_ids"], batch["attention_mask"], media=batch["media"], return_logits=False)
    handle.remove()
    x = torch.cat(seen).double()
    assert torch.allclose(grams[q], x.T @ x / x.shape[0], atol=1e-8)


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_regmean_merge_zeroes_the_objectives_gradient_on_each_models_data(tmp_path: Path) -> None:
    """`mmhub merge` with regmean and each model's data: every merged linear weight W satisfies
    sum_i w_i (W - W_i) G_i = 0 (the least squares' normal equations, alpha 1) for the Gram matrices of each model's
    own data, and differs from the plain mean; norms are the weighted mean."""
    a, b = saved_tiny(tmp_path / "a", 0), saved_tiny(tmp_path / "b", 1)
    da = _data(tmp_path, "da", [(255, 0, 0), (250, 40, 40), (200, 0, 10)], "red")
    db = _data(tmp_path, "db", [(0, 0, 255), (30, 30, 240), (0, 80, 200), (10, 10, 10)], "blue")
    cfg = _write(tmp_path, {"models": {"a": str(a), "b": str(b)}, "base": "a",
                            "slots": {"backbone": {"method": "regmean", "alpha": 1.0, "weights": {"a": 1, "b": 2}}},
                            "inputs": {"a": {"data": da, "limit": 3}, "b": {"data": db, "limit": 4}}})
    got = mmhub.load(merge(read_config(cfg), tmp_path / "merged")).backbone.state_dict()
    ma, mb = mmhub.load(a).eval(), mmhub.load(b).eval()
    ga = gram_matrices(ma, ma.backbone, ModelInputs(data=da, limit=3), "a")
    gb = gram_matrices(mb, mb.backbone, ModelInputs(data=db, limit=4), "b")
    sa, sb = ma.backbone.state_dict(), mb.backbone.state_dict()
    assert len(ga) >= 14
    for k in ga:
        w = got[k].double()
        residual = (w - sa[k].double()) @ ga[k] + 2 * (w - sb[k].double()) @ gb[k]
        assert residual.abs().max() < 1e-4 * (1 + w.abs().max()), k
        assert not torch.allclose(w, (sa[k].double() + 2 * sb[k].double()) / 3, atol=1e-4), k
    norm = next(k for k in got if k.endswith("input_layernorm.weight"))
    assert torch.allclose(got[norm], (sa[norm] + 2 * sb[norm]) / 3, atol=1e-6)


def test_regmean_without_a_models_data_stops_before_any_weight_is_read(tmp_path: Path) -> None:
    a, b = saved_tiny(tmp_path / "a", 0), saved_tiny(tmp_path / "b", 1)
    cfg = _write(tmp_path, {"models": {"a": str(a), "b": str(b)}, "base": "a",
                            "slots": {"backbone": {"method": "regmean"}},
                            "inputs": {"a": {"data": {"type": "llava_json", "path": "x.json"}}}})
    with pytest.raises(MMHubError) as exc:
        merge(read_config(cfg), tmp_path / "merged")
    assert "slots.backbone: regmean needs each merged model's own data; add inputs.b:" in str(exc.value)
    assert "before loading any weights" in str(exc.value)
    assert not (tmp_path / "merged").exists()
    cfg = _write(tmp_path, {"models": {"a": str(a), "b": str(b)}, "base": "a",
                            "slots": {"backbone": {"method": "regmean"}},
                            "inputs": {n: {"data": {"type": "llava_json", "path": str(tmp_path / "none.json")}}
                                       for n in ("a", "b")}})
    with pytest.raises(MMHubError) as exc:
        merge(read_config(cfg), tmp_path / "merged")
    assert str(exc.value).startswith("inputs.a.data: ") and "none.json" in str(exc.value)
    assert not (tmp_path / "merged").exists()
