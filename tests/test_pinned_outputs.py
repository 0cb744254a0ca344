"""The shipped default model answers and draws exactly as recorded (tests/fixtures/pinned/default_model_outputs.json).

The record holds its greedy answers to the first 200 easy-VQA test questions (batches of 16, 8 new tokens) and the
SHA-256 of the pixels it draws for three requests with seed 7. Any change that alters a token or a pixel fails here.
A deliberate change of outputs rerecords the file (``python tests/fixtures/pinned/record.py``) and says why in
CHANGELOG.md.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from mmhub.data.easy_vqa import SOURCE
from mmhub.demo_model import find_default

PINNED = Path(__file__).parent / "fixtures" / "pinned"
sys.path.insert(0, str(PINNED))
from record import drawings, easy_vqa_answers  # noqa: E402  (the recorder's own procedure, defined once)

from conftest import easy_vqa_here  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def record() -> dict:
    return json.loads((PINNED / "default_model_outputs.json").read_text())


@pytest.fixture(scope="module")
def model(record: dict):
    if not easy_vqa_here() and not os.environ.get("MMHUB_REQUIRE_REAL_WEIGHTS"):
        pytest.skip(f"easy-VQA is not here; `mmhub weights fetch {SOURCE}` gets it")
    if find_default().name != record["model"]:
        pytest.skip(f"the default model here is {find_default().name}, the record is for {record['model']}")
    from mmhub.loading import load_default

    return load_default()


def test_answers_to_the_first_200_questions_are_unchanged(model, record: dict) -> None:
    got = easy_vqa_answers(model)
    changed = [(r["id"], r["prediction"], g["prediction"])
               for r, g in zip(record["easy_vqa_test_first_200"], got, strict=False) if r != g]
    assert len(got) == len(record["easy_vqa_test_first_200"]) == 200
    assert not changed, f"{len(changed)} of 200 answers changed (id, recorded, now): {changed[:5]}"


def test_drawings_for_a_fixed_seed_are_unchanged(model, record: dict) -> None:
    assert drawings(model) == record["drawings"]
