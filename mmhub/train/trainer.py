"""The stage trainer: runs a spec's stages in order on Hugging Face accelerate (DDP/FSDP/DeepSpeed via its configs).

Per stage: `apply_stage` picks the trainable parameters, AdamW with per-part learning
rates, linear warmup then cosine decay, gradient accumulation and clipping, fp32 /
bf16 / fp16 (with loss scaling on CUDA) through accelerate's mixed precision. The
loss is the token-weighted mean over the whole optimizer step: every micro-batch's
summed loss is backpropagated and the gradients are scaled by the world size over
the step's global target-token count, so one process with batch 8 and two
processes with batch 4 compute the same update.

The data order is a function of (seed, stage, epoch) alone, so a run can resume
exactly from a checkpoint: model, optimizer, scheduler, RNG and data position
(`mmhub.train.state`). Frozen encoders' outputs are cached on disk
(`mmhub.train.feature_cache`). A sample that cannot be loaded or encoded is
skipped and counted; past ``max_bad_fraction`` the run stops with the counts and
examples. Metrics go to ``metrics.jsonl`` (and TensorBoard when installed), a
progress bar shows loss, lr and samples/s.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from mmhub.errors import InputError, MMHubError
from mmhub.spec import StageSpec
from mmhub.splice import IGNORE
from mmhub.train.feature_cache import FeatureCache, item_key
from mmhub.train.stage import StagePlan, apply_stage, param_groups
from mmhub.stages import slots as _slots
from mmhub.train.state import STEP_PREFIX, checkpoints, load_checkpoint, prune, save_checkpoint

MAX_NAN_STEPS = 10


@dataclass
class BadSamples:
    """Skipped samples, counted per reason, with the first examples kept for the error message."""

    limit_fraction: float
    counts: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    seen: int = 0

    def add(self, where: str, exc: Exception) -> None:
        reason = type(exc).__name__
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if len(self.examples) < 3:
            self.examples.append(f"{where}: {exc}")
        total = sum(self.counts.values())
        if self.seen >= 20 and total > self.limit_fraction * self.seen:
            raise InputError(f"{total} of {self.seen} samples so far could not be used ({self.counts}), more than "
                             f"max_bad_fraction {self.limit_fraction}; e.g. {' | '.join(self.examples)}. Fix the data "
                             "or raise the stage's max_bad_fraction.")

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def cosine_with_warmup(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
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


class Metrics:
    """metrics.jsonl (appended, flushed per line) plus TensorBoard when it is installed."""

    def __init__(self, folder: Path, enabled: bool):
        self.enabled = enabled
        self.path = folder / "metrics.jsonl"
        self.tb = None
        if enabled:
            folder.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(folder / "tensorboard"))
            except Exception:  # tensorboard is optional
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


class Trainer:
    """Runs the stages of an assembled model's spec; `run()` trains, `resume=True` continues a stopped run."""

    def __init__(self, model: Any, out_dir: str | Path, datasets: dict[str, Any] | None = None,
                 accelerator: Any = None, progress_bar: bool = True, log: Callable[[str], None] = print,
                 preflight: bool = True):
        from accelerate import Accelerator

        self.model = model
        self.out = Path(out_dir)
        self.datasets = datasets or {}
        self.accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        self.progress_bar = progress_bar and self.accelerator.is_main_process
        self.preflight = preflight
        self.log = log if self.accelerator.is_main_process else (lambda *_: None)

    # -- public --------------------------------------------------------------------
    def run(self, stage: str | None = None, resume: bool = False, max_steps: int | None = None) -> dict[str, Any]:
        """Train every stage in order (or only `stage`); returns per-stage summaries."""
        stages = self.model.spec.stages
        if not stages:
            raise MMHubError(f"spec {self.model.spec.name!r} has no stages; add stages: [{{name: ..., train: ..., data: ...}}]")
        names = [s.name for s in stages]
        if stage is not None and stage not in names:
            from mmhub.errors import close_matches

            hint = close_matches(stage, names, n=1)
            raise MMHubError(f"no stage named {stage!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                             + f"; stages: {', '.join(names)}")
        summaries = {}
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
            summaries[st.name] = self.run_stage(i, st, resume=resume, max_steps=max_steps)
        return summaries

    # -- internals -----------------------------------------------------------------
    def _replay(self, index: int, st: StageSpec, stage_dir: Path, require: bool) -> None:
        """Bring the model to the state at the end of an earlier, finished stage."""
        apply_stage(self.model, st)
        final = checkpoints(stage_dir)
        if final:
            load_checkpoint(final[-1], self.model, _NullOptimizer(), None)
        elif require:
            raise MMHubError(f"{stage_dir} has a model but no checkpoint to resume from; delete {stage_dir} to retrain it")

    def dataset_for(self, st: StageSpec) -> Any:
        if st.name in self.datasets:
            return self.datasets[st.name]
        if st.data is None:
            raise MMHubError(f"stage {st.name!r} has no data; set stages[].data (e.g. {{type: easy_vqa, split: train}})")
        from mmhub.data import load_dataset

        return load_dataset(st.data)

    def run_stage(self, index: int, st: StageSpec, resume: bool = False, max_steps: int | None = None) -> dict[str, Any]:
        acc, model = self.accelerator, self.model
        stage_dir = self.out / st.name
        plan = apply_stage(model, st)
        self.log(f"stage {st.name!r}: trains {plan.total:,} parameters ({', '.join(f'{k}={v}' for k, v in plan.regimes.items() if v != 'frozen')})")
        data = self.dataset_for(st)
        n = len(data)
        if n == 0:
            raise InputError(f"stage {st.name!r}: the dataset is empty ({st.data!r})")
        if self.preflight and acc.is_main_process and st.objective == "sft":
            from mmhub.data.preflight import preflight

            report = preflight(model, data, n=min(256, n), max_bad_fraction=st.max_bad_fraction, seed=model.spec.seed)
            self.log(f"preflight {st.name!r}: {report.checked} samples checked, {sum(report.problems.values())} with problems")
        world = acc.num_processes
        per_step = st.batch_size * st.grad_accum * world
        steps_per_epoch = max(1, n // per_step)
        total = max_steps or st.max_steps or max(1, int(steps_per_epoch * st.epochs))
        self._reference = None
        if st.objective == "dpo":
            if len(model.injectors):
                raise MMHubError(f"stage {st.name!r}: DPO with injectors ({', '.join(model.injectors)}) is not supported yet")
            from mmhub.assembly import build_from_plan

            reference = build_from_plan(model.plan)  # same components and adapters; then the weights as the stage begins
            reference.load_state_dict(model.state_dict())
            self._reference = reference.eval().requires_grad_(False)
        optimizer = torch.optim.AdamW(param_groups(model, st), lr=st.lr, weight_decay=st.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(total, int(st.warmup_ratio * total)))
        if acc.mixed_precision != _precision(st.precision) and st.precision != "fp32":
            self.log(f"note: stage precision {st.precision} needs an Accelerator(mixed_precision=...); using {acc.mixed_precision}")
        wrapped, optimizer = acc.prepare(model, optimizer)
        progress = {"stage": st.name, "stage_index": index, "epoch": 0, "batch_in_epoch": 0, "global_step": 0,
                    "samples_seen": 0, "skipped": 0}
        if resume and (found := checkpoints(stage_dir)):
            progress = load_checkpoint(found[-1], model, optimizer, scheduler)
            self.log(f"resumed stage {st.name!r} from {found[-1]} (step {progress['global_step']})")
        caches = self._caches(plan, st)
        bad = BadSamples(st.max_bad_fraction)
        metrics = Metrics(stage_dir, acc.is_main_process)
        bar = _bar(total, progress["global_step"], st.name) if self.progress_bar else None
        nan_steps, t0, window_samples, last = 0, time.perf_counter(), 0, {}
        model.train()
        for path, mod in _slots(model):  # frozen parts stay in eval mode (BatchNorm statistics, dropout)
            if plan.regimes.get(path) == "frozen":
                mod.eval()
        while progress["global_step"] < total:
            order = epoch_order(n, model.spec.seed, index, progress["epoch"])
            if st.group_by_length:
                order = self._length_grouped(data, order, st, progress["epoch"])
            starts = range(progress["batch_in_epoch"] * per_step, len(order) - per_step + 1, per_step)
            for start in starts:
                if progress["global_step"] >= total:
                    break
                step_ids = order[start:start + per_step]
                try:
                    loss_sum, n_tok, used = self._step(wrapped, optimizer, step_ids, st, caches, bad, data)
                except (torch.OutOfMemoryError, RuntimeError) as exc:
                    if "out of memory" not in str(exc).lower() and "can't allocate" not in str(exc).lower() \
                            and not isinstance(exc, torch.OutOfMemoryError):
                        raise
                    done = checkpoints(stage_dir)
                    raise MMHubError(f"stage {st.name!r} ran out of memory at step {progress['global_step'] + 1} "
                                     f"(batch_size {st.batch_size}, {type(exc).__name__}). Lower batch_size and raise "
                                     f"grad_accum (same effective batch), or set pack / a smaller max length. "
                                     + (f"Resume from {done[-1]} with --resume." if done else "No checkpoint was lost.")) from None
                progress["batch_in_epoch"] += 1
                progress["samples_seen"] += used
                window_samples += used
                if not math.isfinite(loss_sum):
                    nan_steps += 1
                    optimizer.zero_grad(set_to_none=True)
                    self.log(f"step {progress['global_step']}: non-finite loss, step skipped ({nan_steps} in a row)")
                    if nan_steps >= MAX_NAN_STEPS:
                        raise MMHubError(f"stage {st.name!r}: {nan_steps} steps in a row had a NaN/inf loss; lower lr "
                                         f"({st.lr}), check the data, or use precision fp32")
                    continue
                nan_steps = 0
                progress["global_step"] += 1
                gstep = progress["global_step"]
                lr = scheduler.get_last_lr()[0]
                scheduler.step()
                last = {"stage": st.name, "step": gstep, "epoch": progress["epoch"], "loss": loss_sum / max(n_tok, 1),
                        "lr": lr, ("pairs" if st.objective == "dpo" else "target_tokens"): n_tok, "skipped": bad.total,
                        **(getattr(self, "_dpo_stats", {}) if st.objective == "dpo" else {})}
                if gstep % st.log_every == 0 or gstep == total:
                    dt = time.perf_counter() - t0
                    last["samples_per_s"] = window_samples / dt if dt > 0 else 0.0
                    metrics.log(last)
                    t0, window_samples = time.perf_counter(), 0
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{lr:.2e}",
                                    **({"samples/s": f"{last['samples_per_s']:.1f}"} if "samples_per_s" in last else {}))
                progress["skipped"] = bad.total
                if st.save_every and gstep % st.save_every == 0 and gstep < total:
                    self._checkpoint(stage_dir, optimizer, scheduler, progress, st)
            else:
                progress["epoch"] += 1
                progress["batch_in_epoch"] = 0
                continue
        progress["skipped"] = bad.total
        self._checkpoint(stage_dir, optimizer, scheduler, progress, st)
        model.eval()
        if acc.is_main_process:
            model.save_pretrained(stage_dir / "model")
        acc.wait_for_everyone()
        if bar is not None:
            bar.close()
        summary = {"steps": progress["global_step"], "samples": progress["samples_seen"], "skipped": bad.total,
                   "skipped_by_reason": dict(bad.counts), "final_loss": last.get("loss"), "model": str(stage_dir / "model"),
                   "trainable": plan.total,
                   "feature_cache": {m: {"hits": c.hits, "misses": c.misses} for m, c in caches.items()}}
        metrics.log({"stage": st.name, "step": progress["global_step"], "summary": summary})
        return summary

    def _dpo_loss(self, out: Any, batch: dict[str, Any], st: StageSpec) -> tuple[torch.Tensor, int]:
        """Sigmoid DPO: -log sigmoid(beta * ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r)))), summed over pairs."""
        with torch.no_grad():
            ref = self._reference(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["media"],
                                  return_logits=False, features=batch["features"]).sequence_logprobs
        pc, pr = _pairs(out.sequence_logprobs)
        rc, rr = _pairs(ref)
        margin = st.beta * ((pc - rc) - (pr - rr))
        self._dpo_stats = {"reward_margin": float(margin.mean().detach()) / st.beta,
                           "reward_accuracy": float((margin > 0).float().mean())}
        return -torch.nn.functional.logsigmoid(margin).sum(), int(margin.numel())

    def _checkpoint(self, stage_dir: Path, optimizer: Any, scheduler: Any, progress: dict[str, Any], st: StageSpec) -> None:
        acc = self.accelerator
        if acc.is_main_process:
            save_checkpoint(stage_dir / "checkpoints" / f"{STEP_PREFIX}{progress['global_step']:07d}", self.model,
                            optimizer, scheduler, progress)
            prune(stage_dir, st.keep_last)
        acc.wait_for_everyone()

    def _caches(self, plan: StagePlan, st: StageSpec) -> dict[str, FeatureCache]:
        if not st.cache_features:
            return {}
        caches = {}
        for m in plan.frozen_encoders():
            owner = self.model.spec.encoder_owner(m)
            if owner in plan.frozen_encoders():
                caches[m] = FeatureCache(self.model.encoders[m], m)
        return caches

    def _length_grouped(self, data: Any, order: list[int], st: StageSpec, epoch: int) -> list[int]:
        from mmhub.packing import length_grouped_order

        cached = getattr(self, "_lengths", None)
        if cached is None or cached[0] is not data:  # measured once per dataset, not every epoch
            self._lengths = (data, [_text_length(data[i]) for i in range(len(data))])
        lengths = self._lengths[1]
        perm = length_grouped_order([lengths[i] for i in order], st.batch_size * self.accelerator.num_processes,
                                    seed=self.model.spec.seed + epoch)
        return [order[i] for i in perm]

    def _encode(self, ids: Sequence[int], data: Any, bad: BadSamples, caches: dict[str, FeatureCache],
                dpo: bool = False) -> list[Any]:
        """Tokenize samples (DPO: chosen then rejected conversation per sample); bad samples are skipped and counted."""
        proc = self.model.processor
        out = []
        for i in ids:
            bad.seen += 1
            try:
                sample = data[i]
                if dpo:
                    if sample.chosen is None or sample.rejected is None:
                        raise InputError("a DPO stage needs preference samples (prompt + chosen + rejected)")
                    convs = [sample.conversation(sample.chosen), sample.conversation(sample.rejected)]
                else:
                    convs = [sample.messages]
                pair = []
                for conv in convs:
                    enc = proc.encode(conv, sample.media, index=i, preprocess=False)
                    for m, items in enc.media.items():
                        if m in caches:
                            enc.media[m] = [("key", item_key(x), x) for x in items]
                        else:
                            enc.media[m] = [proc.preprocess[m](x) for x in items]
                    if all(label == IGNORE for label in enc.labels):
                        raise InputError("every label is masked (no assistant tokens to learn)")
                    enc.index = i
                    enc.outputs = sample.outputs or None
                    pair.append(enc)
                out.extend(pair)
            except (InputError, OSError, ValueError, KeyError, IndexError) as exc:
                bad.add(f"sample {i}", exc)
        return out

    def _features(self, encs: list[Any], caches: dict[str, FeatureCache], bad: BadSamples) -> tuple[list[Any], dict[str, torch.Tensor]]:
        """Cached encoder features for the batch; a sample whose uncached media fail to load is dropped and counted."""
        model, proc = self.model, self.model.processor
        pixels: dict[tuple[str, str], torch.Tensor] = {}
        keep = []
        for enc in encs:
            try:
                for m in caches:
                    for _, key, raw in enc.media.get(m, []):
                        if not caches[m].has(key) and (m, key) not in pixels:
                            pixels[(m, key)] = proc.preprocess[m](raw)
                keep.append(enc)
            except (InputError, OSError, ValueError) as exc:
                bad.add(f"sample {enc.index}", exc)
        feats = {}
        for m, cache in caches.items():
            keys = [key for enc in keep for _, key, _ in enc.media.get(m, [])]
            if not keys:
                continue

            def compute(missing: list[int], _m: str = m, _keys: list[str] = keys) -> torch.Tensor:
                batch = torch.stack([pixels[(_m, _keys[j])] for j in missing])
                with torch.no_grad():
                    return model.encode_features({_m: batch})[_m]

            stacked = cache.get(keys, compute)
            at = 0
            for enc in keep:
                k = len(enc.media.pop(m, []))
                enc.features = {**getattr(enc, "features", {}), m: stacked[at:at + k]}
                at += k
        return keep, feats

    def _step(self, wrapped: Any, optimizer: Any, step_ids: list[int], st: StageSpec, caches: dict[str, FeatureCache],
              bad: BadSamples, data: Any) -> tuple[float, int, int]:
        """One optimizer step over grad_accum micro-batches; returns (summed loss, target tokens, samples used)."""
        acc = self.accelerator
        world, rank = acc.num_processes, acc.process_index
        micro = [step_ids[k * st.batch_size * world:(k + 1) * st.batch_size * world] for k in range(st.grad_accum)]
        loss_total, tok_local, used = 0.0, 0, 0
        batches = []
        for ids in micro:
            mine = ids[rank * st.batch_size:(rank + 1) * st.batch_size]
            encs = self._encode(mine, data, bad, caches, dpo=st.objective == "dpo")
            encs, _ = self._features(encs, caches, bad)
            if st.objective == "dpo":  # a pair whose other half was dropped is dropped too
                idx = [e.index for e in encs]
                encs = [e for e in encs if idx.count(e.index) == 2]
            if not encs:
                continue
            if st.pack and st.objective != "dpo":
                from mmhub.packing import collate_packed, pack, spliced_length

                rows = pack(encs, st.pack, spliced_length(self.model))
                batch = collate_packed(self.model.processor, encs, rows)
                ordered = [encs[i] for row in rows for i in row]
            else:
                batch = self.model.processor.collate(encs)
                ordered = encs
            batch["features"] = {m: torch.cat([e.features[m] for e in ordered if m in getattr(e, "features", {})])
                                 for m in caches if any(m in getattr(e, "features", {}) for e in ordered)}
            if len(self.model.output_projectors):  # captions of the media to generate, in the batch's sample order
                batch["outputs"] = {m: [c for e in ordered for c in (e.outputs or {}).get(m, [])]
                                    for m in self.model.output_projectors}
            batches.append(batch)
            used += len(encs)
        for k, batch in enumerate(batches):
            ctx = acc.no_sync(wrapped) if k < len(batches) - 1 else _nullcontext()
            with ctx, acc.autocast():
                out = wrapped(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["media"],
                              return_logits=False, features=batch["features"], segment_ids=batch.get("segment_ids"),
                              outputs=batch.get("outputs"))
                if st.objective == "dpo":
                    loss_sum, count = self._dpo_loss(out, batch, st)
                else:
                    loss_sum, count = out.loss.float() * out.num_target_tokens, out.num_target_tokens
            acc.backward(loss_sum)
            loss_total += float(loss_sum.detach())
            tok_local += count
        tokens = torch.tensor([tok_local, loss_total], dtype=torch.float64, device=acc.device)
        tokens = acc.reduce(tokens, reduction="sum") if world > 1 else tokens
        n_global, loss_global = int(tokens[0]), float(tokens[1])
        if n_global == 0 or not math.isfinite(loss_global):
            optimizer.zero_grad(set_to_none=True)
            return (float("nan") if n_global else 0.0), n_global, used
        scale = world / n_global  # DDP averaged the per-rank sums: undo that, then divide by the global token count
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(scale)
        if st.max_grad_norm:
            acc.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], st.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss_global, n_global, used


def _pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[0::2], x[1::2]  # rows alternate chosen, rejected


class _NullOptimizer:
    def load_state_dict(self, state: Any) -> None:  # replaying a finished stage needs its weights, not its optimizer
        pass


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> bool:
        return False


def _precision(p: str) -> str:
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[p]


def _text_length(sample: Any) -> int:
    return sum(len(m.get("content", "")) for m in sample.messages)


def _bar(total: int, start: int, name: str) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=start, desc=f"stage {name}", dynamic_ncols=True, disable=not os.isatty(2) and
                os.environ.get("MMHUB_PROGRESS") != "1")
