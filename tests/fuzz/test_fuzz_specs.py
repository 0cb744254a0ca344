"""Fuzzed specs end in success or a clean MMHubError: never a traceback, a hang, a read outside or code execution.

A fixed-seed sample of what ``python -m benchmarks.fuzz`` runs by the thousand (docs/reliability.md)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.fuzz import specs
from benchmarks.fuzz.outcome import run_case

PRESETS = specs.presets()
NAMES = sorted(PRESETS)


@settings(max_examples=120, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**32 - 1), which=st.integers(0, len(NAMES) - 1), edits=st.integers(1, 3),
       assemble=st.integers(0, 5))
def test_mutated_presets_never_crash(seed: int, which: int, edits: int, assemble: int) -> None:
    spec = specs.mutate(PRESETS[NAMES[which]], random.Random(seed), n=edits)
    outcome = run_case("specs", f"{NAMES[which]}#{seed}", lambda: specs.check_dict(spec, assemble == 0), 60)
    assert not outcome.failed, (outcome, spec)


@pytest.mark.parametrize("name", sorted(specs.hostile_files(PRESETS["llava-1.5:tiny"])))
def test_hostile_spec_files_are_refused_cleanly(name: str, tmp_path: Path) -> None:
    path = tmp_path / f"{name}.yaml"
    path.write_bytes(specs.hostile_files(PRESETS["llava-1.5:tiny"])[name])
    outcome = run_case("hostile_specs", name, lambda: specs.check_file(path, assemble=True), 60)
    assert not outcome.failed, outcome
