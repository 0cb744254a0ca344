"""The Train and Runs tabs' logic (`mmhub.apps.train_runs`): a real `mmhub train` child started, watched, stopped
(graceful: a checkpoint), resumed and listed, without a browser."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml

from mmhub.apps.train_runs import (
    TrainRunner,
    curves,
    evaluate_run,
    log_tail,
    run_name,
    run_status,
    runs_table,
    stage_metrics,
    train_seconds,
)
from mmhub.errors import MMHubError

from conftest import TINY_SPEC


def _spec(steps: int) -> str:
    spec = json.loads(json.dumps(TINY_SPEC))
    spec["stages"] = [{"name": "align", "train": {"projectors": "full"}, "max_steps": steps, "batch_size": 2,
                       "lr": 1e-3, "log_every": 1, "save_every": 2,
                       "data": {"type": "easy_vqa", "split": "train", "task": "caption"}}]
    return yaml.safe_dump(spec)


def _wait(runner: TrainRunner, run: Path, until, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        runner.poll()
        if until():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out; log:\n{log_tail(run, 40)}")


def test_a_run_is_started_watched_stopped_resumed_and_listed(tmp_path: Path) -> None:
    from mmhub import weights
    from mmhub.data.easy_vqa import SOURCE
    from mmhub.errors import WeightsNotFoundError

    try:
        weights.resolve(SOURCE)
    except WeightsNotFoundError:
        if os.environ.get("MMHUB_REQUIRE_REAL_WEIGHTS") == "1":
            raise
        pytest.skip(f"easy-VQA is not here: `mmhub weights fetch {SOURCE}`")
    runner = TrainRunner(tmp_path)
    assert runner.start(_spec(400), "first") == "first started"
    assert "queued" in runner.start(_spec(4), "second")  # one at a time
    assert {"first", "second"} <= {r[0] for r in runs_table(tmp_path)}  # listed before the trainer writes anything
    run = tmp_path / "first"
    _wait(runner, run, lambda: run_status(run)["step"] >= 3)
    st = run_status(run)
    assert st["stage"] == "align" and st["total"] == 400 and 0 < st["progress"] < 1 and st["eta_s"] > 0
    assert st["grad_norm"] is not None and st["loss"] is not None
    assert "stopping first" in runner.stop(run)
    _wait(runner, run, lambda: str(run) not in runner.running)
    assert "stopped in stage 'align' after step" in log_tail(run)
    stopped_at = run_status(run)["step"]
    assert (run / "align" / "checkpoints" / f"step-{stopped_at:07d}" / "progress.json").is_file()
    second = tmp_path / "second"  # the queued run started when the first ended
    _wait(runner, second, lambda: (second / "align" / "model").is_dir() and str(second) not in runner.running)
    rows = {r[0]: r for r in runs_table(tmp_path)}
    assert rows["second"][2] == "1/1" and rows["second"][3] == 4 and rows["first"][2] == "0/1"
    assert rows["first"][7].endswith("s") and train_seconds(stage_metrics(run)) > 0
    import mmhub

    text, record = evaluate_run(mmhub.load(second / "align" / "model"), second, "align", "easy_vqa", limit=4,
                                blind=True)
    assert record["n"] == 4 and 0 <= record["blind_accuracy"] <= 1 and set(record["per_type"]) <= {
        "shape", "color", "yes_no"}
    assert text.startswith("**second / align, easy_vqa** on 4 items: strict") and "blind" in text
    assert json.loads((second / "align" / "eval.json").read_text())["easy_vqa"] == record
    assert {r[0]: r for r in runs_table(tmp_path)}["second"][5] == f"align easy_vqa: {record['accuracy']:.1%}"
    points = curves([run, second])
    assert {p["run"] for p in points} == {"first", "second"} and all("loss" in p for p in points)
    assert "first started" in runner.resume(run) or "queued" in runner.resume(run)
    _wait(runner, run, lambda: run_status(run)["step"] > stopped_at)
    assert "resumed stage 'align'" in log_tail(run, 60)
    runner.stop(run)
    _wait(runner, run, lambda: str(run) not in runner.running)


def test_bad_specs_and_names_are_refused_before_anything_starts(tmp_path: Path) -> None:
    runner = TrainRunner(tmp_path)
    with pytest.raises(MMHubError, match="hf_causal_lmm"):
        runner.start("name: x\nbackbone: {type: hf_causal_lmm}\nstages: [{name: a}]\n", "bad")
    with pytest.raises(MMHubError, match="has no stages"):
        runner.start(yaml.safe_dump({k: v for k, v in TINY_SPEC.items() if k != "stages"}), "nostages")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "nostages").exists()
    assert run_name("../../escape") == "escape" and run_name("a/b c") == "abc"  # stays inside the runs directory
    assert run_name("..").startswith("run-") and run_name(None).startswith("run-")
    with pytest.raises(MMHubError, match="not a run folder"):
        runner.resume(tmp_path / "nothing")


def test_skipped_samples_are_shown_with_their_reasons(tmp_path: Path) -> None:
    from mmhub.apps.train_runs import skip_reasons

    (tmp_path / "train.log").write_text("stage 'align': trains 8 parameters\n"
                                        "warning: skipped sample 3 (s3): missing_file: pics/gone.png\n"
                                        "step 5: loss 1.2\n"
                                        "warning: skipped sample 9 (s9): placeholder_mismatch: 2 <image> for 1\n")
    assert skip_reasons(tmp_path) == ["sample 3 (s3): missing_file: pics/gone.png",
                                      "sample 9 (s9): placeholder_mismatch: 2 <image> for 1"]
    assert skip_reasons(tmp_path, n=1) == ["sample 9 (s9): placeholder_mismatch: 2 <image> for 1"]
    assert skip_reasons(tmp_path / "none") == []
