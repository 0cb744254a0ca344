"""The one training loop: micro-batches -> objective -> backward -> one token-weighted optimizer step, repeated.

`run_loop` drives a `Loop` until ``total`` optimizer steps are done: it asks ``next_batches``
for the step's micro-batches, lets the objective compute each summed loss, backpropagates
(no gradient sync but for the last micro-batch), divides the gradients by the step's global
count (so one process with batch 8 and two with batch 4 make the same update), clips, steps,
then hands the step to ``after_step`` (metrics, EMA, ...) and saves when ``save_due``. A step
whose loss is not finite is skipped; ``MAX_NAN_STEPS`` in a row stop the run. The position in
the data lives in `Progress`, which checkpoints store as JSON, so a run resumes exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from mmhub.errors import MMHubError
from mmhub.train.objectives import Objective

MAX_NAN_STEPS = 10


@dataclass
class Progress:
    """Where a stage stands: stored in every checkpoint's ``progress.json``."""

    stage: str
    stage_index: int
    epoch: int = 0
    batch_in_epoch: int = 0
    global_step: int = 0
    samples_seen: int = 0
    skipped: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> Progress:
        return cls(**{f.name: record[f.name] for f in fields(cls) if f.name in record})


@dataclass
class StepResult:
    """One finished optimizer step: its summed loss, global count and the samples it used."""

    loss_sum: float
    count: int
    used: int
    stats: dict[str, float] = field(default_factory=dict)
    grad_norm: float | None = None  # the gradients' global norm before clipping (None when the stage does not clip)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.count, 1)


@dataclass
class Loop:
    """Everything `run_loop` needs; the callbacks carry what differs between a stage and a recipe."""

    model: Any  # what the objective calls (the accelerate-wrapped model)
    objective: Objective
    optimizer: Any
    scheduler: Any  # get_last_lr() -> [lr], step()
    accelerator: Any
    stage: Any  # handed to the objective (a StageSpec, or a recipe's settings)
    total: int
    max_grad_norm: float | None
    progress: Progress
    next_batches: Callable[[Progress], tuple[list[dict[str, Any]], int]]
    after_step: Callable[[Progress, StepResult, float], None]
    save: Callable[[Progress], None]
    save_due: Callable[[int], bool]
    log: Callable[[str], None] = print
    out_of_memory: Callable[[Progress, BaseException], None] | None = None  # raise a named error; None: re-raise
    stop_requested: Callable[[], bool] | None = None  # asked after each step: save a checkpoint and stop
    clip_params: list[torch.nn.Parameter] | None = None  # what max_grad_norm clips (default: the optimizer's)
    nan_steps: int = 0


class SingleProcess:
    """The accelerator interface the loop uses, for one process without mixed precision (a recipe's own model)."""

    num_processes = 1
    device = torch.device("cpu")
    optimizer_step_was_skipped = False  # no loss scaler: every step is taken

    def no_sync(self, model: Any) -> nullcontext:
        return nullcontext()

    def autocast(self) -> nullcontext:
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return tensor

    def clip_grad_norm_(self, params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)


class TrainingStopped(Exception):
    """A stop was asked for (SIGTERM, or the web UI's Stop): the step's checkpoint is written; `step` is where."""

    def __init__(self, step: int) -> None:
        super().__init__(f"stopped after step {step}")
        self.step = step


def run_loop(loop: Loop) -> None:
    """Optimizer steps until ``loop.total``; the progress record advances in place."""
    progress = loop.progress
    while progress.global_step < loop.total:
        try:
            batches, used = loop.next_batches(progress)
            result = optimizer_step(loop, batches, used)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if loop.out_of_memory is None or not is_out_of_memory(exc):
                raise
            loop.out_of_memory(progress, exc)
            raise
        progress.batch_in_epoch += 1
        progress.samples_seen += used
        if not math.isfinite(result.loss_sum):
            _skip_nonfinite(loop)
            continue
        loop.nan_steps = 0
        progress.global_step += 1
        lr = loop.scheduler.get_last_lr()[0]
        if not loop.accelerator.optimizer_step_was_skipped:  # fp16 loss scaling skips overflowing steps
            loop.scheduler.step()
        loop.after_step(progress, result, lr)
        if loop.stop_requested is not None and progress.global_step < loop.total and loop.stop_requested():
            loop.save(progress)
            raise TrainingStopped(progress.global_step)
        if loop.save_due(progress.global_step):
            loop.save(progress)


