"""`mmhub merge`: the methods against their definitions, per-slot merges of saved models, pre-flight, the hook."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import yaml

import mmhub
from mmhub import hookimpl
from mmhub.errors import MMHubError
from mmhub.merge import methods as M
from mmhub.merge.config import MergeConfig, read_config
from mmhub.merge.run import merge, merge_models
from mmhub.registry import build_registry

from conftest import TINY_SPEC, lora_model, saved_tiny


def _m(cls: type[M.MergeMethod], **settings) -> M.MergeMethod:
    return cls(cls.Settings(**settings))


def test_linear_is_the_weighted_mean_and_slerp_follows_the_great_circle() -> None:
    a, b = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([3.0, 4.0, 0.0])
    assert torch.allclose(_m(M.Linear).merge(None, [a, b], [1.0, 3.0]), (a + 3 * b) / 4)
    assert torch.allclose(_m(M.Linear, normalize=False).merge(None, [a, b], [1.0, 3.0]), a + 3 * b)
    x, y = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])  # 90 degrees apart
    for t in (0.0, 0.3, 1.0):
        want = (math.sin((1 - t) * math.pi / 2) * x + math.sin(t * math.pi / 2) * y) / math.sin(math.pi / 2)
        assert torch.allclose(_m(M.Slerp, t=t).merge(None, [x, y], [1, 1]), want, atol=1e-6)
    assert torch.allclose(_m(M.Slerp, t=0.25).merge(None, [x, 2 * x], [1, 1]), 1.25 * x)  # parallel: linear


def test_task_vector_methods_add_to_the_base() -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, generator=g)
    models = [base + torch.randn(64, generator=g) for _ in range(3)]
    w = [0.5, 1.0, 0.25]
    want = base + sum(wi * (m - base) for wi, m in zip(w, models, strict=True))
    assert torch.allclose(_m(M.TaskArithmetic).merge(base, models, w), want, atol=1e-6)
    torch.manual_seed(1)
    assert torch.allclose(_m(M.DareLinear, density=1.0).merge(base, models, w), want, atol=1e-6)  # nothing dropped
    ties = _m(M.Ties, density=0.25).merge(base, models, w)
    delta = ties - base
    kept = [(m - base).abs() >= (m - base).abs().kthvalue(48).values for m in models]  # top 25% per task vector
    assert bool((delta[~torch.stack(kept).any(0)] == 0).all())  # entries no task vector kept stay the base's
    torch.manual_seed(3)
    one = _m(M.DareTies, density=0.5).merge(base, models, w)
    torch.manual_seed(3)
    assert torch.equal(one, _m(M.DareTies, density=0.5).merge(base, models, w))  # the seed fixes the drops



def _config(tmp_path: Path, models: dict[str, Path], slots: dict, base: str = "a") -> Path:
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump({"models": {k: str(v) for k, v in models.items()}, "base": base, "slots": slots}))
    return path


def test_a_merged_slot_is_the_methods_result_and_other_slots_are_the_bases(tmp_path: Path) -> None:
    a, b = saved_tiny(tmp_path / "a", 0), saved_tiny(tmp_path / "b", 1)
    cfg = _config(tmp_path, {"a": a, "b": b}, {"projectors.image": {"method": "linear", "weights": {"a": 1, "b": 3}}})
    out = merge(read_config(cfg), tmp_path / "merged")
    ma, mb, got = mmhub.load(a), mmhub.load(b), mmhub.load(out)
    for k, v in got.projectors["image"].state_dict().items():
        want = (ma.projectors["image"].state_dict()[k] + 3 * mb.projectors["image"].state_dict()[k]) / 4
        assert torch.allclose(v, want, atol=1e-6), k
    for k, v in got.backbone.state_dict().items():
        assert torch.equal(v, ma.backbone.state_dict()[k]), k
    assert not torch.equal(got.projectors["image"].state_dict()["net.0.weight"],
                           ma.projectors["image"].state_dict()["net.0.weight"])


def _with_lora(tmp_path: Path, name: str, seed: int, r: int) -> Path:
    """A tiny model whose backbone carries a LoRA adapter of rank `r` with non-zero updates, saved (one base LLM,
    fine-tunes differing by `seed`)."""
    out = tmp_path / name
    lora_model(r, seed).save_pretrained(out)
    return out


def test_lora_adapters_are_folded_before_merging(tmp_path: Path) -> None:
    """Adapters of ranks 2 and 4 merge as the weights they compute with: the merged q_proj is the mean of each model's
    W + scale * B A (not of the A's and B's), and the result carries no adapter and gives what those weights give."""
    from mmhub.adapters import merge_adapters

    a, b = _with_lora(tmp_path, "a", 1, r=2), _with_lora(tmp_path, "b", 2, r=4)
    cfg = _config(tmp_path, {"a": a, "b": b}, {"backbone": {"method": "linear"}})
    out = merge(read_config(cfg), tmp_path / "merged")
    got = mmhub.load(out)
    assert not got.spec.adapters and not any("lora_" in n for n, _ in got.named_parameters())
    fa, fb = mmhub.load(a), mmhub.load(b)
    merge_adapters(fa), merge_adapters(fb)
    sa, sb, sg = fa.backbone.state_dict(), fb.backbone.state_dict(), got.backbone.state_dict()
    q = next(k for k in sg if k.endswith("q_proj.weight"))
    assert not torch.allclose(sa[q], sb[q], atol=1e-3)  # the two adapters changed q_proj differently
    for k, v in sg.items():
        if v.is_floating_point():
            assert torch.allclose(v, (sa[k] + sb[k]) / 2, atol=1e-6), k
    raw_a, raw_b = mmhub.load(a).backbone.state_dict(), mmhub.load(b).backbone.state_dict()
    lora_a = next(k for k in raw_a if "q_proj.lora_A" in k)
    assert raw_a[lora_a].shape[0] == 2 and raw_b[lora_a].shape[0] == 4  # ranks differ: tensor-wise would not line up


def test_preflight_lists_every_problem_and_writes_nothing(tmp_path: Path) -> None:
    a, deep = saved_tiny(tmp_path / "a", 0), saved_tiny(tmp_path / "deep", 1, projector={"hidden_dim": 24})
    cfg = MergeConfig.model_validate({"models": {"a": str(a), "deep": str(deep)}, "base": "a", "slots": {
        "projectors.image": {"method": "linear"},
        "projectors.audio": {"method": "linear"},
        "backbone": {"method": "slerp", "t": 2.0},
        "encoders.image": {"method": "tiez"},
    }})
    with pytest.raises(MMHubError) as exc:
        merge(cfg, tmp_path / "out")
    text = str(exc.value)
    assert "6 problem(s)" in text  # three tensors of the projector, and one each for the other slots
    assert "slots.projectors.image: tensor net.0.weight is (24, 32) in deep but (48, 32) in a" in text
    assert "slots.projectors.image: tensor net.2.weight is (48, 24) in deep but (48, 48) in a" in text
    assert "slots.projectors.audio: the base has no slot 'projectors.audio'" in text
    assert "slots.backbone: slerp's settings: t: Input should be less than or equal to 1" in text
    assert "slots.encoders.image: no merge method named 'tiez'" in text and "Did you mean 'ties'" in text
    assert not (tmp_path / "out").exists()


def test_a_bad_config_file_names_every_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: {}\nslots: {backbone: {weights: {a: x}}}\n")
    with pytest.raises(MMHubError) as exc:
        read_config(bad)
    text = str(exc.value)
    assert "bad.yaml: 4 problem(s) in the merge config" in text
    for where in ("models: Dictionary should have at least 1 item", "base: Field required",
                  "slots.backbone.method: Field required",
                  "slots.backbone.weights.a: Value error, a weight is a number, a list of numbers"):
        assert where in text, where


def test_hook_register_merge_methods(tmp_path: Path) -> None:
    """A plugin's merge method is used by name in a merge config."""

    class TakeMax(M.MergeMethod):
        """Entry-wise maximum of the models' tensors."""

        name = "take_max"

        def merge(self, base, tensors, weights):
            return torch.stack(tensors).amax(0)

    class Plugin:
        @hookimpl
        def register_merge_methods(self, register):
            register(TakeMax)

    reg = build_registry(extra=[("maxplugin", Plugin())])
    assert reg.merge_method("take-max").cls is TakeMax
    ma, mb = mmhub.load(saved_tiny(tmp_path / "a", 0)), mmhub.load(saved_tiny(tmp_path / "b", 1))
    pa = {k: v.clone() for k, v in ma.projectors["image"].state_dict().items()}
    slots = {"projectors.image": {"method": "take_max", "weights": {"a": 1, "b": 1}}}
    cfg = MergeConfig.model_validate({"models": {"a": "a", "b": "b"}, "base": "a", "slots": slots})
    got = merge_models(cfg, {"a": ma, "b": mb}, reg)
    for k, v in got.projectors["image"].state_dict().items():
        assert torch.equal(v, torch.maximum(pa[k], mb.projectors["image"].state_dict()[k])), k


