"""Folders written by earlier mmhub code still load and compute the same outputs (tests/fixtures/saved_0_1)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from mmhub import MMModel

FIXTURES = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
from make_saved_0_1 import PROMPT, probe_image  # noqa: E402  (the fixture's own inputs, defined once)


def test_a_folder_saved_by_mmhub_0_1_loads_with_the_same_outputs() -> None:
    expected = json.loads((FIXTURES / "saved_0_1_expected.json").read_text())
    model = MMModel.from_pretrained(FIXTURES / "saved_0_1").eval()
    batch = model.batch([[{"role": "user", "content": PROMPT}, {"role": "assistant", "content": "a cat"}]],
                        [{"image": [probe_image()]}])
    with torch.no_grad():
        out = model(**batch)
    assert out.loss.item() == pytest.approx(expected["loss"], abs=1e-6)
    assert out.logits.double().sum().item() == pytest.approx(expected["logits_sum"], abs=1e-3)
    assert out.logits[0, 0, :8].tolist() == pytest.approx(expected["logits_first_row"], abs=1e-6)
    reply = model.generate([PROMPT], [{"image": [probe_image()]}], max_new_tokens=6)[0]
    assert getattr(reply, "text", reply) == expected["greedy_text"]
