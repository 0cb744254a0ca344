"""``keep_states``: a stage's next-token loss plus the relative distance of its block outputs to a frozen reference's.

The term is checked against transformers' own ``output_hidden_states`` (the outputs of every block but the last), a
short LoRA run with it ends nearer the reference at the kept positions than the same run without it, and a bad
reference or stage is an error naming it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

import mmhub
from mmhub.errors import InputError, SpecError
from mmhub.model import MMModel
from mmhub.spec import KeepStatesSpec, StageSpec, load_spec
from mmhub.train.keep_states import Anchors, KeepStates, load_reference
from mmhub.train.objectives import NextTokenLoss

from conftest import TINY_SPEC, saved_tiny

THREE_BLOCKS = {"num_hidden_layers": 3}


def _batch(model: Any) -> dict[str, Any]:
    convs = [[{"role": "user", "content": "<image>\nWhat colour is it?"}, {"role": "assistant", "content": "red"}],
             [{"role": "user", "content": "Say hi. <image>"}, {"role": "assistant", "content": "hi there"}]]
    images = [Image.new("RGB", (32, 32), (200, 30, 30)), Image.new("RGB", (32, 32), (30, 30, 200))]
    batch = model.batch(convs, [{"image": [images[0]]}, {"image": [images[1]]}])
    batch["features"] = {}
    return batch


def _expected_term(model: Any, reference: Any, batch: dict[str, Any], positions: str) -> torch.Tensor:
    """Mean over blocks 0..L-2 and the kept positions of ||h - r||^2 / ||r||^2, from transformers' hidden states."""
    def states(m: Any) -> tuple[tuple[torch.Tensor, ...], Any]:
        sp = m.prepare_inputs(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["media"])
        out = m.backbone.model(inputs_embeds=sp.inputs_embeds, attention_mask=sp.attention_mask,
                               position_ids=sp.position_ids, output_hidden_states=True)
        return out.hidden_states, sp

    with torch.no_grad():
        mine, sp = states(model)
        theirs, _ = states(reference)
    real = sp.attention_mask.bool()
    at = {"media": sp.media_positions & real, "prompt": real & (sp.labels == -100), "all": real}[positions]
    n_blocks = len(mine) - 1
    per_block = [((mine[i][at] - theirs[i][at]).pow(2).sum(-1) / theirs[i][at].pow(2).sum(-1)).mean()
                 for i in range(1, n_blocks)]  # hidden_states[i]: block i-1's output; the last entry is normed
    return torch.stack(per_block).mean()


@pytest.mark.parametrize("positions", ["media", "prompt"])
def test_term_is_the_mean_relative_distance_of_every_block_output_but_the_last(positions: str) -> None:
    spec = copy.deepcopy(TINY_SPEC)
    spec["backbone"]["config"] = {**spec["backbone"]["config"], **THREE_BLOCKS}
    model, reference = mmhub.build(spec).eval(), mmhub.build(spec).eval()
    reference.load_state_dict(model.state_dict())
    batch = _batch(model)
    keep = KeepStates(NextTokenLoss(), reference, KeepStatesSpec(reference="unused", weight=2.5, positions=positions))
    inner, count = NextTokenLoss().loss(model, batch, None)

    total, n = keep.loss(model, batch, None)  # the reference is the model: nothing to keep
    assert n == count and torch.equal(total, inner) and keep.stats()["keep_states"] == 0.0

    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(0.02 * torch.randn_like(p))
    inner, count = NextTokenLoss().loss(model, batch, None)
    total, n = keep.loss(model, batch, None)
    expected = _expected_term(model, reference, batch, positions)
    assert expected > 1e-4
    torch.testing.assert_close(total, inner + 2.5 * expected * count, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(keep.stats()["keep_states"]), expected, rtol=1e-4, atol=1e-6)