def test_transplant_measures_the_embedding_spaces_and_refuses_an_unrelated_backbone(tmp_path: Path, capsys) -> None:
    """A fine-tune of the same LLM (small changes) is accepted with its cosine printed; an unrelated LLM of the same
    shape is refused with the number unless forced; the result keeps the source's projector and takes the
    target's backbone."""
    from mmhub.cli import main

    src = saved_tiny(tmp_path / "src", 0)
    tuned = mmhub.load(src)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in tuned.backbone.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    tuned.save_pretrained(tmp_path / "tuned", full=True)
    other = saved_tiny(tmp_path / "other", 7)

    assert main(["transplant", str(src), "--backbone", str(tmp_path / "tuned"), "--out", str(tmp_path / "t1")]) == 0
    printed = capsys.readouterr().out
    cosine = float(printed.split("mean cosine ")[1].split()[0])
    rows = tuned.backbone.model.get_input_embeddings().weight.shape[0]
    shared = sum(1 for i in tuned.tokenizer.get_vocab().values() if i < rows)  # placeholders lie past the table
    assert cosine > 0.95 and f"{shared} shared tokens" in printed
    got, want_proj = mmhub.load(tmp_path / "t1"), mmhub.load(src)
    for k, v in got.backbone.state_dict().items():
        assert torch.equal(v, tuned.backbone.state_dict()[k]), k
    for k, v in got.projectors["image"].state_dict().items():
        assert torch.equal(v, want_proj.projectors["image"].state_dict()[k]), k

    assert main(["transplant", str(src), "--backbone", str(other), "--out", str(tmp_path / "t2")]) == 2
    err = capsys.readouterr().err
    assert "mean cosine" in err and "below 0.5" in err and "--force" in err
    assert not (tmp_path / "t2").exists()
    assert main(["transplant", str(src), "--backbone", str(other), "--out", str(tmp_path / "t2"), "--force"]) == 0


