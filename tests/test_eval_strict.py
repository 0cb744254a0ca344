"""Evaluation honesty: strict exact match by default (a reply naming two answers is wrong) with the lenient
first-word score beside it, and blind ablations that show no easy-VQA colour or shape (an empty canvas, or no
image at all)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import mmhub
from mmhub.cli import main
from mmhub.data.base import SampleError
from mmhub.data.easy_vqa import PALETTE, facts_from_pixels
from mmhub.evaluation import easy_vqa, exact_match, get_task, score

from conftest import TINY_SPEC, need_easy_vqa

# conftest's tiny LLaVA spec without its training stages
SPEC = {**{k: v for k, v in copy.deepcopy(TINY_SPEC).items() if k != "stages"}, "name": "eval-strict-tiny"}




@pytest.mark.parametrize("reply, answer, strict, lenient", [
    ("yes", "yes", True, True),
    ("Yes.", "yes", True, True),
    ("  The circle! ", "circle", True, True),
    ("yes no", "yes", False, True),  # names two answers: strictly wrong, the first word alone says "yes"
    ("red, blue", "red", False, True),
    ("red red red", "red", False, True),  # a reply that does not stop
    ("a red one", "red", False, True),
    ("Yes, it is.", "yes", False, True),
    ("no", "yes", False, False),
    ("", "yes", False, False),
    ("new york", "New York", True, True),  # several-word answers compare whole either way
    ("new york city", "New York", False, False),
])
def test_strict_by_default_lenient_on_request(reply: str, answer: str, strict: bool, lenient: bool) -> None:
    assert exact_match(reply, answer) is strict
    assert exact_match(reply, answer, lenient=True) is lenient


def test_score_reports_strict_and_lenient() -> None:
    out = score([("yes no", "yes", "yes_no"), ("red", "red", "color"), ("circle square", "circle", "shape"),
                 ("blue", "red", "color")])
    assert out["correct"] == 1 and out["accuracy"] == 0.25
    assert out["correct_lenient"] == 3 and out["accuracy_lenient"] == 0.75
    assert out["per_type"]["yes_no"] == {"n": 1, "correct": 0, "accuracy": 0.0, "correct_lenient": 1,
                                         "accuracy_lenient": 1.0}
    assert out["refusals"] == 0 and out["refusal_rate"] == 0.0


def test_score_counts_refusals_as_wrong_and_reports_them() -> None:
    out = score([("I can only answer questions about simple coloured shapes.", "red", "color"),
                 ("I can't see a circle", "no", "yes_no"), ("no", "no", "yes_no"), ("I don't know", "yes", "yes_no")])
    assert out["refusals"] == 2 and out["refusal_rate"] == 0.5 and out["correct"] == 1


def test_blind_image_shows_no_easy_vqa_colour_or_shape(tmp_path: Path) -> None:
    img = easy_vqa.blind_image((64, 64))
    rgb = np.asarray(img.convert("RGB"), dtype=np.int32).reshape(-1, 3)
    assert img.size == (64, 64) and (rgb == rgb[0]).all()  # one flat colour: no shape
    nearest = min(float(np.linalg.norm(rgb[0] - np.array(c))) for c in PALETTE.values())
    assert nearest > 150, (tuple(rgb[0]), nearest)  # far from every answer colour (gray included)
    img.save(tmp_path / "blind.png")
    with pytest.raises(SampleError, match="no palette colour"):
        facts_from_pixels(tmp_path / "blind.png")


@pytest.fixture(scope="module")
def model():
    return mmhub.build(SPEC)


@need_easy_vqa
def test_blind_modes_feed_the_canvas_or_no_image(model) -> None:
    seen: list[torch.Tensor] = []
    handle = model.encoders["image"].register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    task = get_task("easy_vqa")
    try:
        out = task.run(model, split="test", limit=4, blind=True, batch_size=2, max_new_tokens=1)
        canvas = torch.cat(seen)
        seen.clear()
        none = task.run(model, split="test", limit=4, blind="no_image", batch_size=2, max_new_tokens=1)
    finally:
        handle.remove()
    want = model.processor.preprocess["image"](easy_vqa.blind_image((64, 64)))
    assert canvas.shape[0] == 4 and all(torch.allclose(x, want) for x in canvas)
    assert seen == []  # no image reached the encoder
    assert out["blind"] is True and out["blind_input"] == "image"
    assert none["blind"] is True and none["blind_input"] == "no_image"
    assert {"accuracy_lenient", "correct_lenient"} <= set(out) and out["n"] == none["n"] == 4


@need_easy_vqa
def test_cli_eval_prints_strict_and_lenient(model, tmp_path: Path, capsys) -> None:
    folder = model.save_pretrained(tmp_path / "saved")
    code = main(["eval", str(folder), "--task", "easy-vqa", "--limit", "4", "--batch-size", "4",
                 "--max-new-tokens", "2", "--blind", "no-image"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(lines) == 5
    item, last = json.loads(lines[0]), json.loads(lines[-1])
    assert {"correct", "correct_lenient"} <= set(item)
    assert last["blind_input"] == "no_image" and 0.0 <= last["accuracy"] <= last["accuracy_lenient"] <= 1.0
