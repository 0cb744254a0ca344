"""A changed model folder never loads as a silently different model: hashes, dtypes, shapes, NaN/inf, aliases."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import mmhub
from mmhub.errors import CheckpointError
from mmhub.loading import load_folder


@pytest.fixture
def folder(tiny_spec, tmp_path):
    mmhub.build(tiny_spec).save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def _rewrite(folder, change, metadata=None) -> None:
    """Rewrite model.safetensors with `change(state)` applied (a tamperer who also drops the manifest's hashes)."""
    state = load_file(str(folder / "model.safetensors"))
    change(state)
    save_file(state, str(folder / "model.safetensors"), metadata=metadata or {"format": "pt", "aliases": "{}"})


def test_flipped_bytes_in_the_data_region_fail_the_recorded_hash(folder) -> None:
    raw = bytearray((folder / "model.safetensors").read_bytes())
    raw[-100] ^= 0x01
    (folder / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="changed since the model was saved"):
        load_folder(folder)


@pytest.mark.parametrize("change, message", [
    (lambda s: s.__setitem__(next(iter(s)), s[next(iter(s))].half()), "is stored as torch.float16"),
    (lambda s: s.__setitem__(next(iter(s)), s[next(iter(s))].to(torch.int64)), "is stored as torch.int64"),
    (lambda s: s.__setitem__(next(iter(s)), s[next(iter(s))].flatten()), "has shape"),
    (lambda s: s.__setitem__(next(iter(s)), torch.zeros(3, 3)), "has shape"),
    (lambda s: s[next(k for k in s if s[k].is_floating_point())].view(-1).__setitem__(0, float("nan")), "NaN/inf"),
])
def test_retyped_reshaped_or_nonfinite_tensors_are_refused(folder, change, message) -> None:
    _rewrite(folder, change)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # verify=False warns by design
        with pytest.raises(CheckpointError, match=message):
            load_folder(folder, verify=False)


def test_nonfinite_weights_load_when_asked(folder) -> None:
    key = next(k for k in load_file(str(folder / "model.safetensors")) if "proj" in k)
    _rewrite(folder, lambda s: s[key].view(-1).__setitem__(0, float("inf")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_folder(folder, verify=False, allow_nonfinite=True)
    assert not torch.isfinite(model.state_dict()[key]).all()


@pytest.mark.parametrize("aliases, message", [("[1, 2]", "not a name -> name mapping"),
                                              ('{"a.b": "no.such.tensor"}', "which the file lacks")])
def test_broken_alias_metadata_is_named(folder, aliases, message) -> None:
    _rewrite(folder, lambda s: None, metadata={"format": "pt", "aliases": aliases})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointError, match=message):
            load_folder(folder, verify=False)


@pytest.mark.parametrize("content", [b"[1, 2]", b'"a string"', b"\xff\xfe{}", b"[" * 100000 + b"]" * 100000])
def test_a_spec_file_that_is_not_a_json_object_is_named(folder, content) -> None:
    (folder / "mmhub_spec.json").write_bytes(content)
    with pytest.raises(CheckpointError, match="mmhub_spec.json"):
        load_folder(folder, verify=False)


def test_a_folder_without_recorded_hashes_warns(folder) -> None:
    (folder / "mmhub_manifest.json").unlink()
    spec = json.loads((folder / "mmhub_spec.json").read_text())
    (folder / "mmhub_spec.json").write_text(json.dumps(spec))
    with pytest.warns(UserWarning, match="records no file hashes"):
        load_folder(folder)