def test_transplant_refuses_another_family_with_the_tensor_and_both_shapes(tmp_path: Path) -> None:
    from mmhub.merge.transplant import transplant

    spec = copy.deepcopy(TINY_SPEC)
    spec["backbone"]["config"] = {**spec["backbone"]["config"], "intermediate_size": 64}
    with pytest.raises(MMHubError, match=r"backbone tensor model\.model\.layers\.0\.mlp\.gate_proj\.weight is "
                                         r"\(96, 48\) in the source but \(64, 48\) in the target: not the same family"):
        transplant(mmhub.build(copy.deepcopy(TINY_SPEC)), mmhub.build(spec))


def _combine_config(tmp_path: Path, models: dict[str, Path], method: dict, base: str, **top) -> Path:
    path = tmp_path / "combine.yaml"
    path.write_text(yaml.safe_dump({"models": {k: str(v) for k, v in models.items()}, "base": base,
                                    "adapters": "combine", **top, "slots": {"backbone": method}}))
    return path


def _effective_backbone(folder: Path) -> dict[str, torch.Tensor]:
    from mmhub.adapters import merge_adapters

    model = mmhub.load(folder)
    merge_adapters(model)
    return model.backbone.state_dict()


def test_adapters_combined_as_an_adapter_compute_what_folded_weights_compute(tmp_path: Path) -> None:
    """``adapters: combine``: ranks 2 and 4 averaged into one rank-6 adapter give exactly the weights the folded merge
    gives; a base without an adapter works as task arithmetic's base; a lower rank keeps the best approximation."""
    a, b = _with_lora(tmp_path, "a", 1, r=2), _with_lora(tmp_path, "b", 2, r=4)
    plain = saved_tiny(tmp_path / "plain", 0)  # the same base LLM, no adapter
    sa, sb = _effective_backbone(a), _effective_backbone(b)
    out = merge(read_config(_combine_config(tmp_path, {"a": a, "b": b}, {"method": "linear"}, "a")), tmp_path / "lin")
    got = mmhub.load(out)
    assert got.spec.adapters["backbone"].r == 6 and any("lora_" in n for n, _ in got.named_parameters())
    for k, v in _effective_backbone(out).items():
        if v.is_floating_point():
            assert torch.allclose(v, (sa[k] + sb[k]) / 2, atol=1e-5), k
    report: dict = {}
    cfg = _combine_config(tmp_path, {"base": plain, "a": a, "b": b},
                          {"method": "task_arithmetic", "weights": {"a": 1.0, "b": 1.0}}, "base")
    out = merge(read_config(cfg), tmp_path / "ta", report=report)
    assert report["backbone"]["rank"] == 6 and report["backbone"]["energy_min"] > 1 - 1e-5
    s0 = mmhub.load(plain).backbone.state_dict()
    for k, v in _effective_backbone(out).items():
        if v.is_floating_point():
            assert torch.allclose(v, sa[k] + sb[k] - s0[k], atol=1e-5), k
    report = {}
    out = merge(read_config(_combine_config(tmp_path, {"a": a, "b": b}, {"method": "linear"}, "a", adapter_rank=1)),
                tmp_path / "r1", report=report)
    assert mmhub.load(out).spec.adapters["backbone"].r == 1 and report["backbone"]["energy_mean"] < 0.99
    q = next(k for k in sa if k.endswith("q_proj.weight"))
    want_delta = (sa[q] + sb[q]) / 2 - s0[q]
    u, s, vh = torch.linalg.svd(want_delta)
    got_delta = _effective_backbone(out)[q] - s0[q]
    assert torch.allclose(got_delta, s[0] * torch.outer(u[:, 0], vh[0]), atol=1e-5)  # the best rank-1 update