def _data(tmp_path: Path) -> Path:
    colours = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200), "yellow": (220, 220, 30)}
    records = []
    for k, (name, rgb) in enumerate(colours.items()):
        Image.new("RGB", (32, 32), rgb).save(tmp_path / f"{name}.png")
        records.append({"id": f"s{k}", "image": f"{name}.png", "conversations": [
            {"from": "human", "value": "<image>\nIs it bright?"}, {"from": "gpt", "value": f"{name} yes"}]})
    (tmp_path / "data.json").write_text(json.dumps(records * 4))
    return tmp_path / "data.json"


def _media_distance(folder: Path, base: Path) -> float:
    model, reference = MMModel.from_pretrained(folder).eval(), MMModel.from_pretrained(base).eval()
    return float(_expected_term(model, reference, _batch(model), "media"))


def _lora_run(out: Path, base: Path, data: Path, keep: dict[str, Any] | None) -> None:
    """12 LoRA steps at 5e-3 on `data` from the saved three-block tiny `base`, with `keep` as keep_states (or none),
    into `out` (stage ``s``)."""
    from mmhub.train.run import train

    spec = copy.deepcopy(TINY_SPEC)
    spec["backbone"]["config"] = {**spec["backbone"]["config"], **THREE_BLOCKS}
    spec["init_from"] = str(base)
    stage = {"name": "s", "data": str(data), "lr": 5e-3, "backbone_lr": 5e-3, "batch_size": 4, "max_steps": 12,
             "log_every": 1, "train": {"backbone": {"lora": {"r": 8, "alpha": 16, "target_modules": "all-linear"}}}}
    if keep:
        stage["keep_states"] = keep
    spec["stages"] = [stage]
    train(spec, out=out, progress_bar=False)


def test_a_lora_run_with_the_term_stays_nearer_the_reference(tmp_path: Path) -> None:
    base = saved_tiny(tmp_path / "base", seed=0, llm=THREE_BLOCKS)
    data = _data(tmp_path)
    distances, records = {}, {}
    for name, keep in [("free", None), ("kept", {"reference": str(base), "weight": 20.0})]:
        _lora_run(tmp_path / name, base, data, keep)
        distances[name] = _media_distance(tmp_path / name / "s" / "model", base)
        lines = (tmp_path / name / "s" / "metrics.jsonl").read_text().splitlines()
        records[name] = [json.loads(line) for line in lines]
    assert distances["free"] > 1e-3, distances  # the run without the term moves the image positions' states
    assert distances["kept"] < 0.5 * distances["free"], distances
    logged = [r["keep_states"] for r in records["kept"] if "keep_states" in r]
    assert logged and not any("keep_states" in r for r in records["free"])


def test_with_anchors_the_term_is_computed_on_the_anchor_batch_alone(tmp_path: Path) -> None:
    spec = copy.deepcopy(TINY_SPEC)
    spec["backbone"]["config"] = {**spec["backbone"]["config"], **THREE_BLOCKS}
    model, reference = mmhub.build(spec).eval(), mmhub.build(spec).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(0.02 * torch.randn_like(p))
    _data(tmp_path)
    anchors = tmp_path / "anchors.json"
    anchors.write_text(json.dumps([{"id": f"a{k}", "image": "green.png", "conversations": [
        {"from": "human", "value": f"<image>\nShape {k}?"}, {"from": "gpt", "value": "round" * (k + 1)}]}
        for k in range(5)]))
    keep = KeepStatesSpec(reference="unused", weight=3.0, positions="all", data=str(anchors), batch_size=2)
    stage = StageSpec(name="s", keep_states=keep)
    objective = KeepStates(NextTokenLoss(), reference, keep, Anchors(keep, stage, seed=7))
    twin = Anchors(keep, stage, seed=7)  # the same seeded order: the anchor batches the objective draws
    batch = _batch(model)
    inner, count = NextTokenLoss().loss(model, batch, None)
    for _ in range(3):  # cycling through 5 anchors two at a time
        total, n = objective.loss(model, batch, None)
        expected = _expected_term(model, reference, twin.batch(model), "all")
        assert n == count
        torch.testing.assert_close(total, inner + 3.0 * expected * count, rtol=1e-4, atol=1e-5)


