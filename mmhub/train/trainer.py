"""The stage trainer: runs a spec's stages in order on Hugging Face accelerate (DDP/FSDP/DeepSpeed via its configs).

Per stage, `Trainer.run_stage` sets up (`apply_stage` picks the trainable parameters; AdamW
with per-part learning rates; linear warmup then cosine decay; the stage's objective, see
`mmhub.train.objectives`), runs the one training loop (`mmhub.train.loop`: gradient
accumulation and clipping, fp32 / bf16 / fp16 through accelerate's mixed precision, the loss
token-weighted over the whole optimizer step) and finishes (final checkpoint, ``model/``,
summary).

The data order is a function of (seed, stage, epoch) alone, so a run can resume exactly from a
checkpoint: model, optimizer, scheduler, RNG and data position (`mmhub.train.state`). Frozen
encoders' outputs are cached on disk (`mmhub.train.feature_cache`). A sample that cannot be
used is skipped and counted (`mmhub.train.batches`); past ``max_bad_fraction`` the run stops
with the counts and examples. Metrics go to ``metrics.jsonl`` (and TensorBoard when
installed), a progress bar shows loss, lr and samples/s (`mmhub.train.metrics`).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed

from mmhub.assembly import build_from_plan
from mmhub.checkpoint import tensors_to_save
from mmhub.data.preflight import preflight
from mmhub.errors import CheckpointError, InputError, MMHubError
from mmhub.layout import set_row_layout
from mmhub.packing import length_grouped_order
from mmhub.regimes import slots
from mmhub.spec import StageSpec
from mmhub.train.batches import BadSamples, BatchBuilder
from mmhub.train.deepspeed import (
    DeepSpeedAccelerator,
    gathered_state,
    is_deepspeed,
    make_accelerator,
    partitions_parameters,
)
from mmhub.train.deepspeed import configure as configure_deepspeed
from mmhub.train.feature_cache import FeatureCache
from mmhub.train.fsdp import ShardedAccelerator, ShardedStage, full_optimizer_state, full_tensors
from mmhub.train.keep_states import Anchors, KeepStates, load_reference
from mmhub.train.loop import (
    Loop,
    Progress,
    StepResult,
    TrainingStopped,
    cosine_with_warmup,
    epoch_order,
    run_loop,
)
from mmhub.train.metrics import Metrics, StageLogger, progress_bar
from mmhub.train.objectives import Objective, objective_for
from mmhub.train.state import (
    STEP_PREFIX,
    checkpoints,
    load_checkpoint,
    load_newest,
    prune,
    read_progress,
    save_checkpoint,
    step_folders,
)
from mmhub.train.trainable import StagePlan, apply_stage, param_groups


@dataclass
class StageRun:
    """One stage in training: what setup builds, the loop advances and finish reports."""

    index: int
    stage: StageSpec
    folder: Path
    plan: StagePlan
    data: Any
    total: int
    per_step: int
    objective: Objective
    wrapped: Any
    optimizer: Any
    scheduler: Any
    progress: Progress
    caches: dict[str, FeatureCache]
    bad: BadSamples
    logger: StageLogger
    loop_accelerator: Any = None  # what the loop drives: the accelerator, or a sharded stage's interface
    sharded: Any = None  # mmhub.train.fsdp.ShardedStage when the stage shards slots
    orders: dict[int, list[int]] = field(default_factory=dict)  # the current epoch's sample order
    lengths: list[int] | None = None  # text lengths, measured once for group_by_length


class Trainer:
    """Runs the stages of an assembled model's spec; `run()` trains, `resume=True` continues a stopped run."""

    def __init__(self, model: Any, out_dir: str | Path, datasets: dict[str, Any] | None = None,
                 accelerator: Any = None, progress_bar: bool = True, log: Callable[[str], None] = print,
                 preflight: bool = True):
        self.model = model
        self.out = Path(out_dir)
        self.datasets = datasets or {}
        self.accelerator = accelerator or make_accelerator()
        self.progress_bar = progress_bar and self.accelerator.is_main_process
        self.preflight = preflight
        self.log = log if self.accelerator.is_main_process else (lambda *_: None)
        self._stop = False  # set by SIGTERM/SIGINT (`_ask_stop`): the running step finishes, a checkpoint is written

    # -- public --------------------------------------------------------------------
    def run(self, stage: str | None = None, resume: bool = False, max_steps: int | None = None) -> dict[str, Any]:
        """Train every stage in order (or only `stage`); returns per-stage summaries."""
        stages = self.model.spec.stages
        if not stages:
            raise MMHubError(f"spec {self.model.spec.name!r} has no stages; "
                             "add stages: [{name: ..., train: ..., data: ...}]")
        names = [s.name for s in stages]
        if stage is not None and stage not in names:
            from mmhub.errors import close_matches

            hint = close_matches(stage, names, n=1)
            raise MMHubError(f"no stage named {stage!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                             + f"; stages: {', '.join(names)}")
        summaries: dict[str, Any] = {}
        with self._stop_signals():
            self._run_stages(stages, names, stage, resume, max_steps, summaries)
        return summaries

    def _run_stages(self, stages: list[StageSpec], names: list[str], stage: str | None, resume: bool,
                    max_steps: int | None, summaries: dict[str, Any]) -> None:
        for i, st in enumerate(stages):
            stage_dir = self.out / st.name
            if stage is not None and st.name != stage:
                if names.index(st.name) < names.index(stage):
                    self._replay(i, st, stage_dir, require=False)
                continue
            if resume and (stage_dir / "model").is_dir():
                self._replay(i, st, stage_dir, require=True)
                self.log(f"stage {st.name!r} already complete in {stage_dir}; skipping")
                continue
            try:
                summaries[st.name] = self.run_stage(i, st, resume=resume, max_steps=max_steps)
            except TrainingStopped as stop:
                self.log(f"stopped in stage {st.name!r} after step {stop.step}; its checkpoint is written: continue "
                         f"with `mmhub train --resume {self.out}`")
                summaries[st.name] = {"stopped": True, "steps": stop.step}
                return

    @contextmanager
    def _stop_signals(self) -> Iterator[None]:
        """SIGTERM and SIGINT ask for a graceful stop (a second one stops at once); main thread only."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        for sig in before:
            signal.signal(sig, self._ask_stop)
        try:
            yield
        finally:
            for sig, handler in before.items():
                signal.signal(sig, handler)

    def _ask_stop(self, signum: int, frame: Any) -> None:
        if self._stop:
            raise KeyboardInterrupt
        self._stop = True
        self.log(f"{signal.Signals(signum).name}: stopping after this step, with a checkpoint (again to stop now)")

    def _stop_agreed(self) -> bool:
        """Whether to stop now: any process asked (every process must stop at the same step, for the checkpoint)."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return self._stop
        flag = torch.tensor([1.0 if self._stop else 0.0], device=acc.device)
        return bool(acc.reduce(flag, reduction="sum").item() > 0)

    # -- internals -----------------------------------------------------------------
    def _replay(self, index: int, st: StageSpec, stage_dir: Path, require: bool) -> None:
        """Bring the model to the state at the end of an earlier, finished stage."""
        apply_stage(self.model, st)
        final = step_folders(stage_dir)  # the newest, complete or not: an older one holds other weights
        if final:
            try:
                load_checkpoint(final[-1], self.model, _NullOptimizer(), None)
            except CheckpointError as exc:
                raise CheckpointError(f"stage {st.name!r} is finished but its final checkpoint cannot be used: {exc}. "
                                      f"Delete {stage_dir / 'model'} and {final[-1]} to train the rest of the stage "
                                      "again from its newest intact checkpoint") from None
        elif require:
            raise MMHubError(f"{stage_dir} has a model but no checkpoint to resume from; "
                             f"delete {stage_dir} to retrain it")

    def dataset_for(self, st: StageSpec) -> Any:
        if st.name in self.datasets:
            return self.datasets[st.name]
        if st.data is None:
            raise MMHubError(f"stage {st.name!r} has no data; "
                             "set stages[].data (e.g. {type: easy_vqa, split: train})")
        from mmhub.data import load_dataset

        return load_dataset(st.data)

    def run_stage(self, index: int, st: StageSpec, resume: bool = False,
                  max_steps: int | None = None) -> dict[str, Any]:
        """Train one stage: set up, run the loop, save its model; returns its summary."""
        run = self._setup(index, st, resume, max_steps)
        st = run.stage  # a resume on another process count may have changed its grad_accum
        saves = bool(st.save_every) and not isinstance(run.loop_accelerator, DeepSpeedAccelerator)  # none mid-stage
        builder = BatchBuilder(self.model, run.data, st, run.objective, run.caches, run.bad,
                               self.accelerator.num_processes, self.accelerator.process_index, self.log)
        loop = Loop(model=run.wrapped, objective=run.objective, optimizer=run.optimizer, scheduler=run.scheduler,
                    accelerator=run.loop_accelerator, stage=st, total=run.total, max_grad_norm=st.max_grad_norm,
                    progress=run.progress, next_batches=lambda p: builder.step(self._next_ids(run, p)),
                    after_step=lambda p, result, lr: self._after_step(run, result, lr),
                    save=lambda p: self._checkpoint(run), log=self.log,
                    save_due=lambda step: saves and step % st.save_every == 0 and step < run.total,
                    out_of_memory=lambda p, exc: self._out_of_memory(run, exc), stop_requested=self._stop_agreed)
        self._train_mode(run.plan)
        run_loop(loop)
        return self._finish(run)

    # -- setup / finish ------------------------------------------------------------
    def _setup(self, index: int, st: StageSpec, resume: bool, max_steps: int | None) -> StageRun:
        acc, model = self.accelerator, self.model
        folder = self.out / st.name
        plan = apply_stage(model, st)
        self.log(f"stage {st.name!r}: trains {plan.total:,} parameters "
                 f"({', '.join(f'{k}={v}' for k, v in plan.regimes.items() if v != 'frozen')})")
        data = self.dataset_for(st)
        n = len(data)
        if n == 0:
            raise InputError(f"stage {st.name!r}: the dataset is empty ({st.data!r})")
        if self.preflight and acc.is_main_process and st.objective == "sft":
            report = preflight(model, data, n=min(256, n), max_bad_fraction=st.max_bad_fraction, seed=model.spec.seed)
            self.log(f"preflight {st.name!r}: {report.checked} samples checked, "
                     f"{sum(report.problems.values())} with problems")
        if resume:
            st = self._keep_global_batch(st, folder)
        per_step = st.batch_size * st.grad_accum * acc.num_processes
        total = max_steps or st.max_steps or max(1, int(max(1, n // per_step) * st.epochs))
        objective = objective_for(st, model, self._reference(st) if st.objective == "dpo" else None)
        if st.keep_states is not None:
            anchors = None if st.keep_states.data is None else Anchors(st.keep_states, st, model.spec.seed)
            objective = KeepStates(objective, load_reference(st.keep_states, st, model), st.keep_states, anchors)
            on = "its training samples'" if anchors is None else f"{len(anchors.data)} anchor samples'"
            self.log(f"stage {st.name!r}: keeps {st.keep_states.reference}'s hidden states at {on} "
                     f"{st.keep_states.positions} positions (weight {st.keep_states.weight})")
        deepspeed = is_deepspeed(acc)
        if deepspeed:  # before anything is sharded: refuses what DeepSpeed cannot run yet, with the fix
            configure_deepspeed(acc, st, objective)
            if st.save_every:
                self.log(f"stage {st.name!r}: save_every {st.save_every} passed over under DeepSpeed (partial: no "
                         "mid-stage checkpoints yet); the stage's model is saved at its end")
        sharded = self._shard(st, plan)
        optimizer = torch.optim.AdamW(param_groups(model, st), lr=st.lr, weight_decay=st.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                      cosine_with_warmup(total, int(st.warmup_ratio * total)))
        if acc.mixed_precision != _precision(st.precision) and st.precision != "fp32":
            self.log(f"note: stage precision {st.precision} needs an Accelerator(mixed_precision=...); "
                     f"using {acc.mixed_precision}")
        if sharded is not None:  # FSDP2 already syncs the gradients: no DDP wrapper around the model
            wrapped, loop_acc = model, ShardedAccelerator(acc, sharded)
        elif deepspeed:  # the engine reduces, clips and steps inside its backward
            set_row_layout(model)  # it flattens the parameters into its own buffers: row-major (contiguous) ones
            wrapped, optimizer = acc.prepare(model, optimizer)
            loop_acc = DeepSpeedAccelerator(acc, wrapped)
        else:
            (wrapped, optimizer), loop_acc = acc.prepare(model, optimizer), acc
        progress = Progress(stage=st.name, stage_index=index)
        # dropout and every other draw from the global generators: a function of the spec, not of what ran before in
        # the process (a resume restores the generators' state from its checkpoint just below)
        set_seed(model.spec.seed + index)
        if resume and (loaded := load_newest(folder, model, optimizer, scheduler, self.log, sharded is not None)):
            progress = Progress.from_dict(loaded[1])
            self.log(f"resumed stage {st.name!r} from {loaded[0]} (step {progress.global_step})")
        bar = progress_bar(total, progress.global_step, st.name) if self.progress_bar else None
        logger = StageLogger(Metrics(folder, acc.is_main_process), st.name, st.log_every, total, objective.count_key,
                             bar)
        return StageRun(index, st, folder, plan, data, total, per_step, objective, wrapped, optimizer, scheduler,
                        progress, self._caches(plan, st, objective), BadSamples(st.max_bad_fraction), logger,
                        loop_acc, sharded)

    def _keep_global_batch(self, st: StageSpec, folder: Path) -> StageSpec:
        """Resuming on another process count: accumulate so that a step takes the samples it took before (the
        checkpoint's ``per_step``), keeping the sample order, the step count and the optimisation the same."""
        done = checkpoints(folder)
        if not done:
            return st
        try:
            before = int(read_progress(done[-1]).get("per_step") or 0)
        except CheckpointError:
            return st  # load_newest names the damaged checkpoint and falls back
        procs = self.accelerator.num_processes
        now = st.batch_size * st.grad_accum * procs
        if not before or before == now:
            return st
        accum, rest = divmod(before, st.batch_size * procs)
        if rest or accum < 1:
            raise MMHubError(f"stage {st.name!r} took {before} samples a step before the restart and would take {now} "
                             f"on {procs} process(es) (batch_size {st.batch_size}); no grad_accum keeps {before}: "
                             f"resume on a process count that divides {before // st.batch_size}")
        self.log(f"stage {st.name!r}: {procs} process(es) now; grad_accum {st.grad_accum} -> {accum} keeps the "
                 f"{before} samples per step of the run so far")
        return st.model_copy(update={"grad_accum": accum})

    def _shard(self, st: StageSpec, plan: StagePlan) -> Any:
        """Shard the stage's ``placement: shard`` slots (FSDP2) when several processes run; None otherwise."""
        if not any(how == "shard" for how in st.placement.values()) or self.accelerator.num_processes == 1:
            return None
        if st.keep_states is not None:
            raise MMHubError(f"stage {st.name!r}: keep_states with sharded slots is not supported yet (its reference "
                             "model is unsharded); drop the stage's placement")
        if st.objective == "dpo":
            raise MMHubError(f"stage {st.name!r}: DPO with sharded slots is not supported yet (its frozen reference "
                             "copy is unsharded); drop the stage's placement")
        return ShardedStage(self.model, st, plan.regimes, self.accelerator.num_processes)

    def _reference(self, st: StageSpec) -> torch.nn.Module:
        """DPO's frozen reference: the same components and adapters, with the weights as the stage begins."""
        model = self.model
        if len(model.injectors):
            raise MMHubError(f"stage {st.name!r}: DPO with injectors ({', '.join(model.injectors)}) "
                             "is not supported yet")
        reference = build_from_plan(model.plan)
        reference.load_state_dict(model.state_dict())
        return reference.eval().requires_grad_(False)

    def _train_mode(self, plan: StagePlan) -> None:
        self.model.train()
        for path, mod in slots(self.model):  # frozen parts stay in eval mode (BatchNorm statistics, dropout)
            if plan.regimes.get(path) == "frozen":
                mod.eval()

    def _finish(self, run: StageRun) -> dict[str, Any]:
        acc, model, st, progress = self.accelerator, self.model, run.stage, run.progress
        self._roll_epoch(run, progress)
        progress.skipped = run.bad.total
        self._checkpoint(run)
        if isinstance(run.loop_accelerator, DeepSpeedAccelerator):  # its hooks off the model before the next stage
            state = gathered_state(run.wrapped) if partitions_parameters(acc) else None
            acc.free_memory()
            if state is not None:  # ZeRO-3 left the parameters partitioned: a plain model from the gathered tensors
                model = self.model = self._rebuilt(state)
        if run.sharded is not None:  # later stages and the saved folder get the model unsharded
            model = self.model = self._unsharded(run)
        model.eval()
        if acc.is_main_process:
            model.save_pretrained(run.folder / "model")
        acc.wait_for_everyone()
        run.logger.close()
        summary = {"steps": progress.global_step, "samples": progress.samples_seen, "skipped": run.bad.total,
                   "skipped_by_reason": dict(run.bad.counts), "final_loss": run.logger.last.get("loss"),
                   "model": str(run.folder / "model"), "trainable": run.plan.total,
                   "feature_cache": {m: {"hits": c.hits, "misses": c.misses} for m, c in run.caches.items()}}
        run.logger.metrics.log({"stage": st.name, "step": progress.global_step, "summary": summary})
        return summary

    def _unsharded(self, run: StageRun) -> Any:
        """A plain copy of the sharded model (rebuilt from its plan, its adapters re-injected, the gathered tensors
        loaded) that replaces it: FSDP2 has no way back, and a saved folder or the next stage wants whole tensors."""
        state = full_tensors(self.model.state_dict())
        run.sharded.close()
        return self._rebuilt(state)

    def _rebuilt(self, state: dict[str, torch.Tensor]) -> Any:
        """The model rebuilt from its plan with its adapters and trained slots, holding the whole tensors `state`."""
        from mmhub.adapters import inject_adapter

        old = self.model
        plain = build_from_plan(old.plan)
        for slot, lora in old.spec.adapters.items():
            inject_adapter(plain, slot, lora)
        plain.spec.trained = list(old.spec.trained)
        plain.load_state_dict(state)
        return plain

    # -- the loop's callbacks ------------------------------------------------------
    def _next_ids(self, run: StageRun, progress: Progress) -> list[int]:
        """The sample indices of the next optimizer step (all processes'), moving to the next epoch when one ends."""
        self._roll_epoch(run, progress)
        start = progress.batch_in_epoch * run.per_step
        return self._order(run, progress.epoch)[start:start + run.per_step]

    def _roll_epoch(self, run: StageRun, progress: Progress) -> None:
        while (progress.batch_in_epoch + 1) * run.per_step > len(self._order(run, progress.epoch)):
            progress.epoch += 1
            progress.batch_in_epoch = 0

    def _order(self, run: StageRun, epoch: int) -> list[int]:
        if epoch not in run.orders:
            order = epoch_order(len(run.data), self.model.spec.seed, run.index, epoch)
            run.orders = {epoch: self._length_grouped(run, order, epoch) if run.stage.group_by_length else order}
        return run.orders[epoch]

    def _after_step(self, run: StageRun, result: StepResult, lr: float) -> None:
        run.logger.step(run.progress, result, lr, run.bad.total)
        run.progress.skipped = run.bad.total

    def _out_of_memory(self, run: StageRun, exc: BaseException) -> None:
        st, done = run.stage, checkpoints(run.folder)
        raise MMHubError(f"stage {st.name!r} ran out of memory at step {run.progress.global_step + 1} "
                         f"(batch_size {st.batch_size}, {type(exc).__name__}). Lower batch_size and raise "
                         f"grad_accum (same effective batch), or set pack / a smaller max length. "
                         + (f"Resume from {done[-1]} with --resume." if done else "No checkpoint was lost.")) from None

    def _checkpoint(self, run: StageRun) -> None:
        acc = self.accelerator
        if isinstance(run.loop_accelerator, DeepSpeedAccelerator):  # partial: ZeRO's optimizer state is per process
            self.log(f"stage {run.stage.name!r}: no checkpoint under DeepSpeed (partial); a resume restarts the stage")
            return
        model_state = optimizer_state = None
        if run.sharded is not None:  # every process gathers the shards; the main one writes
            model_state = full_tensors(tensors_to_save(self.model, full=False))
            optimizer_state = full_optimizer_state(self.model, run.optimizer)
        if acc.is_main_process:
            save_checkpoint(run.folder / "checkpoints" / f"{STEP_PREFIX}{run.progress.global_step:07d}", self.model,
                            run.optimizer, run.scheduler,
                            {**run.progress.to_dict(), "per_step": run.per_step, "processes": acc.num_processes},
                            model_state, optimizer_state)
            prune(run.folder, run.stage.keep_last)
        acc.wait_for_everyone()

    def _caches(self, plan: StagePlan, st: StageSpec, objective: Objective) -> dict[str, FeatureCache]:
        # a text-only objective (DLP's language phase) loads no media: hashing the frozen encoders would be wasted
        if not st.cache_features or not getattr(objective, "reads_media", True):
            return {}
        if is_deepspeed(self.accelerator) and partitions_parameters(self.accelerator):
            return {}  # ZeRO-3: the frozen encoders' parameters are partitioned outside the engine's forward
        caches = {}
        for m in plan.frozen_encoders():
            owner = self.model.spec.encoder_owner(m)
            # an encoder with variable_tokens needs its preprocessed items after the projector: never cached
            if owner in plan.frozen_encoders() and not self.model.encoders[m].variable_tokens:
                caches[m] = FeatureCache(self.model.encoders[m], m)
        return caches

    def _length_grouped(self, run: StageRun, order: list[int], epoch: int) -> list[int]:
        if run.lengths is None:  # measured once per stage, not every epoch
            run.lengths = [_text_length(run.data[i]) for i in range(len(run.data))]
        perm = length_grouped_order([run.lengths[i] for i in order],
                                    run.stage.batch_size * self.accelerator.num_processes,
                                    seed=self.model.spec.seed + epoch)
        return [order[i] for i in perm]


class _NullOptimizer:
    def load_state_dict(self, state: Any) -> None:  # replaying a finished stage needs its weights, not its optimizer
        pass


def _precision(p: str) -> str:
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[p]


def _text_length(sample: Any) -> int:
    return sum(len(m.get("content", "")) for m in sample.messages)