def test_adapters_combine_preflight_names_what_cannot_combine(tmp_path: Path) -> None:
    a = _with_lora(tmp_path, "a", 1, r=2)
    plain = saved_tiny(tmp_path / "plain", 0)
    other = tmp_path / "other"  # an adapter over another base LLM (seed 5)
    spec = copy.deepcopy(TINY_SPEC)
    spec["seed"] = 5
    from mmhub.adapters import inject_adapter
    from mmhub.spec import LoraSpec

    model = mmhub.build(spec)
    inject_adapter(model, "backbone", LoraSpec(r=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(other)
    cfg = _combine_config(tmp_path, {"a": a, "plain": plain, "other": other},
                          {"method": "linear", "weights": {"a": 1.0, "plain": 1.0, "other": 1.0}}, "a")
    with pytest.raises(MMHubError) as exc:
        merge(read_config(cfg), tmp_path / "out")
    text = str(exc.value)
    assert "['plain'] carry no LoRA adapter on backbone" in text
    cfg = _combine_config(tmp_path, {"a": a, "other": other}, {"method": "linear"}, "a")
    with pytest.raises(MMHubError) as exc:
        merge(read_config(cfg), tmp_path / "out")
    assert "model other's base weights differ from a's in" in str(exc.value) and "use adapters: fold" in str(exc.value)
    assert not (tmp_path / "out").exists()


def test_header_preflight_stops_a_bad_merge_before_any_weight_is_read(tmp_path: Path, monkeypatch) -> None:
    """Shapes, component types, slots and adapters are compared from the folders' specs, manifests and safetensors
    headers: the merge fails with every problem listed without loading a single model."""
    import mmhub.loading

    a, deep = saved_tiny(tmp_path / "a", 0), saved_tiny(tmp_path / "deep", 1, projector={"hidden_dim": 24})
    lora = _with_lora(tmp_path, "lora", 1, r=2)
    spec = copy.deepcopy(TINY_SPEC)
    spec["projectors"]["image"] = {"type": "linear"}
    linear = tmp_path / "linear"
    mmhub.build(spec).save_pretrained(linear)

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the header pre-flight finished")

    monkeypatch.setattr(mmhub.loading, "load", no_loading)
    cfg = MergeConfig.model_validate({"models": {"a": str(a), "deep": str(deep), "linear": str(linear)}, "base": "a",
                                      "slots": {"projectors.image": {"method": "linear"}}})
    with pytest.raises(MMHubError) as exc:
        merge(cfg, tmp_path / "out")
    text = str(exc.value)
    assert "before loading any weights" in text and "4 problem(s)" in text, text  # 3 projector tensors, 1 type
    assert "slots.projectors.image: tensor net.0.weight is (24, 32) in deep but (48, 32) in a" in text
    assert "slots.projectors.image: model linear's component is 'linear' but a's is 'mlp'" in text
    cfg = MergeConfig.model_validate({"models": {"lora": str(lora), "a": str(a)}, "base": "lora",
                                      "adapters": "combine", "slots": {"backbone": {"method": "linear"}}})
    with pytest.raises(MMHubError, match=r"slots.backbone: \['a'\] carry no LoRA adapter on backbone"):
        merge(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _search_config(tmp_path: Path, models: dict[str, Path], search: dict) -> Path:
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump({
        "models": {k: str(v) for k, v in models.items()}, "base": "a",
        "slots": {"projectors.image": {"method": "task_arithmetic"}}, "search": search}))
    return path


def test_weight_search_picks_the_best_validation_merge_and_saves_it(tmp_path: Path, monkeypatch, capsys) -> None:
    """The search merges every grid point into the base (restored between candidates) and keeps the best-scoring one:
    with a score that peaks at base + 0.5 (b - base) + 2 (c - base), that point is chosen among 3 x 3, saved, and its
    rows written beside it; the models scored alone come first."""
    from mmhub import cli
    from mmhub.merge import search as S

    a, b, c = saved_tiny(tmp_path / "a", 0), saved_tiny(tmp_path / "b", 1), saved_tiny(tmp_path / "c", 2)
    wa, wb, wc = (mmhub.load(p).projectors["image"].state_dict()["net.0.weight"] for p in (a, b, c))
    target = wa + 0.5 * (wb - wa) + 2 * (wc - wa)
    scored: list[float] = []

    def score(model) -> dict:
        w = model.projectors["image"].state_dict()["net.0.weight"]
        scored.append(-float((w - target).norm()))
        return {"accuracy": scored[-1], "per_type": {}, "n": 1}

    monkeypatch.setattr(S, "task_scorer", lambda search, registry=None: score)
    cfg = _search_config(tmp_path, {"a": a, "b": b, "c": c},
                         {"weights": {"b": [0.5, 1.0, 2.0], "c": [0.5, 1.0, 2.0]}, "limit": 3})
    assert cli.main(["merge", str(cfg), "--out", str(tmp_path / "merged")]) == 0
    assert len(scored) == 2 + 9
    got = mmhub.load(tmp_path / "merged").projectors["image"].state_dict()["net.0.weight"]
    assert torch.allclose(got, target, atol=1e-6)
    rows = __import__("json").loads((tmp_path / "merged" / "merge_search.json").read_text())
    assert [r["model"] for r in rows["rows"][:2]] == ["b", "c"]
    chosen = [r for r in rows["rows"] if r.get("chosen")]
    assert [r["weights"] for r in chosen] == [{"b": 0.5, "c": 2.0}]
    assert rows["chosen"]["projectors.image"]["weights"] == {"b": 0.5, "c": 2.0}
    assert "search: b=0.5, c=2: accuracy" in capsys.readouterr().out


def test_keep_skills_scores_the_worst_skill_lost() -> None:
    from mmhub.merge.search import objective

    refs = {"shape": {"accuracy": 0.3, "per_type": {"shape": {"accuracy": 1.0}, "yes_no": {"accuracy": 0.0}}},
            "yes_no": {"accuracy": 0.5, "per_type": {"shape": {"accuracy": 0.0}, "yes_no": {"accuracy": 0.8}}}}
    merged = {"accuracy": 0.6, "per_type": {"shape": {"accuracy": 0.95}, "yes_no": {"accuracy": 0.5}}}
    assert objective(merged, refs) == pytest.approx(-0.3)  # yes/no: 0.5 against the specialist's 0.8
    assert objective(merged, refs, "accuracy") == pytest.approx(0.6)


def test_weight_search_refusals(tmp_path: Path) -> None:
    from mmhub.merge.search import candidates

    a, b = saved_tiny(tmp_path / "a", 0), saved_tiny(tmp_path / "b", 1)
    on_test = read_config(_search_config(tmp_path, {"a": a, "b": b}, {"weights": {"b": [1.0]}, "split": "test"}))
    with pytest.raises(MMHubError, match="test split make its scores optimistic"):
        candidates(on_test)
    unknown = read_config(_search_config(tmp_path, {"a": a, "b": b}, {"weights": {"z": [1.0], "b": []}}))
    with pytest.raises(MMHubError, match=r"(?s)search.weights.z: 'z' is not merged.*search.weights.b: no weight"):
        candidates(unknown)
    big = read_config(_search_config(tmp_path, {"a": a, "b": b},
                                     {"weights": {"b": [0.1 * i for i in range(10)]}, "max_candidates": 4}))
    with pytest.raises(MMHubError, match=r"10 = 10 combinations, more than max_candidates \(4\)"):
        candidates(big)
    bad_setting = read_config(_search_config(tmp_path, {"a": a, "b": b},
                                             {"weights": {"b": [1.0]}, "settings": {"density": [0.5]}}))
    with pytest.raises(MMHubError, match=r"search.settings.density: no merged slot's method takes 'density'"):
        candidates(bad_setting)


def test_weight_search_tries_method_settings_too(tmp_path: Path, monkeypatch) -> None:
    """A settings grid (DARE's density) is crossed with the weights; with a score that peaks at the undropped task
    vector, density 1.0 is chosen and the saved slot carries it."""
    from mmhub.merge import search as S

    a, b = saved_tiny(tmp_path / "a", 0), saved_tiny(tmp_path / "b", 1)
    wa, wb = (mmhub.load(p).projectors["image"].state_dict()["net.0.weight"] for p in (a, b))

    def score(model) -> dict:
        w = model.projectors["image"].state_dict()["net.0.weight"]
        return {"accuracy": -float((w - wb).norm()), "per_type": {}, "n": 1}

    monkeypatch.setattr(S, "task_scorer", lambda search, registry=None: score)
    path = tmp_path / "dare.yaml"
    path.write_text(yaml.safe_dump({"models": {"a": str(a), "b": str(b)}, "base": "a",
                                    "slots": {"projectors.image": {"method": "dare_linear", "density": 0.5}},
                                    "search": {"weights": {"b": [0.5, 1.0]}, "settings": {"density": [0.3, 1.0]}}}))
    out = merge(read_config(path), tmp_path / "merged")
    found = __import__("json").loads((out / "merge_search.json").read_text())
    assert [(r["weights"]["b"], r["settings"]["density"]) for r in found["rows"] if "weights" in r] == [
        (0.5, 0.3), (0.5, 1.0), (1.0, 0.3), (1.0, 1.0)]
    assert found["chosen"]["projectors.image"]["density"] == 1.0 and [r for r in found["rows"] if r.get("chosen")][
        0]["settings"] == {"density": 1.0}
    assert torch.allclose(mmhub.load(out).projectors["image"].state_dict()["net.0.weight"], wb, atol=1e-6)
