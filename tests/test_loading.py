"""`mmhub.load`: one entry for the default model, saved folders, spec files, presets and hf: ids; the manifest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import mmhub
from mmhub.errors import CheckpointError, MMHubError
from mmhub.loading import load

FIXTURES = Path(__file__).parent / "fixtures"


def test_build_refuses_a_saved_folder_and_points_to_load(tmp_path, tiny_spec) -> None:
    mmhub.build(tiny_spec).save_pretrained(tmp_path / "m")
    with pytest.raises(MMHubError, match=r"saved model folder.*mmhub\.load"):
        mmhub.build(tmp_path / "m")
    with pytest.raises(MMHubError, match=r"saved model folder"):
        mmhub.build(str(tmp_path / "m"))


def test_load_takes_a_folder_a_spec_file_and_a_preset(tmp_path, tiny_spec) -> None:
    model = mmhub.build(tiny_spec)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)  # trained weights a fresh build would not have
    model.save_pretrained(tmp_path / "m")
    again = load(tmp_path / "m")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))
    (tmp_path / "spec.json").write_text(json.dumps(tiny_spec))
    assert type(load(tmp_path / "spec.json")).__name__ == "MMModel"
    assert load("llava-1.5:tiny").spec.name
    with pytest.raises(MMHubError, match="no such folder or spec file"):
        load(str(tmp_path / "nothing.yaml"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MMHubError, match="neither mmhub_spec.json"):
        load(tmp_path / "empty")


def test_saved_folders_carry_a_manifest_apart_from_the_users_spec(tmp_path, tiny_spec) -> None:
    mmhub.build(tiny_spec).save_pretrained(tmp_path / "m")
    spec = json.loads((tmp_path / "m" / "mmhub_spec.json").read_text())
    manifest = json.loads((tmp_path / "m" / "mmhub_manifest.json").read_text())
    assert not {"resolved", "trained", "adapters"} & set(spec)
    assert set(manifest["files"]) == {"model.safetensors", "mmhub_spec.json"}
    origin = manifest["components"]["encoders.image"]
    assert origin["type"] == "open_clip" and origin["dist"] == "mmhub" and origin["version"]


def test_a_component_whose_package_is_missing_names_the_package(tmp_path, tiny_spec) -> None:
    mmhub.build(tiny_spec).save_pretrained(tmp_path / "m")
    manifest_file = tmp_path / "m" / "mmhub_manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["components"]["projectors.image"] = {"type": "pool_linear", "plugin": "example",
                                                  "dist": "mmhub-example-plugin", "version": "0.1.0"}
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"pip install mmhub-example-plugin==0\.1\.0"):
        load(tmp_path / "m", verify=False)


def test_a_changed_file_is_caught_by_its_recorded_hash(tmp_path, tiny_spec) -> None:
    mmhub.build(tiny_spec).save_pretrained(tmp_path / "m")
    spec_file = tmp_path / "m" / "mmhub_spec.json"
    data = json.loads(spec_file.read_text())
    data["description"] = "edited by hand"
    spec_file.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="mmhub_spec.json changed since the model was saved"):
        load(tmp_path / "m")
    assert load(tmp_path / "m", verify=False).spec.description == "edited by hand"


def test_a_folder_without_a_manifest_loads_as_saved_before(tmp_path) -> None:
    legacy = tmp_path / "legacy"
    shutil.copytree(FIXTURES / "saved_0_1", legacy)
    assert not (legacy / "mmhub_manifest.json").exists()
    model = load(legacy)
    assert model.spec.name == "saved-0.1-fixture"


def test_hf_ids_of_a_family_without_an_importer_say_what_is_supported(tmp_path, monkeypatch) -> None:
    snap = tmp_path / "models--org--bert" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (tmp_path / "models--org--bert" / "refs").mkdir()
    (tmp_path / "models--org--bert" / "refs" / "main").write_text("abc")
    (snap / "config.json").write_text(json.dumps({"model_type": "bert"}))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(MMHubError, match="no importer for model_type 'bert'; mmhub imports .*llava") as err:
        load("hf:org/bert")
    assert "register_importers" in str(err.value) and "docs/importers.md" in str(err.value)
