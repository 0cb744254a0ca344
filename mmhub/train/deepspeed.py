"""DeepSpeed ZeRO (stages 0-3) driving mmhub's training loop, through accelerate's DeepSpeed plugin.

A run launched with accelerate's DeepSpeed config (``accelerate launch --config_file ds.yaml``, or ``torchrun`` with
``ACCELERATE_USE_DEEPSPEED=true ACCELERATE_DEEPSPEED_ZERO_STAGE=2``) gets an `Accelerator` whose ``prepare`` wraps
the model in a DeepSpeed engine; the engine reduces, clips and steps inside its backward. mmhub's loop weights every
step by the global count of target tokens (one process with batch 8 and two with batch 4 make the same update), which
it normally applies to the gradients after the backward; under DeepSpeed the gradients live in the engine's
partitioned buffers, so the scale goes into the loss instead: each objective counts a micro-batch's targets from its
labels before the forward (`Objective.count`), the counts are summed over the processes, and every micro-batch's
summed loss is backpropagated times ``processes / global count`` (the engine averages over the processes, and is told
not to divide by its accumulation steps). The stage's ``batch_size``, ``grad_accum`` and ``max_grad_norm`` are
written into the DeepSpeed config before the engine is built, so the launch config needs no batch fields.

ZeRO-3 partitions the parameters themselves: the engine gathers each module's while it runs, so the feature cache
(which calls frozen encoders outside the engine) is off in such a stage, and the stage ends by gathering every
parameter (`gathered_state`) into a plain model rebuilt from the plan, which is saved and goes on to the next stage.
mmhub builds whole models and lets the engine partition them (transformers' own ZeRO-3 construction is switched off).

`deepspeed_problems` refuses, with the fix, what does not work yet: ``placement: shard`` in the same stage (two
sharding schemes) and objectives that cannot count before the forward. partial: no mid-stage checkpoints (ZeRO keeps
each process's part of the optimizer state): ``save_every`` is passed over with a note, the stage's model is saved at
its end, and a stopped stage restarts on resume.

On a machine without an accelerator, accelerate picks no communication backend for DeepSpeed; `start_state` sets
gloo before the `Accelerator` is made.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Any

import torch

from mmhub.errors import MMHubError


def deepspeed_requested() -> bool:
    """Whether the launcher asked for DeepSpeed (accelerate's environment variable)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def start_state() -> None:
    """Before the `Accelerator`: on a machine without CUDA, accelerate's state for DeepSpeed with gloo (accelerate
    leaves the backend unset there and every process would think it is alone)."""
    if deepspeed_requested() and not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        PartialState(backend="gloo")


def make_accelerator(**options: Any) -> Any:
    """The run's `Accelerator`: on the CPU when there is no CUDA, except under DeepSpeed (accelerate's ``cpu=True``
    turns the DeepSpeed config off), whose state `start_state` prepares."""
    from accelerate import Accelerator

    if deepspeed_requested():
        start_state()
        accelerator = Accelerator(**options)
        _whole_models_from_transformers()
        return accelerator
    return Accelerator(cpu=not torch.cuda.is_available(), **options)


def _whole_models_from_transformers() -> None:
    """accelerate's ZeRO-3 plugin tells transformers (`is_deepspeed_zero3_enabled`) to build every model straight into
    ZeRO-3 partitions; mmhub builds whole models (its loading, layout and validation read whole parameters) and the
    engine partitions them when a stage prepares them, so that switch is turned off here."""
    try:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    unset_hf_deepspeed_config()


def is_deepspeed(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return getattr(accelerator, "distributed_type", None) == DistributedType.DEEPSPEED


def zero_stage(accelerator: Any) -> int:
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    return int(config.get("zero_optimization", {}).get("stage", 0))


def deepspeed_problems(accelerator: Any, stage: Any, objective: Any) -> list[str]:
    """What in this stage DeepSpeed cannot run yet, each with the fix (empty: it can)."""
    problems = []
    if any(how == "shard" for how in getattr(stage, "placement", {}).values()):
        problems.append("`placement: shard` shards slots with FSDP2, and DeepSpeed shards the whole model: drop the "
                        "stage's placement or launch without the DeepSpeed config")
    if getattr(objective, "count", None) is None:
        problems.append(f"the {stage.objective!r} objective cannot count its targets before the forward, which the "
                        "DeepSpeed loop needs to scale the loss; train this stage with DDP or placement")
    return problems


def configure(accelerator: Any, stage: Any, objective: Any) -> None:
    """Check the stage (`deepspeed_problems`) and write its batch, accumulation and clipping into the DeepSpeed
    config the next ``prepare`` builds the engine from."""
    problems = deepspeed_problems(accelerator, stage, objective)
    if problems:
        raise MMHubError(f"stage {stage.name!r} under DeepSpeed:\n" + "\n".join(f"  - {p}" for p in problems))
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = stage.batch_size
    config["gradient_accumulation_steps"] = stage.grad_accum
    config["train_batch_size"] = stage.batch_size * stage.grad_accum * accelerator.num_processes
    config["gradient_clipping"] = float(stage.max_grad_norm or 0.0)


def partitions_parameters(accelerator: Any) -> bool:
    """ZeRO-3: each process holds a slice of every parameter, gathered by the engine's hooks only while a module runs;
    the feature cache (which calls frozen encoders outside the engine) is off then, and the stage ends by gathering
    the whole model (`gathered_state`)."""
    return zero_stage(accelerator) >= 3


def gathered_state(engine: Any) -> dict[str, torch.Tensor]:
    """The whole model's tensors on every process (ZeRO-3's partitions gathered), copied out of the engine."""
    import deepspeed

    module = engine.module
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        return {k: v.detach().clone() for k, v in module.state_dict().items()}


class DeepSpeedAccelerator:
    """The loop's accelerator interface over a DeepSpeed engine: `counts_first` tells the loop to scale the loss
    (`mmhub.train.loop.counted_step`); `backward` marks the last micro-batch as the accumulation boundary, where the
    engine reduces, clips and steps."""

    counts_first = True

    def __init__(self, accelerator: Any, engine: Any) -> None:
        self.acc, self.engine = accelerator, engine
        self.num_processes = accelerator.num_processes
        self.process_index = accelerator.process_index
        self.is_main_process = accelerator.is_main_process
        self.device = accelerator.device

    @property
    def optimizer_step_was_skipped(self) -> bool:
        return bool(getattr(self.engine.optimizer, "overflow", False))  # fp16 loss scaling only

    def no_sync(self, model: Any) -> nullcontext:
        return nullcontext()

    def autocast(self) -> Any:
        return self.acc.autocast()

    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss, scale_wrt_gas=False)  # the loss already carries the step's scale
        self.engine.step()  # steps the optimizer only at the boundary

    def grad_norm(self) -> float | None:
        """The global gradient norm before clipping, of the step just taken."""
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return self.acc.reduce(tensor, reduction=reduction)

    def wait_for_everyone(self) -> None:
        self.acc.wait_for_everyone()


__all__ = ["deepspeed_requested", "start_state", "make_accelerator", "is_deepspeed", "deepspeed_problems", "configure",
           "DeepSpeedAccelerator"]