def test_anchor_samples_are_kept_and_the_training_batch_is_not(tmp_path: Path) -> None:
    """With ``data`` the term is computed on anchor samples at every position: a run with it ends nearer the reference
    on those samples than the same run without it."""
    base = saved_tiny(tmp_path / "base", seed=0, llm=THREE_BLOCKS)
    data = _data(tmp_path)
    anchors = tmp_path / "anchors.json"
    anchors.write_text(json.dumps([{"id": f"a{k}", "image": "red.png", "conversations": [
        {"from": "human", "value": f"<image>\nWhat is the shape number {k}?"}, {"from": "gpt", "value": "round"}]}
        for k in range(6)] + [{"id": "bad", "image": "nowhere.png", "conversations": [
            {"from": "human", "value": "<image>\nAnd?"}, {"from": "gpt", "value": "x"}]}]))
    distances, logged = {}, {}
    for name, keep in [("free", None), ("kept", {"reference": str(base), "weight": 20.0, "positions": "all",
                                                 "data": str(anchors), "batch_size": 3})]:
        _lora_run(tmp_path / name, base, data, keep)
        model = MMModel.from_pretrained(tmp_path / name / "s" / "model").eval()
        reference = MMModel.from_pretrained(base).eval()
        convs = [[{"role": "user", "content": f"<image>\nWhat is the shape number {k}?"},
                  {"role": "assistant", "content": "round"}] for k in range(2)]
        batch = model.batch(convs, [{"image": [Image.open(tmp_path / "red.png")]}] * 2)
        distances[name] = float(_expected_term(model, reference, batch, "prompt"))
        lines = (tmp_path / name / "s" / "metrics.jsonl").read_text().splitlines()
        logged[name] = [json.loads(line) for line in lines]
    assert distances["free"] > 1e-3 and distances["kept"] < 0.5 * distances["free"], distances
    steps = [r for r in logged["kept"] if "keep_states" in r]
    assert steps and max(r.get("keep_states_skipped", 0) for r in steps) >= 1  # the unreadable anchor, counted


def test_bad_keep_states_settings_are_errors_naming_them(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="keep_states works with objective sft.*'dpo'"):
        load_spec({**copy.deepcopy(TINY_SPEC), "stages": [
            {"name": "p", "objective": "dpo", "keep_states": {"reference": "x"}}]})
    with pytest.raises(SpecError, match="positions"):
        load_spec({**copy.deepcopy(TINY_SPEC), "stages": [
            {"name": "s", "keep_states": {"reference": "x", "positions": "images"}}]})

    model = mmhub.build(copy.deepcopy(TINY_SPEC))
    stage = StageSpec(name="s", keep_states={"reference": str(tmp_path / "nowhere")})
    with pytest.raises(InputError, match="stage 's': keep_states.reference .*nowhere.* could not be loaded"):
        load_reference(stage.keep_states, stage, model)
    wider = saved_tiny(tmp_path / "wider", seed=0, llm=THREE_BLOCKS)
    with pytest.raises(InputError, match="has 3 blocks of width 48, the model 2 of width 48"):
        load_reference(KeepStatesSpec(reference=str(wider)), stage, model)
    other = saved_tiny(tmp_path / "other", seed=1)  # another draw of the image encoder
    with pytest.raises(InputError, match="encodes 'image' differently .* cache_features: false"):
        load_reference(KeepStatesSpec(reference=str(other)), stage, model)
    with pytest.raises(SpecError, match="positions"):
        load_spec({**copy.deepcopy(TINY_SPEC), "stages": [
            {"name": "s", "keep_states": {"reference": "x", "positions": "everywhere"}}]})
    uncached = StageSpec(name="s", cache_features=False, keep_states={"reference": str(other)})
    assert load_reference(uncached.keep_states, uncached, model) is not None
