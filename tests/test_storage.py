"""Smaller model folders: int8 storage with row scales (`mmhub.storage`) and LoRA rank truncation
(`mmhub.adapter_rank`), each loading back to a model that computes what the original computes, to the stated error."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import mmhub
from mmhub import MMModel
from mmhub.adapter_rank import reduce_adapter_rank
from mmhub.adapters import lora_layers
from mmhub.errors import CheckpointError, MMHubError
from mmhub.storage import INT8_SCALE_SUFFIX, expand_state, restore, stored_small

from conftest import lora_model


def conv(q: str, a: str) -> list[dict]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def test_int8_rows_round_trip_within_half_a_step() -> None:
    w = torch.randn(48, 20) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different sizes
    entries = stored_small("w", w, "int8")
    assert entries["w"].dtype == torch.int8 and entries["w" + INT8_SCALE_SUFFIX].shape == (48,)
    back = restore(entries["w"], entries["w" + INT8_SCALE_SUFFIX])
    step = w.abs().amax(dim=1) / 127
    assert ((back - w).abs() <= step[:, None] / 2 + 1e-12).all()  # each row's own scale: small rows stay precise
    assert stored_small("b", torch.randn(48), "int8")["b"].dtype == torch.float16  # vectors: float16
    assert stored_small("i", torch.arange(300), "int8")["i"].dtype == torch.int64  # not float32: as it is
    assert restore(stored_small("z", torch.zeros(16, 16), "int8")["z"],
                   stored_small("z", torch.zeros(16, 16), "int8")["z" + INT8_SCALE_SUFFIX]).abs().max() == 0


def test_int8_folder_is_a_third_of_float32_and_loads_back_close(tiny_spec, images, tmp_path) -> None:
    model = mmhub.build(tiny_spec)
    b = model.batch([conv("<image> what", "thing")], [{"image": [images[0]]}])
    before = model(**b).logits
    model.save_pretrained(tmp_path / "f32")
    model.save_pretrained(tmp_path / "q8", storage_dtype="int8")
    size = {n: (tmp_path / n / "model.safetensors").stat().st_size for n in ("f32", "q8")}
    assert size["q8"] < 0.33 * size["f32"], size
    with safe_open(str(tmp_path / "q8" / "model.safetensors"), "pt") as fh:
        dtypes = {fh.get_slice(k).get_dtype() for k in fh.keys()}
    assert dtypes == {"I8", "F32", "F16"}, dtypes  # values, their row scales, small tensors
    assert json.loads((tmp_path / "q8" / "mmhub_manifest.json").read_text())["storage_dtype"] == "int8"
    again = MMModel.from_pretrained(tmp_path / "q8")
    assert all(p.dtype == torch.float32 for p in again.parameters())
    after = again(**b).logits
    assert (after - before).abs().max() > 0  # rounded: not bit-exact...
    with torch.no_grad():  # ...but exactly the original with each tensor rounded as `stored_small` says
        for k, v in model.state_dict().items():
            e = stored_small(k, v, "int8")
            v.copy_(restore(e[k], e.get(k + INT8_SCALE_SUFFIX)))
    assert torch.equal(model(**b).logits, after)
    # the same file read whole (init_from, merges) gives the same float32 tensors the loader put in the model
    whole = expand_state(load_file(str(tmp_path / "q8" / "model.safetensors")))
    own = again.state_dict()
    assert all(torch.equal(whole[k].float(), own[k]) for k in whole)


def test_int8_folder_with_a_lost_scale_is_refused(tiny_spec, tmp_path) -> None:
    mmhub.build(tiny_spec).save_pretrained(tmp_path / "q8", storage_dtype="int8")
    file = tmp_path / "q8" / "model.safetensors"
    with safe_open(str(file), "pt") as fh:
        meta, state = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    lost = next(k for k in state if k.endswith(INT8_SCALE_SUFFIX))
    del state[lost]
    save_file(state, str(file), metadata=meta)
    with pytest.raises(CheckpointError, match="lacks its row scales"):
        MMModel.from_pretrained(tmp_path / "q8", verify=False)
    state[lost] = torch.ones(state[lost.removesuffix(INT8_SCALE_SUFFIX)].shape[0], dtype=torch.float16)
    save_file(state, str(file), metadata=meta)  # a scale of the wrong dtype would be read as garbage bytes
    with pytest.raises(CheckpointError, match="in float32"):
        MMModel.from_pretrained(tmp_path / "q8", verify=False)


def test_rank_truncation_is_the_best_low_rank_update_and_reloads(images, tmp_path) -> None:
    model = lora_model(4, seed=1)
    b = model.batch([conv("<image> what", "thing")], [{"image": [images[0]]}])
    before = model(**b).logits
    deltas = [layer.get_delta_weight("default").clone() for layer in lora_layers(model, "backbone")]
    same = copy.deepcopy(model, memo={id(model.plan.ctx): model.plan.ctx})
    (full,) = reduce_adapter_rank(same, 4)  # at its own rank: the same updates, rewritten with scaling 1
    assert full.energy_min > 1 - 1e-6 and full.params_after == full.params_before
    assert (same(**b).logits - before).abs().max() < 1e-5 * before.abs().max() * 100  # float32 SVD rounding

    (rep,) = reduce_adapter_rank(model, 2)
    assert (rep.rank_before, rep.rank_after, rep.layers) == (4, 2, len(deltas)) and rep.energy_mean < 1
    assert rep.params_after * 2 == rep.params_before
    assert model.spec.adapters["backbone"].r == 2 and model.spec.adapters["backbone"].alpha == 2
    for layer, delta in zip(lora_layers(model, "backbone"), deltas, strict=True):
        new = layer.get_delta_weight("default")
        s = torch.linalg.svdvals(delta)
        assert torch.linalg.matrix_rank(new) == 2
        # Eckart-Young: the error of the best rank-2 approximation is the norm of the dropped singular values
        assert torch.isclose(torch.linalg.norm(new - delta), s[2:].norm(), rtol=1e-4)
    truncated = model(**b).logits
    assert (truncated - before).abs().max() > 1e-2 * before.abs().max()  # rank 2 of a random rank-4 update
    model.save_pretrained(tmp_path / "r2")
    manifest = json.loads((tmp_path / "r2" / "mmhub_manifest.json").read_text())
    assert manifest["adapters"]["backbone"]["r"] == 2
    assert torch.equal(MMModel.from_pretrained(tmp_path / "r2")(**b).logits, truncated)


def test_rank_truncation_refuses_what_it_cannot_do(tiny_spec) -> None:
    with pytest.raises(MMHubError, match="carries no LoRA adapter"):
        reduce_adapter_rank(mmhub.build(tiny_spec), 2)
    model = lora_model(4, seed=1)
    with pytest.raises(MMHubError, match=r"rank 8 must be between 1 and the adapters' rank \(\{'backbone': 4\}\)"):
        reduce_adapter_rank(model, 8)
    with pytest.raises(MMHubError, match="no LoRA adapter on \\['projectors.image'\\]"):
        reduce_adapter_rank(model, 2, slots=["projectors.image"])


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmhub.cli", *args], capture_output=True, text=True, timeout=300)


def test_export_cli_writes_a_smaller_folder(tmp_path: Path) -> None:
    model = lora_model(4, seed=1)
    model.save_pretrained(tmp_path / "m")
    out = _cli("export", str(tmp_path / "m"), str(tmp_path / "small"), "--format", "mmhub", "--dtype", "int8",
               "--lora-rank", "2")
    assert out.returncode == 0, out.stderr
    assert "LoRA rank 4 -> 2 on" in out.stdout and "energy kept" in out.stdout
    small = MMModel.from_pretrained(tmp_path / "small")
    assert small.spec.adapters["backbone"].r == 2
    bad = _cli("export", str(tmp_path / "m"), str(tmp_path / "hf"), "--format", "hf-llava", "--dtype", "int8")
    assert bad.returncode != 0 and "apply to --format mmhub only" in bad.stderr
