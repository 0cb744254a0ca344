"""Merge weights that vary over a slot's tensors (`mmhub.merge.tensor_weights`): gradients over the layers and rules
by name part and layers, folded and combined alike, validated, searched."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import mmhub
from mmhub.errors import MMHubError
from mmhub.merge.config import read_config
from mmhub.merge.run import merge
from mmhub.merge.tensor_weights import gradient_at, positions

from conftest import lora_model, saved_tiny


def test_layer_runs_read_as_the_layers_they_name() -> None:
    from mmhub.merge.tensor_weights import WeightRule

    assert WeightRule(value=1.0, layers="0-3,7, 9-10").layers == [0, 1, 2, 3, 7, 9, 10]
    assert WeightRule(value=1.0, layers="5").layers == [5]


def test_a_gradient_interpolates_its_anchors_spread_over_the_layers() -> None:
    for anchors in ([1.0, 0.0], [0.0, 1.0, 0.25], [2.0, -1.0, 0.5, 3.0], [0.7]):
        xs = np.linspace(0, 1, len(anchors)) if len(anchors) > 1 else np.array([0.0])
        for p in (0.0, 0.1, 0.25, 0.5, 0.6, 0.99, 1.0):
            want = np.interp(p, xs, anchors) if len(anchors) > 1 else anchors[0]
            assert gradient_at(anchors, p) == pytest.approx(want), (anchors, p)
    keys = ["embed.weight", "layers.10.q.weight", "layers.12.q.weight", "layers.11.q.weight", "norm.weight", "head"]
    got = positions(keys)
    assert got["embed.weight"] == (None, 0.0) and got["norm.weight"] == (None, 1.0) and got["head"] == (None, 1.0)
    assert got["layers.10.q.weight"] == (10, 0.0) and got["layers.11.q.weight"] == (11, 0.5)
    assert got["layers.12.q.weight"] == (12, 1.0)



def _write(tmp_path: Path, data: dict, name: str = "merge.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _layer(key: str) -> int | None:
    found = re.search(r"layers\.(\d+)\.", key)
    return int(found.group(1)) if found else None


def test_each_backbone_tensor_gets_its_gradient_or_rule_weight(tmp_path: Path) -> None:
    """Task arithmetic over a 2-layer backbone: b's gradient [0.25, 1] gives layer 0 (and the embeddings before it)
    0.25 and layer 1 (and the norm and head after) 1; c's rules give layer 1's MLP 2, all of layer 0 0.5, the rest 0."""
    base, b, c = saved_tiny(tmp_path / "base", 0), saved_tiny(tmp_path / "b", 1), saved_tiny(tmp_path / "c", 2)
    rules = [{"filter": "mlp", "layers": "1", "value": 2.0}, {"layers": [0], "value": 0.5}, {"value": 0.0}]
    cfg = _write(tmp_path, {"models": {"base": str(base), "b": str(b), "c": str(c)}, "base": "base", "slots": {
        "backbone": {"method": "task_arithmetic", "weights": {"b": [0.25, 1.0], "c": rules}}}})
    got = mmhub.load(merge(read_config(cfg), tmp_path / "merged")).backbone.state_dict()
    s0, sb, sc = (mmhub.load(p).backbone.state_dict() for p in (base, b, c))
    seen = {"embed": 0, "layer0": 0, "layer1_mlp": 0, "layer1_attn": 0, "after": 0}
    for key, v in got.items():
        if not v.is_floating_point():
            continue
        layer = _layer(key)
        if layer is None:
            part = "embed" if "embed_tokens" in key else "after"
            wb, wc = (0.25, 0.0) if part == "embed" else (1.0, 0.0)
        elif layer == 0:
            part, wb, wc = "layer0", 0.25, 0.5
        else:
            part = "layer1_mlp" if ".mlp." in key else "layer1_attn"
            wb, wc = 1.0, (2.0 if part == "layer1_mlp" else 0.0)
        seen[part] += 1
        x0, xb, xc = s0[key].double(), sb[key].double(), sc[key].double()
        want = x0 + wb * (xb - x0) + wc * (xc - x0)
        assert torch.allclose(v.double(), want, atol=1e-5), key
    assert all(seen.values()), seen  # every kind of tensor was checked


def test_a_single_default_rule_merges_exactly_as_the_number(tmp_path: Path) -> None:
    base, b = saved_tiny(tmp_path / "base", 0), saved_tiny(tmp_path / "b", 1)
    outs = []
    for name, w in (("num", 0.7), ("rule", [{"value": 0.7}]), ("flat", [0.7, 0.7])):
        cfg = _write(tmp_path, {"models": {"base": str(base), "b": str(b)}, "base": "base",
                                "slots": {"backbone": {"method": "task_arithmetic", "weights": {"b": w}}}})
        outs.append(mmhub.load(merge(read_config(cfg), tmp_path / name)).backbone.state_dict())
    for k, v in outs[0].items():
        assert torch.equal(v, outs[1][k]) and torch.equal(v, outs[2][k]), k


def test_combined_adapters_take_per_tensor_weights_as_folded_ones_do(tmp_path: Path) -> None:
    """``adapters: combine`` reads a weight at each adapted layer's ``.weight`` name: the combined adapter computes
    what the folded merge with the same gradient and rules computes (and layer 1 is not layer 0's weighting)."""
    from mmhub.adapters import merge_adapters

    plain = saved_tiny(tmp_path / "plain", 0)
    a, b = tmp_path / "a", tmp_path / "b"
    lora_model(2, 1).save_pretrained(a)
    lora_model(4, 2).save_pretrained(b)
    slots = {"backbone": {"method": "task_arithmetic", "weights": {
        "a": [{"filter": "q_proj", "layers": [0], "value": 1.0}, {"value": 0.0}], "b": [0.5, 1.5]}}}
    models = {"base": str(plain), "a": str(a), "b": str(b)}
    effective = []
    for mode in ("fold", "combine"):
        cfg = _write(tmp_path, {"models": models, "base": "base", "adapters": mode, "slots": slots}, f"{mode}.yaml")
        m = mmhub.load(merge(read_config(cfg), tmp_path / mode))
        assert bool(m.spec.adapters) == (mode == "combine")
        merge_adapters(m)
        effective.append(m.backbone.state_dict())
    fa, fb = mmhub.load(a), mmhub.load(b)
    merge_adapters(fa), merge_adapters(fb)
    sa, sb, s0 = fa.backbone.state_dict(), fb.backbone.state_dict(), mmhub.load(plain).backbone.state_dict()
    for k, v in effective[0].items():
        if v.is_floating_point():
            assert torch.allclose(v, effective[1][k], atol=1e-5), k
    q0 = next(k for k in s0 if "layers.0." in k and k.endswith("q_proj.weight"))
    q1, v1 = q0.replace("layers.0.", "layers.1."), q0.replace("layers.0.", "layers.1.").replace("q_proj", "v_proj")
    assert torch.allclose(effective[1][q0], s0[q0] + (sa[q0] - s0[q0]) + 0.5 * (sb[q0] - s0[q0]), atol=1e-5)
    assert torch.allclose(effective[1][q1], s0[q1] + 1.5 * (sb[q1] - s0[q1]), atol=1e-5)
    assert torch.allclose(effective[1][v1], s0[v1] + 1.5 * (sb[v1] - s0[v1]), atol=1e-5)


def test_rules_that_leave_a_tensor_uncovered_stop_the_merge_before_anything_is_written(tmp_path: Path) -> None:
    base, b = saved_tiny(tmp_path / "base", 0), saved_tiny(tmp_path / "b", 1)
    cfg = _write(tmp_path, {"models": {"base": str(base), "b": str(b)}, "base": "base", "slots": {
        "backbone": {"method": "task_arithmetic", "weights": {"b": [{"layers": [0, 1], "value": 1.0}]}}}})
    with pytest.raises(MMHubError) as exc:
        merge(read_config(cfg), tmp_path / "merged")
    text = str(exc.value)
    assert "slots.backbone.weights.b: no rule covers tensor" in text and "embed_tokens" in text
    assert "e.g. {value: 1.0}" in text
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("weight, message", [
    ([], "the weight is an empty list"),
    ([1.0, {"value": 1.0}], "holds numbers (a gradient) or rules (mappings), not both"),
    ("half", "a weight is a number, a list of numbers"),
    ([{"layers": [-1], "value": 1.0}], "rule 0: layers: Value error, layers [-1] are negative"),
    ([{"value": 1.0}, {"value": 1.0, "layer": [2]}], "rule 1: layer: Extra inputs are not permitted"),
    ([{"value": []}], "rule 0: value: Value error, value is an empty gradient"),
    ([{"layers": "3-1", "value": 1.0}], "rule 0: layers: Value error, layers '3-1': write layer numbers and runs"),
    ([{"layers": "top", "value": 1.0}], "rule 0: layers: Value error, layers 'top': write layer numbers and runs"),
])
def test_a_bad_weight_is_a_config_error_naming_the_model(tmp_path: Path, weight, message: str) -> None:
    cfg = _write(tmp_path, {"models": {"a": "x", "b": "y"}, "base": "a",
                            "slots": {"backbone": {"method": "task_arithmetic", "weights": {"b": weight}}}})
    with pytest.raises(MMHubError) as exc:
        read_config(cfg)
    assert "slots.backbone.weights.b: " in str(exc.value) and message in str(exc.value), str(exc.value)


def test_the_weight_search_tries_gradients_and_records_them(tmp_path: Path, monkeypatch, capsys) -> None:
    """A gradient or rules are search candidates like a number: with a score that peaks where the projector's first
    layer keeps the base and its last takes b's whole update, the gradient [0, 1] beats 0, 0.5, 1 and the rules
    (layer 2 at 0.9, the rest 0), is saved, and every candidate is written to merge_search.json as given."""
    from mmhub import cli
    from mmhub.merge import search as S

    a, b = saved_tiny(tmp_path / "a", 0), saved_tiny(tmp_path / "b", 1)
    pa, pb = (mmhub.load(p).projectors["image"].state_dict() for p in (a, b))
    first, last = "net.0.weight", "net.2.weight"  # the MLP projector's two layers (0 and 2 in its Sequential)
    assert {first, last} <= set(pa) and not torch.allclose(pa[last], pb[last])
    target = {first: pa[first], last: pb[last]}

    def score(model) -> dict:
        sd = model.projectors["image"].state_dict()
        return {"accuracy": -sum(float((sd[k] - t).norm()) for k, t in target.items()), "per_type": {}, "n": 1}

    monkeypatch.setattr(S, "task_scorer", lambda search, registry=None: score)
    cfg = _write(tmp_path, {"models": {"a": str(a), "b": str(b)}, "base": "a",
                            "slots": {"projectors.image": {"method": "task_arithmetic"}},
                            "search": {"weights": {"b": [0.0, 0.5, 1.0, [0.0, 1.0], [{"layers": [2], "value": 0.9},
                                                                                   {"value": 0.0}]]},
                                       "objective": "accuracy"}})
    assert cli.main(["merge", str(cfg), "--out", str(tmp_path / "merged")]) == 0
    got = mmhub.load(tmp_path / "merged").projectors["image"].state_dict()
    assert torch.allclose(got[first], pa[first]) and torch.allclose(got[last], pb[last], atol=1e-6)
    rows = json.loads((tmp_path / "merged" / "merge_search.json").read_text())
    assert [r["weights"] for r in rows["rows"] if r.get("chosen")] == [{"b": [0.0, 1.0]}]
    assert rows["chosen"]["projectors.image"]["weights"] == {"b": [0.0, 1.0]}
    said = capsys.readouterr().out
    assert "search: b=[0, 1]: accuracy" in said and "search: b={layers 2: 0.9; 0}: accuracy" in said
    assert rows["search"]["weights"]["b"][-1] == [{"layers": [2], "value": 0.9}, {"value": 0.0}]
