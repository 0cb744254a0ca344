"""Hostile input to `mmhub train`: text the tokenizer cannot take, --max-steps across a resume, leftovers of
interrupted saves, damaged checkpoints and run folders. Each gives a skip, a fallback or a named error, never a
traceback."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmhub.errors import CheckpointError, InputError, MMHubError

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "helpers"))
import train_script  # noqa: E402


class _Stop(Exception):
    """Stands in for a kill: raised once the run has saved the checkpoint of step `at`."""


def _one_stage(max_steps: int = 6, **extra) -> dict:
    spec = train_script.spec(8)
    spec["stages"] = spec["stages"][:1]
    spec["stages"][0].update(max_steps=max_steps, **extra)
    return spec


def _stopped_run(out: Path, monkeypatch, at: int, **train_kw) -> None:
    """Train `out` (one stage, 6 steps, a checkpoint every 2) and stop it right after step `at`."""
    import mmhub.train.loop as loop
    from mmhub.train.run import train

    real = loop.optimizer_step

    def step(lp, batches, used):
        if lp.progress.global_step == at:
            raise _Stop
        return real(lp, batches, used)

    monkeypatch.setattr(loop, "optimizer_step", step)
    with pytest.raises(_Stop):
        train(_one_stage(), out=out, datasets={"align": train_script.dataset(32)}, progress_bar=False, **train_kw)
    monkeypatch.setattr(loop, "optimizer_step", real)


def _resume(out: Path, **kw) -> dict:
    from mmhub.train.run import train

    return train(resume=out, datasets={"align": train_script.dataset(32)}, progress_bar=False, **kw)


def _params(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "align" / "model" / "model.safetensors"))


# -- text the tokenizer cannot take ------------------------------------------------------------------------------
def test_half_a_surrogate_pair_is_a_named_input_error() -> None:
    from mmhub import build

    model = build(_one_stage())
    msgs = [{"role": "user", "content": "<image>\nwhat \ud800colour?"}, {"role": "assistant", "content": "red"}]
    with pytest.raises(InputError, match=r"sample 5: text holds half a UTF-16 surrogate pair \(U\+D800\) at "
                                         r"character 13 of message 0 \('user'\)"):
        model.processor.encode(msgs, {"image": [object()]}, index=5, preprocess=False)


def test_a_training_row_with_a_lone_surrogate_is_skipped_and_counted(tmp_path: Path, capsys) -> None:
    from mmhub.data import Sample
    from mmhub.train.run import train

    data = train_script.dataset(16)
    data[4] = Sample("bad-\udfff-4", [data[4].messages[0], {"role": "assistant", "content": "It is \ud800red."}],
                     data[4].media)
    spec = _one_stage(max_steps=2, save_every=None, max_bad_fraction=0.2)
    summary = train(spec, out=tmp_path / "r", datasets={"align": data}, progress_bar=False)
    assert summary["align"]["skipped_by_reason"] == {"InputError": 1} and summary["align"]["steps"] == 2
    out = capsys.readouterr().out
    assert "preflight 'align': 16 samples checked, 1 with problems" in out
    assert "warning: skipped sample 4 (id 'bad-\\udfff-4'): sample 4: text holds half a UTF-16 surrogate pair " \
           "(U+D800) at character 6 of message 1 ('assistant')" in out


# -- --max-steps is kept by a resume ------------------------------------------------------------------------------
def test_max_steps_is_stored_and_kept_on_resume(tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "r"
    _stopped_run(out, monkeypatch, at=2, max_steps=3)
    assert json.loads((out / "run_settings.json").read_text()) == {"max_steps": 3}
    summary = _resume(out)
    assert summary["align"]["steps"] == 3, "the resumed run trained to the spec's 6 steps, not --max-steps 3"
    assert "resuming with the run's --max-steps 3" in capsys.readouterr().out


def test_an_explicit_max_steps_on_resume_overrides_and_says_so(tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "r"
    _stopped_run(out, monkeypatch, at=2, max_steps=3)
    assert _resume(out, max_steps=4)["align"]["steps"] == 4
    assert "--max-steps 4 overrides the run's --max-steps 3" in capsys.readouterr().out
    assert json.loads((out / "run_settings.json").read_text()) == {"max_steps": 4}
    with pytest.raises(MMHubError, match=r"--max-steps must be a whole number >= 1, got 0"):
        _resume(out, max_steps=0)


# -- leftovers of interrupted saves ------------------------------------------------------------------------------
def _leftover(folder: Path, name: str, age_s: float) -> Path:
    d = folder / name
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"partial")
    then = time.time() - age_s
    os.utime(d / "model.safetensors", (then, then))
    os.utime(d, (then, then))
    return d


def test_stale_temp_folders_are_cleaned_on_resume_and_live_ones_kept(tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "r"
    _stopped_run(out, monkeypatch, at=4)
    ckpts = out / "align" / "checkpoints"
    stale = [_leftover(ckpts, ".step-0000006.tmp-a1b2c3", 3600), _leftover(ckpts, ".step-0000002.old-d4e5f6", 3600),
             _leftover(out / "align", ".model.tmp-0f9e8d", 3600), _leftover(out, ".align.old-777", 3600)]
    live = _leftover(ckpts, ".step-0000008.tmp-live01", -60)  # changed after this process started: someone's write
    half_written = out / ".run_spec.json.k2j4_x9q"
    half_written.write_text('{"name": "trai')
    os.utime(half_written, (time.time() - 3600, time.time() - 3600))
    stale.append(half_written)
    capsys.readouterr()
    _resume(out)
    assert not any(p.exists() for p in stale) and live.exists()
    assert "removed 5 leftover(s) of interrupted saves" in capsys.readouterr().out
    assert (ckpts / "step-0000002" / "progress.json").is_file()


def test_a_save_killed_between_its_renames_is_put_back(tmp_path: Path) -> None:
    from mmhub.train.cleanup import clean_stale

    ckpts = tmp_path / "run" / "align" / "checkpoints"
    old = _leftover(ckpts, ".step-0000004.old-abcd1234", 60)
    tmp = _leftover(ckpts, ".step-0000004.tmp-efgh5678", 60)
    done = clean_stale(tmp_path / "run", before=time.time())  # a long-lived test process started before them
    assert (ckpts / "step-0000004" / "model.safetensors").read_bytes() == b"partial"
    assert not old.exists() and not tmp.exists() and done.removed == [tmp]
    assert "put back step-0000004 from .step-0000004.old-abcd1234" in str(done)


# -- damaged checkpoints and run folders ---------------------------------------------------------------------------
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "truncated weights": lambda c: _truncate(c / "model.safetensors"),
    "missing optimizer.json": lambda c: (c / "optimizer.json").unlink(),
    "missing optimizer tensors": lambda c: (c / "optimizer.safetensors").unlink(),
    "truncated optimizer tensors": lambda c: _truncate(c / "optimizer.safetensors"),
    "missing progress.json": lambda c: (c / "progress.json").unlink(),
    "truncated progress.json": lambda c: _truncate(c / "progress.json"),
    "corrupted rng state": lambda c: (c / "rng.json").write_text('{"python": 3}'),
    "corrupted scheduler state": lambda c: (c / "scheduler.json").write_text("{not json"),
    "optimizer state of another model": lambda c: (c / "optimizer.json").write_text('{"__dict__": []}'),
}


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> tuple[Path, Path]:
    """A run stopped after step 4 (checkpoints at steps 2 and 4) and the same run uninterrupted."""
    from mmhub.train.run import train

    mp = pytest.MonkeyPatch()
    base = tmp_path_factory.mktemp("hostile")
    _stopped_run(base / "stopped", mp, at=4)
    mp.undo()
    train(_one_stage(), out=base / "whole", datasets={"align": train_script.dataset(32)}, progress_bar=False)
    return base / "stopped", base / "whole"


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(stopped, tmp_path: Path, damage: str, capsys) -> None:
    run, whole = stopped
    out = tmp_path / "r"
    shutil.copytree(run, out)
    newest = out / "align" / "checkpoints" / "step-0000004"
    DAMAGE[damage](newest)
    summary = _resume(out)
    text = capsys.readouterr().out
    assert f"warning: checkpoint {newest} cannot be used" in text and "trying the one before it" in text
    assert "resumed stage 'align' from" in text and "step-0000002 (step 2)" in text
    assert summary["align"]["steps"] == 6
    a, b = _params(whole), _params(out)
    assert all(torch.equal(a[k], b[k]) for k in a), "resuming from the earlier checkpoint changed the result"


def test_every_checkpoint_damaged_is_a_named_error(stopped, tmp_path: Path) -> None:
    out = tmp_path / "r"
    shutil.copytree(stopped[0], out)
    for step in ("step-0000002", "step-0000004"):
        _truncate(out / "align" / "checkpoints" / step / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"none of the 2 checkpoint\(s\) in .* can be used; newest: .*"
                                              r"step-0000004/model.safetensors is damaged"):
        _resume(out)


@pytest.mark.parametrize("content", ['{"name": "trainer-test", "stag', "[1, 2]", "\xff\xfe"])
def test_a_damaged_run_spec_is_a_named_error(stopped, tmp_path: Path, content: str) -> None:
    out = tmp_path / "r"
    shutil.copytree(stopped[0], out)
    (out / "run_spec.json").write_bytes(content.encode("latin-1"))
    with pytest.raises(MMHubError, match=r"run_spec.json is damaged.*[pP]ut back the spec the run started with"):
        _resume(out)


def test_a_damaged_final_checkpoint_of_a_finished_stage_is_a_named_error(stopped, tmp_path: Path) -> None:
    from mmhub.train.run import train

    out = tmp_path / "r"
    shutil.copytree(stopped[1], out)
    two = _one_stage()
    two["stages"].append({**two["stages"][0], "name": "more", "max_steps": 1})
    final = out / "align" / "checkpoints" / "step-0000006"
    (final / "progress.json").unlink()  # the older step-4 would silently give other weights
    with pytest.raises(CheckpointError, match=r"stage 'align' is finished but its final checkpoint cannot be used: "
                                              r".*progress.json is missing.*Delete .*model"):
        train(two, resume=out, datasets={"align": train_script.dataset(32), "more": train_script.dataset(32)},
              progress_bar=False)
