"""Corrupted and hostile model folders load only when unchanged; everything else is a clean CheckpointError-style
message: no traceback, no hang, no read outside the folder, no code execution, no silently different weights."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from benchmarks.fuzz import folders
from benchmarks.fuzz.cases import folder_cases
from benchmarks.fuzz.outcome import run_case

KINDS = sorted(folders.DAMAGE) + sorted(folders.MALICE)


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict:
    where = tmp_path_factory.mktemp("fuzz-folders")
    return {name.split("#")[0]: (fn, changed) for name, fn, changed in folder_cases(len(KINDS), 0, where)}


@pytest.mark.parametrize("kind", KINDS)
def test_every_corruption_ends_cleanly(kind: str, cases: dict) -> None:
    fn, changed = cases[kind]
    outcome = run_case("folders", kind, fn, 60, changed=changed)
    assert not outcome.failed, outcome
    if kind in REACHES_OUT:  # loading these at all would read outside the folder or run its code
        assert outcome.result == "refused", outcome


REACHES_OUT = {k for k in folders.MALICE if k.startswith(("words_", "init_from_", "symlinked_", "remote_", "pickle_"))}


@pytest.mark.parametrize("seed", range(6))
def test_random_byte_flips_never_load_silently(seed: int, tmp_path: Path) -> None:
    from mmhub.loading import load_folder

    base = folders.base_folder(tmp_path)
    rng = random.Random(seed)
    target = folders.corrupt(base, tmp_path / "flipped", rng.choice(["flip_1_byte", "flip_100_bytes"]), rng,
                             tmp_path)
    outcome = run_case("folders", f"flip#{seed}", lambda: load_folder(target), 60)
    assert outcome.result == "refused", outcome
