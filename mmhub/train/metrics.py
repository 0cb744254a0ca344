"""Where a stage's numbers go: ``metrics.jsonl`` (and TensorBoard when installed) and a progress bar.

`StageLogger` turns each optimizer step into a metrics record (loss, lr, count, skipped samples,
the objective's extra numbers), writes every ``log_every``-th one with the samples/s since the
last write, and moves the progress bar.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from mmhub.train.loop import Progress, StepResult


class Metrics:
    """metrics.jsonl (appended, flushed per line) plus TensorBoard when it is installed."""

    def __init__(self, folder: Path, enabled: bool):
        self.enabled = enabled
        self.path = folder / "metrics.jsonl"
        self.tb = None
        if enabled:
            folder.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter  # reason: tensorboard is optional

                self.tb = SummaryWriter(str(folder / "tensorboard"))
            except Exception:  # noqa: BLE001 - a missing or broken tensorboard only disables it
                self.tb = None

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{record.get('stage', 'train')}/{k}", v, record["step"])


class StageLogger:
    """Per-step records of one stage: written every ``log_every`` steps and at the last, shown on the progress bar."""

    def __init__(self, metrics: Metrics, stage: str, log_every: int, total: int, count_key: str, bar: Any):
        self.metrics, self.stage, self.log_every, self.total = metrics, stage, log_every, total
        self.count_key, self.bar = count_key, bar
        self.t0, self.window_samples = time.perf_counter(), 0
        self.last: dict[str, Any] = {}

    def step(self, progress: Progress, result: StepResult, lr: float, skipped: int) -> None:
        self.window_samples += result.used
        gstep = progress.global_step
        self.last = {"stage": self.stage, "step": gstep, "total": self.total, "time": round(time.time(), 3),
                     "epoch": progress.epoch,
                     "loss": result.loss, "lr": lr, self.count_key: result.count, "skipped": skipped, **result.stats}
        if result.grad_norm is not None:
            self.last["grad_norm"] = result.grad_norm
        if gstep % self.log_every == 0 or gstep == self.total:
            dt = time.perf_counter() - self.t0
            self.last["samples_per_s"] = self.window_samples / dt if dt > 0 else 0.0
            self.metrics.log(self.last)
            self.t0, self.window_samples = time.perf_counter(), 0
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{self.last['loss']:.4f}", lr=f"{lr:.2e}",
                                 **({"samples/s": f"{self.last['samples_per_s']:.1f}"} if "samples_per_s" in self.last
                                    else {}))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def progress_bar(total: int, start: int, name: str) -> Any:
    """A tqdm bar on a terminal (or with MMHUB_PROGRESS=1); None without tqdm."""
    try:
        from tqdm.auto import tqdm  # reason: tqdm is optional
    except ImportError:
        return None
    return tqdm(total=total, initial=start, desc=f"stage {name}", dynamic_ncols=True, disable=not os.isatty(2) and
                os.environ.get("MMHUB_PROGRESS") != "1")
