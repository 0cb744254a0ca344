"""Bad uploads and hostile chat messages end in a message for the page, never a traceback (the demo's checks and
the model's tokenization, on the shipped easy-VQA tiny model)."""

from __future__ import annotations

import pytest

from benchmarks.fuzz import uploads
from benchmarks.fuzz.cases import upload_cases
from benchmarks.fuzz.outcome import run_case

N = 2 * (len(uploads.FILES) + len(uploads.PROMPTS))  # every kind twice, with different random bytes


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> list:
    return list(upload_cases(N, 0, tmp_path_factory.mktemp("fuzz-uploads")))


@pytest.mark.parametrize("index", range(N))
def test_every_bad_upload_or_prompt_ends_cleanly(index: int, cases: list) -> None:
    name, fn = cases[index]
    outcome = run_case("uploads", name, fn, 60)
    assert not outcome.failed, outcome
