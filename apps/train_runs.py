"""The Train and Runs tabs' logic: `mmhub train` as a child process, its progress read back from the run folder.

`TrainRunner` starts the same `mmhub train SPEC --out RUN` a terminal would (a child process: the page stays
responsive and a crash cannot take the server down), one at a time (others wait in a queue), with its output in
``RUN/train.log``; Stop sends SIGTERM, on which the trainer finishes the running step, writes a checkpoint and exits
(`mmhub.train.trainer`), and Resume runs ``mmhub train --resume RUN``. `run_status` reads a run folder's
``metrics.jsonl`` files (per stage: loss, learning rate, gradient norm, skipped samples, step and total, throughput)
into progress, ETA and curves; `runs_table` lists the run folders under a directory. Nothing here raises into the
UI: problems come back as text.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmhub.errors import MMHubError

LOG_FILE = "train.log"
SPEC_FILE = "run_spec.json"  # written by the trainer into every run folder
START_SPEC = "spec.json"  # written by the Train tab when it starts (or queues) a run
EVAL_FILE = "eval.json"  # RUN/STAGE/eval.json: the Runs tab's evaluations, task -> scores


def stage_metrics(run: Path) -> dict[str, list[dict[str, Any]]]:
    """Per stage (in the run spec's order), its step records from ``metrics.jsonl`` (unreadable lines skipped)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for name in _stage_names(run):
        file = run / name / "metrics.jsonl"
        rows = []
        if file.is_file():
            for line in file.read_text(errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line being written
                if isinstance(rec, dict) and "loss" in rec:
                    rows.append(rec)
        out[name] = rows
    return out


def _spec_file(run: Path) -> Path | None:
    """The run's spec: the trainer's ``run_spec.json``, or, before the trainer has written it (a run just started
    or queued), the Train tab's ``spec.json``; None for a folder that is no run."""
    for name in (SPEC_FILE, START_SPEC):
        if (run / name).is_file():
            return run / name
    return None


def _stage_names(run: Path) -> list[str]:
    try:
        spec = json.loads(_spec_file(run).read_text())  # type: ignore[union-attr]
        return [s["name"] for s in spec.get("stages", [])]
    except (OSError, ValueError, KeyError, TypeError):
        return sorted(p.name for p in run.iterdir() if (p / "metrics.jsonl").is_file()) if run.is_dir() else []


def run_status(run: Path, metrics: dict[str, list[dict[str, Any]]] | None = None) -> dict[str, Any]:
    """Where a run stands: the stage running (or last), its step and total, progress, ETA, stages done, last loss.
    `metrics`: the run's `stage_metrics`, when the caller has read them already."""
    metrics = stage_metrics(run) if metrics is None else metrics
    done = [s for s in metrics if (run / s / "model").is_dir()]
    current = next((s for s in metrics if s not in done), None)
    rows = metrics.get(current or (done[-1] if done else ""), [])
    last = rows[-1] if rows else {}
    step, total = int(last.get("step", 0)), int(last.get("total", 0) or 0)
    timed = [r for r in rows if isinstance(r.get("time"), (int, float))]
    per_step = eta = None
    if len(timed) >= 2 and timed[-1]["step"] > timed[0]["step"]:
        per_step = (timed[-1]["time"] - timed[0]["time"]) / (timed[-1]["step"] - timed[0]["step"])
        eta = max(0.0, (total - step) * per_step) if total else None
    return {"run": str(run), "stages": list(metrics), "done": done, "stage": current, "step": step, "total": total,
            "progress": (step / total) if total else (1.0 if current is None and done else 0.0),
            "loss": last.get("loss"), "lr": last.get("lr"), "grad_norm": last.get("grad_norm"),
            "skipped": last.get("skipped", 0), "samples_per_s": last.get("samples_per_s"), "eta_s": eta,
            "per_step_s": per_step}


def train_seconds(metrics: dict[str, list[dict[str, Any]]], gap_s: float = 300.0) -> float:
    """Seconds spent training: the sum of the gaps between consecutive metric records of each stage, leaving out
    gaps longer than `gap_s` (a run stopped and resumed later)."""
    total = 0.0
    for rows in metrics.values():
        times = [r["time"] for r in rows if isinstance(r.get("time"), (int, float))]
        total += sum(b - a for a, b in zip(times[:-1], times[1:], strict=True) if 0 < b - a <= gap_s)
    return total


def curves(runs: list[Path], key: str = "loss") -> list[dict[str, Any]]:
    """Rows for a line plot of `key` against the run's cumulative step (stages one after another), per run."""
    return [row for run in runs for row in curve(run.name, stage_metrics(run), key)]


def curve(name: str, metrics: dict[str, list[dict[str, Any]]], key: str) -> list[dict[str, Any]]:
    """One run's rows of `curves`, from its `stage_metrics`."""
    rows, offset = [], 0
    for stage, recs in metrics.items():
        for r in recs:
            if r.get(key) is not None:
                rows.append({"step": offset + int(r["step"]), key: float(r[key]), "run": name, "stage": stage})
        offset += int(recs[-1]["step"]) if recs else 0
    return rows


def runs_table(folder: Path) -> list[list[Any]]:
    """One row per run folder under `folder`: name, spec, stages done / all, steps, final loss, eval, last change,
    time spent training (`train_seconds`)."""
    table = []
    if not folder.is_dir():
        return table
    for run in sorted((p for p in folder.iterdir() if _spec_file(p) is not None), key=lambda p: p.stat().st_mtime,
                      reverse=True):
        metrics = stage_metrics(run)
        st = run_status(run, metrics)
        try:
            name = json.loads(_spec_file(run).read_text()).get("name", "?")  # type: ignore[union-attr]
        except (OSError, ValueError, AttributeError):
            name = "?"
        steps = sum(int(r[-1]["step"]) for r in metrics.values() if r)
        scores = [f"{stage} {task}: {r['accuracy']:.1%}" for stage in st["done"]
                  for task, r in eval_scores(run, stage).items() if isinstance(r.get("accuracy"), (int, float))]
        changed = time.strftime("%Y-%m-%d %H:%M", time.localtime(run.stat().st_mtime))
        took = train_seconds(metrics)
        table.append([run.name, name, f"{len(st['done'])}/{len(st['stages'])}", steps,
                      None if st["loss"] is None else round(float(st["loss"]), 4), "; ".join(scores), changed,
                      f"{int(took // 60)}m{int(took % 60):02d}s"])
    return table


def eval_scores(run: Path, stage: str) -> dict[str, dict[str, Any]]:
    """The evaluations recorded for a run's stage (``RUN/STAGE/eval.json``: task -> scores); {} when none."""
    file = run / stage / EVAL_FILE
    try:
        found = json.loads(file.read_text()) if file.is_file() else {}
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def evaluate_run(model: Any, run: Path, stage: str, task: str, limit: int | None = None,
                 blind: bool = False) -> tuple[str, dict[str, Any]]:
    """Evaluate a run's stage model with an eval task plugin (strict and lenient scores; with `blind`, the same
    questions again without the picture: how much the model uses it), record the scores in ``RUN/STAGE/eval.json``
    (the Runs table shows them) and return a Markdown summary and the record."""
    from mmhub.atomic import write_text_atomic
    from mmhub.evaluation import evaluate

    result = evaluate(model, task, limit=limit)
    record: dict[str, Any] = {"accuracy": result["accuracy"], "accuracy_lenient": result.get("accuracy_lenient"),
                              "n": result["n"], "limit": limit,
                              "per_type": {t: v.get("accuracy") if isinstance(v, dict) else v
                                           for t, v in (result.get("per_type") or {}).items()}}
    if blind:
        record["blind_accuracy"] = evaluate(model, task, limit=limit, blind=True)["accuracy"]
    recorded = {**eval_scores(run, stage), task: record}
    write_text_atomic(run / stage / EVAL_FILE, json.dumps(recorded, indent=1) + "\n")
    lenient = record["accuracy_lenient"]
    lines = [f"**{run.name} / {stage}, {task}** on {record['n']} items: strict **{record['accuracy']:.1%}**"
             + (f", lenient {lenient:.1%}" if isinstance(lenient, (int, float)) else "")
             + (f", blind {record['blind_accuracy']:.1%} (gap {record['accuracy'] - record['blind_accuracy']:+.1%})"
                if blind else "")]
    lines += [f"- {t}: {v:.1%}" for t, v in record["per_type"].items() if isinstance(v, (int, float))]
    return "\n".join(lines), record


def log_tail(run: Path, lines: int = 20) -> str:
    file = run / LOG_FILE
    if not file.is_file():
        return ""
    return "\n".join(file.read_text(errors="replace").splitlines()[-lines:])


def skip_reasons(run: Path, n: int = 3) -> list[str]:
    """The last `n` samples the run skipped, as its log words them (index, id and what was wrong with each)."""
    file = run / LOG_FILE
    if not file.is_file():
        return []
    found = [line.split("warning: skipped ", 1)[1].strip() for line in file.read_text(errors="replace").splitlines()
             if "warning: skipped " in line]
    return found[-n:]


def run_name(name: str | None) -> str:
    """A plain folder name inside the runs directory: letters, digits, - _ . only, no leading dot (".." would leave
    it); a time-stamped name when nothing is left."""
    return "".join(c for c in (name or "").strip() if c.isalnum() or c in "-_.").lstrip(".") \
        or time.strftime("run-%H%M%S")


@dataclass
class _Job:
    run: Path
    args: list[str]


@dataclass
class TrainRunner:
    """One `mmhub train` child at a time (`max_running`), the rest queued; stop and resume by run folder."""

    runs_dir: Path
    max_running: int = 1
    running: dict[str, subprocess.Popen] = field(default_factory=dict)
    queue: deque = field(default_factory=deque)

    def start(self, spec_text: str, name: str) -> str:
        """Write the spec into a new run folder and train it (or queue it); returns what happened."""
        from mmhub.apps.assemble import validate
        from mmhub.spec import parse_text

        name = run_name(name)
        run = self.runs_dir / name
        if run.exists():
            raise MMHubError(f"a run named {name!r} exists in {self.runs_dir}; pick another name or resume it")
        data = parse_text(spec_text, "the spec box")
        ok, message = validate(spec_text)  # every spec problem (unknown types, widths, weights) before anything starts
        if not ok:
            raise MMHubError(message.replace("**", ""))
        if not data.get("stages"):
            raise MMHubError("the spec has no stages; add stages: [{name: ..., train: ..., data: ...}]")
        run.mkdir(parents=True)
        (run / START_SPEC).write_text(json.dumps(data, indent=2))
        return self._submit(_Job(run, ["train", str(run / START_SPEC), "--out", str(run), "--no-progress"]))

    def resume(self, run: Path) -> str:
        if not (run / SPEC_FILE).is_file():
            raise MMHubError(f"{run} is not a run folder (no {SPEC_FILE}); pick one from the runs table")
        if str(run) in self.running:
            raise MMHubError(f"{run.name} is running")
        return self._submit(_Job(run, ["train", "--resume", str(run), "--no-progress"]))

    def stop(self, run: Path) -> str:
        """Ask the run to stop after its current step (SIGTERM; the trainer writes a checkpoint first)."""
        proc = self.running.get(str(run))
        if proc is None or proc.poll() is not None:
            return f"{run.name} is not running"
        proc.send_signal(signal.SIGTERM)
        return f"stopping {run.name} after its current step (a checkpoint is written; Resume continues it)"

    def poll(self) -> dict[str, int | None]:
        """Reap finished children, start queued runs; returns each known run's exit code (None: running)."""
        codes = {k: p.poll() for k, p in self.running.items()}
        for k, code in codes.items():
            if code is not None:
                del self.running[k]
        while self.queue and len(self.running) < self.max_running:
            self._launch(self.queue.popleft())
        return codes

    def _submit(self, job: _Job) -> str:
        self.poll()
        if len(self.running) >= self.max_running:
            self.queue.append(job)
            return f"{job.run.name} queued ({len(self.queue)} waiting; {len(self.running)} running)"
        self._launch(job)
        return f"{job.run.name} started"

    def _launch(self, job: _Job) -> None:
        log = open(job.run / LOG_FILE, "a")  # noqa: SIM115 (the child keeps it; closed when the child ends)
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}
        self.running[str(job.run)] = subprocess.Popen([sys.executable, "-m", "mmhub.cli", *job.args], stdout=log,
                                                      stderr=subprocess.STDOUT, env=env, cwd=str(job.run.parent))
        log.close()
