"""Save / load: bit-exact round trips, partial saves, atomic writes, damaged folders, weight hashes."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import save_file

from mmhub import MMModel, build
from mmhub.errors import CheckpointError, SpecError


def conv(q: str, a: str) -> list[dict]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def test_round_trip_is_bit_exact(tiny_spec, images, tmp_path) -> None:
    model = build(tiny_spec)
    with torch.no_grad():  # make the weights differ from the spec's seeded init
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    b = model.batch([conv("<image> what", "thing")], [{"image": [images[0]]}])
    before = model(**b)
    gen = model.generate(["<image> say"], [{"image": [images[1]]}], max_new_tokens=5)
    model.save_pretrained(tmp_path / "m")
    again = MMModel.from_pretrained(tmp_path / "m")
    after = again(**b)
    assert torch.equal(before.logits, after.logits) and torch.equal(before.loss, after.loss)
    assert again.generate(["<image> say"], [{"image": [images[1]]}], max_new_tokens=5) == gen
    spec = json.loads((tmp_path / "m" / "mmhub_spec.json").read_text())
    manifest = json.loads((tmp_path / "m" / "mmhub_manifest.json").read_text())
    assert spec["projectors"]["image"]["in_dim"] == 32 and torch.__version__.startswith(manifest["packages"]["torch"])
    assert not {"resolved", "trained", "adapters"} & set(spec)  # the spec file holds only what a user writes
    assert not list(tmp_path.glob(".m.*"))  # no temp folders left behind


def test_half_precision_storage_halves_the_file_and_loads_back_close(tiny_spec, images, tmp_path) -> None:
    from safetensors import safe_open

    model = build(tiny_spec)
    b = model.batch([conv("<image> what", "thing")], [{"image": [images[0]]}])
    before = model(**b).logits
    model.save_pretrained(tmp_path / "full32")
    model.save_pretrained(tmp_path / "half", storage_dtype="float16")
    size = {n: (tmp_path / n / "model.safetensors").stat().st_size for n in ("full32", "half")}
    assert size["half"] < 0.6 * size["full32"], size
    with safe_open(str(tmp_path / "half" / "model.safetensors"), "pt") as fh:
        assert {fh.get_slice(k).get_dtype() for k in fh.keys()} == {"F16"}
    assert json.loads((tmp_path / "half" / "mmhub_manifest.json").read_text())["storage_dtype"] == "float16"
    again = MMModel.from_pretrained(tmp_path / "half")
    assert all(p.dtype == torch.float32 for p in again.parameters())  # cast back on load
    after = again(**b).logits
    assert 0 < (after - before).abs().max() < 0.03 * before.abs().max()  # fp16 rounding, not another model
    with pytest.raises(CheckpointError, match="storage_dtype 'int4'"):
        model.save_pretrained(tmp_path / "bad", storage_dtype="int4")
    # a file stored smaller without the manifest saying so is still refused (a retyped tensor)
    manifest = json.loads((tmp_path / "half" / "mmhub_manifest.json").read_text())
    manifest["storage_dtype"] = None
    (tmp_path / "half" / "mmhub_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="stored as torch.float16"):
        MMModel.from_pretrained(tmp_path / "half", verify=False)


def test_saved_folders_get_the_usual_permissions(tiny_spec, tmp_path) -> None:
    """A model folder is written through a temporary (owner-only) folder; once in place it has the modes a plain
    mkdir/open gives under the umask, so a shared model folder is readable by the users the umask allows."""
    import os
    import stat

    from mmhub.atomic import write_text_atomic

    old = os.umask(0o022)
    try:
        build(tiny_spec).save_pretrained(tmp_path / "m")
        write_text_atomic(tmp_path / "note.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m").stat().st_mode) == 0o755
    for f in (tmp_path / "m").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    assert stat.S_IMODE((tmp_path / "note.json").stat().st_mode) == 0o644


def test_weight_sourced_frozen_parts_are_not_saved(tiny_spec, images, tmp_path) -> None:
    net = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    weights = tmp_path / "resnet10t.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    tiny_spec["encoders"]["image"] = {"type": "timm", "model": "resnet10t", "pretrained": str(weights),
                                      "image_size": 64}
    model = build(tiny_spec)
    model.save_pretrained(tmp_path / "m")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as fh:
        keys = list(fh.keys())
    assert keys and not any(k.startswith("encoders.") for k in keys)  # recoverable from the weights file
    manifest = json.loads((tmp_path / "m" / "mmhub_manifest.json").read_text())
    assert manifest["weights"][str(weights)]["sha256"]
    b = model.batch([conv("<image>", "x")], [{"image": [images[0]]}])
    with pytest.raises(SpecError, match="outside the folder, mmhub's weight cache"):  # a folder reads only its roots
        MMModel.from_pretrained(tmp_path / "m")
    again = MMModel.from_pretrained(tmp_path / "m", allow_paths=[tmp_path])  # unless the caller trusts more
    assert torch.equal(model(**b).logits, again(**b).logits)
    # a changed weights file is caught by its recorded hash
    save_file({k: v.contiguous() + 1 for k, v in net.state_dict().items()}, str(weights))
    with pytest.raises(CheckpointError, match="changed since this model was saved"):
        MMModel.from_pretrained(tmp_path / "m", allow_paths=[tmp_path])


def test_full_save_includes_everything(tiny_spec, tmp_path) -> None:
    model = build(tiny_spec)
    model.save_pretrained(tmp_path / "full", full=True)
    manifest = json.loads((tmp_path / "full" / "mmhub_manifest.json").read_text())
    assert manifest["saved"] == "full" and manifest["tensors"] == len(model.state_dict())


def test_crash_mid_save_keeps_the_previous_checkpoint(tiny_spec, tmp_path, monkeypatch) -> None:
    model = build(tiny_spec)
    model.save_pretrained(tmp_path / "m")
    first = (tmp_path / "m" / "model.safetensors").read_bytes()
    import mmhub.checkpoint as ck

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", explode)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no half-written folder anywhere
    MMModel.from_pretrained(tmp_path / "m")


def test_damaged_or_foreign_folders_get_clear_errors(tiny_spec, tmp_path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        MMModel.from_pretrained(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="mmhub_spec.json is missing"):
        MMModel.from_pretrained(tmp_path / "empty")
    model = build(tiny_spec)
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="model.safetensors changed since the model was saved"):
        MMModel.from_pretrained(tmp_path / "m")  # the manifest's recorded hash catches it first
    with pytest.raises(CheckpointError, match="cannot be read"):
        MMModel.from_pretrained(tmp_path / "m", verify=False)
    model.save_pretrained(tmp_path / "m2")
    other = dict(tiny_spec, projectors={"image": {"type": "linear"}})
    build(other).save_pretrained(tmp_path / "m3")
    (tmp_path / "m2" / "model.safetensors").replace(tmp_path / "m3" / "model.safetensors")
    with pytest.raises(CheckpointError, match="changed since the model was saved"):
        MMModel.from_pretrained(tmp_path / "m3")
    with pytest.raises(CheckpointError, match="do not belong together"):
        MMModel.from_pretrained(tmp_path / "m3", verify=False)


def test_no_pickle_loading_anywhere() -> None:
    """No code path unpickles or turns remote code on: read from the syntax tree, so messages that name
    `trust_remote_code=True` for the user do not count, and a call split over lines still does."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    folders = ("encoders", "projectors", "backbones", "generators")
    component_files = [p for d in folders for p in (root / d).rglob("*.py")]
    found = []
    for path in list((root / "mmhub").rglob("*.py")) + component_files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            keywords = {k.arg: k.value for k in node.keywords}
            if name.endswith("pickle.load") or name.endswith("pickle.loads"):
                found.append(f"{path}:{node.lineno}: {name}")
            if name.endswith("torch.load") and not (isinstance(keywords.get("weights_only"), ast.Constant)
                                                    and keywords["weights_only"].value is True):
                found.append(f"{path}:{node.lineno}: torch.load without weights_only=True")
            remote = keywords.get("trust_remote_code")
            if isinstance(remote, ast.Constant) and remote.value is True:
                found.append(f"{path}:{node.lineno}: trust_remote_code=True")
    assert not found, "\n".join(found)
