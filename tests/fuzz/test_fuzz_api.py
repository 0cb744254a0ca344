"""Hostile `mmhub serve` request bodies end in a completion or an OpenAI-shaped 4xx, never a 500, and the server
keeps answering (benchmarks.fuzz.api_bodies: every kind, fixed seed, on the shipped easy-VQA tiny model)."""

from __future__ import annotations

import pytest

from benchmarks.fuzz import api_bodies
from benchmarks.fuzz.cases import APIClient, api_cases
from benchmarks.fuzz.outcome import run_case

N = 10 * len(api_bodies.KINDS)  # every kind ten times, with different random bytes


@pytest.fixture(scope="module")
def cases() -> list:
    client = APIClient()
    yield list(api_cases(N, 0, client))
    client.close()


@pytest.mark.parametrize("index", range(N))
def test_every_hostile_body_ends_cleanly(index: int, cases: list) -> None:
    name, fn = cases[index]
    outcome = run_case("api", name, fn, 60)
    assert not outcome.failed, outcome