def optimizer_step(loop: Loop, batches: list[dict[str, Any]], used: int) -> StepResult:
    """Backpropagate every micro-batch's summed loss, scale the gradients by world / global count, clip, step."""
    if getattr(loop.accelerator, "counts_first", False):
        return counted_step(loop, batches, used)
    acc, wrapped, optimizer = loop.accelerator, loop.model, loop.optimizer
    world = acc.num_processes
    loss_total, count_local = 0.0, 0
    for k, batch in enumerate(batches):
        sync = acc.no_sync(wrapped) if k < len(batches) - 1 else nullcontext()
        with sync, acc.autocast():
            loss_sum, count = loop.objective.loss(wrapped, batch, loop.stage)
        acc.backward(loss_sum)
        loss_total += float(loss_sum.detach())
        count_local += count
    totals = torch.tensor([count_local, loss_total], dtype=torch.float64, device=acc.device)
    totals = acc.reduce(totals, reduction="sum") if world > 1 else totals
    n_global, loss_global = int(totals[0]), float(totals[1])
    stats = loop.objective.stats()
    if n_global == 0 or not math.isfinite(loss_global):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(float("nan") if n_global else 0.0, n_global, used, stats)
    scale = world / n_global  # DDP averaged the per-rank sums: undo that, then divide by the global count
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                p.grad.mul_(scale)
    norm = None
    if loop.max_grad_norm:
        params = loop.clip_params or [p for g in optimizer.param_groups for p in g["params"]]
        total_norm = acc.clip_grad_norm_(params, loop.max_grad_norm)
        norm = float(total_norm) if total_norm is not None else None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_global, n_global, used, stats, norm)


def counted_step(loop: Loop, batches: list[dict[str, Any]], used: int) -> StepResult:
    """The same update when an engine reduces, clips and steps inside its backward (DeepSpeed,
    `mmhub.train.deepspeed`): the global count is summed before the first backward (the objective counts each
    micro-batch from its labels) and every summed loss is backpropagated times world / global count. A micro-batch
    whose loss is not finite contributes no gradient (its backward is a zero loss, so every process still takes
    part in each reduction); the step goes ahead with the others and the log says how many were left out."""
    acc, wrapped, objective = loop.accelerator, loop.model, loop.objective
    module = getattr(wrapped, "module", wrapped)
    counts = [objective.count(module, batch) for batch in batches]
    n_global = int(acc.reduce(torch.tensor([float(sum(counts))], dtype=torch.float64, device=acc.device),
                              reduction="sum")[0]) if acc.num_processes > 1 else sum(counts)
    if n_global == 0:
        return StepResult(0.0, 0, used, objective.stats())
    scale = acc.num_processes / n_global
    loss_total, left_out = 0.0, 0
    for k, batch in enumerate(batches):
        with acc.autocast():
            loss_sum, count = objective.loss(wrapped, batch, loop.stage)
        if count != counts[k]:
            raise MMHubError(f"the objective counted {counts[k]} targets in a micro-batch before its forward and "
                             f"{count} after it; the DeepSpeed loop needs them equal (train this stage without "
                             "DeepSpeed, and report the batch that differs)")
        if not math.isfinite(float(loss_sum.detach())):
            left_out += count
            loss_sum = sum((p * 0.0).sum() for p in module.parameters() if p.requires_grad)
        else:
            loss_total += float(loss_sum.detach())
        acc.backward(loss_sum * scale, last=k == len(batches) - 1)
    totals = torch.tensor([loss_total, float(left_out)], dtype=torch.float64, device=acc.device)
    totals = acc.reduce(totals, reduction="sum") if acc.num_processes > 1 else totals
    loss_global, left_global = float(totals[0]), int(totals[1])
    if left_global:
        loop.log(f"step {loop.progress.global_step + 1}: {left_global} of {n_global} targets had a non-finite loss "
                 "and were left out of the step")
    if left_global == n_global:
        return StepResult(float("nan"), n_global, used, objective.stats())
    return StepResult(loss_global, n_global - left_global, used, objective.stats(), acc.grad_norm())


def _skip_nonfinite(loop: Loop) -> None:
    loop.nan_steps += 1
    loop.optimizer.zero_grad(set_to_none=True)
    loop.log(f"step {loop.progress.global_step}: non-finite loss, step skipped ({loop.nan_steps} in a row)")
    if loop.nan_steps >= MAX_NAN_STEPS:
        lr = getattr(loop.stage, "lr", None)
        raise MMHubError(f"stage {getattr(loop.stage, 'name', '?')!r}: {loop.nan_steps} steps in a row had a NaN/inf "
                         f"loss; lower lr ({lr}), check the data, or use precision fp32")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is an allocation failure (CUDA's OutOfMemoryError or the CPU allocator's RuntimeError)."""
    text = str(exc).lower()
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate" in text


def cosine_with_warmup(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """The LR factor: linear warmup to 1, then cosine decay to 0 at `total_steps`."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def epoch_order(n: int, seed: int, stage_index: int, epoch: int) -> list[int]:
    """The sample order of one epoch: a function of (seed, stage, epoch) only, so resuming replays it exactly."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + stage_index * 1009 + epoch)
    return torch.randperm(n, generator=g).tolist()
