"""Non-easy-VQA pictures for refusal training: never a held-out photo, always answered with the refusal."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pytest

from mmhub.data import load_dataset
from mmhub.data.easy_vqa import SOURCE
from mmhub.data.negatives import KINDS, REFUSAL, SIZE, TRAIN_PHOTOS, negative_image, open_question
from mmhub.evaluation.refusal import is_refusal
from mmhub.weights import resolve

HELDOUT = Path(__file__).resolve().parents[1] / "mmhub" / "recipes" / "heldout" / "photos.json"


def _easy_vqa_available() -> bool:
    try:
        resolve(SOURCE)
        return True
    except Exception:  # noqa: BLE001 - the data is fetched by `make weights`
        return False


def test_train_photos_are_never_held_out_photos() -> None:
    spec = json.loads(HELDOUT.read_text())
    held = {p["source"] for p in spec["held_out"]} | {a for p in spec["held_out"] for a in p.get("aliases", [])}
    assert held and not held & set(TRAIN_PHOTOS)
    assert set(TRAIN_PHOTOS) == {p["source"] for p in spec["train_negatives"]}


def test_negative_images_of_every_kind_and_the_refusal_is_detected() -> None:
    pytest.importorskip("skimage")
    rng = np.random.default_rng(0)
    seen = collections.Counter()
    for _ in range(60):
        kind, im = negative_image(rng)
        seen[kind] += 1
        assert im.mode == "RGB" and im.size == (SIZE, SIZE)
    assert set(seen) == set(KINDS), seen
    _, a = negative_image(np.random.default_rng(5))
    _, b = negative_image(np.random.default_rng(5))
    assert np.array_equal(np.asarray(a), np.asarray(b))  # seeded
    kinds = {negative_image(np.random.default_rng(i), photos=())[0] for i in range(40)}
    assert "photo" not in kinds  # no photos given: synthetic kinds only
    assert is_refusal(REFUSAL)
    questions = {open_question(np.random.default_rng(i)) for i in range(50)}
    assert len(questions) > 20


@pytest.mark.skipif(not _easy_vqa_available(), reason="easy-VQA's data is fetched by `make weights`")
def test_varied_dataset_mixes_negatives_answered_with_the_refusal() -> None:
    pytest.importorskip("skimage")
    data = load_dataset({"type": "easy_vqa_varied", "samples": 400, "negatives": 0.2})
    kinds = collections.Counter(data[i].meta["kind"] for i in range(400))
    assert 50 <= kinds["negative"] <= 110, kinds  # 20% of 400, +-4 sigma
    for i in range(400):
        s = data[i]
        if s.meta["kind"] == "negative":
            assert s.messages[-1]["content"] == REFUSAL and s.messages[0]["content"].startswith("<image>\n")
            assert not s.problems()
        else:
            assert all(m["content"] != REFUSAL for m in s.messages)
    plain = load_dataset({"type": "easy_vqa_varied", "samples": 50})
    assert not any(plain[i].meta["kind"] == "negative" for i in range(50))
    with pytest.raises(Exception, match="photo source"):
        load_dataset({"type": "easy_vqa_varied", "samples": 5, "negatives": 0.1, "negative_photos": ["skimage:nope"]})
