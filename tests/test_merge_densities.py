"""Per-model densities for TIES and DARE (`density: {model: d}`): the same steps as peft's functions with each task
vector thinned to its own density; one density for all stays peft's function exactly; bad densities are named."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import mmhub
from mmhub.errors import MMHubError
from mmhub.merge import methods as M
from mmhub.merge.config import read_config
from mmhub.merge.run import merge

from conftest import saved_tiny


def _bound(cls: type[M.MergeMethod], models: list[str], **settings) -> M.MergeMethod:
    method = cls(cls.Settings(**settings))
    assert method.bind(models) == []
    return method


def _vectors(n: int = 3, size: int = 200, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(size, generator=g, dtype=torch.float64)
    return base, [base + torch.randn(size, generator=g, dtype=torch.float64) for _ in range(n)]


def test_one_density_per_model_all_equal_is_the_single_density() -> None:
    base, models = _vectors()
    names, w = ["a", "b", "c"], [1.0, 0.5, 2.0]
    for cls in (M.Ties, M.DareLinear, M.DareTies):
        torch.manual_seed(7)
        one = _bound(cls, names, density=0.4).merge(base, models, w)
        torch.manual_seed(7)
        each = _bound(cls, names, density=dict.fromkeys(names, 0.4)).merge(base, models, w)
        assert torch.equal(one, each), cls.name


def test_ties_with_per_model_densities_trims_each_vector_to_its_own_top_fraction() -> None:
    """a keeps all its entries (density 1), b its top 25% by magnitude; signs are elected on the trimmed vectors
    (sum) and each entry is the mean of the weighted entries that agree with the elected sign."""
    base, (xa, xb) = _vectors(2)
    da, db = xa - base, xb - base
    keep_b = db.abs() >= db.abs().kthvalue(151).values  # the top 50 of 200
    ta, tb = da, torch.where(keep_b, db, torch.zeros_like(db))
    elected = torch.where(ta + tb >= 0, 1.0, -1.0).double()
    agree = [(t.sign() == elected) for t in (ta, tb)]
    wa, wb = 1.0, 2.0
    total = wa * ta * agree[0] + wb * tb * agree[1]
    count = (agree[0].double() + agree[1].double()).clamp(min=1)
    want = base + total / count
    got = _bound(M.Ties, ["a", "b"], density={"a": 1.0, "b": 0.25}).merge(base, [xa, xb], [wa, wb])
    assert torch.allclose(got, want, atol=1e-12)
    assert int(keep_b.sum()) == 50


def test_dare_linear_with_per_model_densities_drops_and_rescales_each_vector_alone() -> None:
    base, (xa, xb) = _vectors(2, size=4000)
    torch.manual_seed(3)
    got = _bound(M.DareLinear, ["a", "b"], density={"a": 1.0, "b": 0.5}).merge(base, [xa, xb], [1.0, 1.0])
    rest = got - base - (xa - base)  # a is kept whole; what remains is b's thinned, rescaled vector
    db = xb - base
    kept = rest != 0
    assert torch.allclose(rest[kept], 2 * db[kept], atol=1e-12)  # survivors rescaled by 1 / 0.5
    assert 0.45 < float(kept.double().mean()) < 0.55


def test_the_weight_search_tries_per_model_densities_and_prints_them(tmp_path: Path, monkeypatch, capsys) -> None:
    from mmhub import cli
    from mmhub.merge import search as S

    base, a, b = saved_tiny(tmp_path / "base", 0), saved_tiny(tmp_path / "a", 1), saved_tiny(tmp_path / "b", 2)
    monkeypatch.setattr(S, "task_scorer", lambda search, registry=None: lambda model: {
        "accuracy": float(model.projectors["image"].state_dict()["net.0.weight"].abs().sum()), "per_type": {}, "n": 1})
    cfg = tmp_path / "s.yaml"
    cfg.write_text(yaml.safe_dump({"models": {"base": str(base), "a": str(a), "b": str(b)}, "base": "base",
                                   "slots": {"projectors.image": {"method": "ties"}},
                                   "search": {"weights": {"a": [1.0]}, "objective": "accuracy", "settings": {
                                       "density": [0.5, {"a": 1.0, "b": 0.2}]}}}))
    assert cli.main(["merge", str(cfg), "--out", str(tmp_path / "out")]) == 0
    said = capsys.readouterr().out
    assert "search: a=1, density=0.5: accuracy" in said and "search: a=1, density={a: 1, b: 0.2}: accuracy" in said



def test_densities_that_do_not_name_the_merged_models_or_leave_0_1_are_errors(tmp_path: Path) -> None:
    base, a, b = saved_tiny(tmp_path / "base", 0), saved_tiny(tmp_path / "a", 1), saved_tiny(tmp_path / "b", 2)
    models = {"base": str(base), "a": str(a), "b": str(b)}
    cfg = tmp_path / "m.yaml"
    cfg.write_text(yaml.safe_dump({"models": models, "base": "base", "slots": {
        "projectors.image": {"method": "ties", "weights": {"a": 1, "b": 1}, "density": {"a": 0.5, "c": 0.5}}}}))
    with pytest.raises(MMHubError) as exc:
        merge(read_config(cfg), tmp_path / "out")
    text = str(exc.value)
    assert "slots.projectors.image: ties: density is given per model" in text
    assert "missing: ['b'], not merged: ['c']" in text and not (tmp_path / "out").exists()
    cfg.write_text(yaml.safe_dump({"models": models, "base": "base", "slots": {
        "projectors.image": {"method": "dare_ties", "density": {"a": 0.5, "b": 0.0}}}}))
    with pytest.raises(MMHubError) as exc:
        merge(read_config(cfg), tmp_path / "out")
    assert "density must be in (0, 1], one number or one per merged model" in str(exc.value)
    cfg.write_text(yaml.safe_dump({"models": models, "base": "base", "slots": {
        "projectors.image": {"method": "ties", "density": {"a": 1.0, "b": 0.3}}}}))
    got = mmhub.load(merge(read_config(cfg), tmp_path / "out")).projectors["image"].state_dict()
    s0, sa = (mmhub.load(p).projectors["image"].state_dict() for p in (base, a))
    k = "net.0.weight"
    assert not torch.equal(got[k], s0[k]) and not torch.equal(got[k], sa[k])
