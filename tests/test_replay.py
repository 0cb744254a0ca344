"""The ``replay`` dataset: a dataset's prompts answered by a saved model, its greedy replies the training targets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

import mmhub
from mmhub.data import MixtureDataset, load_dataset
from mmhub.errors import InputError, SpecError
from mmhub.model import MMModel


def _files(tmp_path: Path, tiny_spec) -> tuple[Path, Path]:
    model = mmhub.build(tiny_spec | {"seed": 0}).eval()
    folder = model.save_pretrained(tmp_path / "base")
    for k, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        Image.new("RGB", (32, 32), colour).save(tmp_path / f"{k}.png")
    records = [{"id": f"q{k}", "image": f"{k}.png", "conversations": [
        {"from": "human", "value": f"<image>\nWhat is in picture {k}?"}, {"from": "gpt", "value": "reference"}]}
        for k in range(3)]
    records.append({"id": "missing", "image": "nowhere.png", "conversations": [
        {"from": "human", "value": "<image>\nAnd here?"}, {"from": "gpt", "value": "reference"}]})
    (tmp_path / "data.json").write_text(json.dumps(records))
    return folder, tmp_path / "data.json"


def test_replay_targets_are_the_models_greedy_replies_and_bad_samples_are_skipped(tmp_path: Path, tiny_spec) -> None:
    folder, data = _files(tmp_path, tiny_spec)
    ds = load_dataset({"type": "replay", "model": "base", "data": "data.json", "max_new_tokens": 6,
                       "batch_size": 4}, base_dir=tmp_path)
    assert len(ds) == 3 and ds.skipped == 1  # the record whose image is missing: skipped and counted
    model = MMModel.from_pretrained(folder).eval()
    for k in range(3):
        s = ds[k]
        prompt = s.messages[:-1]
        assert prompt == [{"role": "user", "content": f"<image>\nWhat is in picture {k}?"}]
        expected = model.generate([prompt], [{"image": [str(tmp_path / f"{k}.png")]}], max_new_tokens=6)[0].text
        assert s.messages[-1] == {"role": "assistant", "content": expected}
        assert s.messages[-1]["content"] != "reference" and s.id == f"replay:q{k}"
    # the first N only, and a mixture element like any other format
    mix = load_dataset([{"path": "data.json"}, {"type": "replay", "model": str(folder), "data": "data.json",
                                                "samples": 2, "max_new_tokens": 4}], base_dir=tmp_path)
    assert isinstance(mix, MixtureDataset) and len(mix) == 4 + 2


def test_replay_errors_name_the_setting(tmp_path: Path, tiny_spec) -> None:
    folder, data = _files(tmp_path, tiny_spec)
    with pytest.raises(SpecError, match="model"):
        load_dataset({"type": "replay", "data": "data.json"}, base_dir=tmp_path)
    with pytest.raises(SpecError, match="samples"):
        load_dataset({"type": "replay", "model": str(folder), "data": "data.json", "samples": 0}, base_dir=tmp_path)
    (tmp_path / "only-bad.json").write_text(json.dumps([{"id": "x", "image": "nowhere.png", "conversations": [
        {"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Hello"}]}]))
    with pytest.raises(InputError, match="no sample .* could be answered .*1 skipped"):
        load_dataset({"type": "replay", "model": str(folder), "data": "only-bad.json"}, base_dir=tmp_path)
