"""Sharded training per component slot on torch's FSDP2 (``fully_shard``), on any device, CPU and gloo included.

A stage's ``placement`` names slots to ``shard`` or ``replicate`` across the processes of a multi-process run:

* ``shard``: the slot goes through ``torch.distributed.fsdp.fully_shard`` (a language model block by block and its
  embeddings, each a unit; another slot as one unit), so each process keeps 1/N of those parameters, gradients and
  optimizer state; FSDP2 gathers a unit's parameters for its forward and backward and reduce-scatters (averages)
  its gradients;
* ``replicate`` (and every slot not named): each process holds the whole slot; a trainable one averages its
  gradients over the processes after each backward (an all-reduce per parameter, as DDP does).

accelerate 1.16 turns its own FSDP plugin on only for accelerator devices (a CPU run becomes DDP whatever its
config says), so mmhub applies FSDP2 itself and gives the loop an accelerator interface (`ShardedAccelerator`):
no DDP wrapper, FSDP2's own gradient-sync switch for accumulation, and gradient clipping over sharded and replicated
gradients together. Checkpoints hold full tensors (gathered from the shards, written by the main process, model and
optimizer keyed by parameter name), so a run resumes on any process count. Checks before anything is sharded
(`placement_problems`): the slot exists and trains in this stage (sharding a frozen part saves memory that a
frozen, gradient-free replica does not need and is refused, as is a quantized part, whose packed 4-bit weights
FSDP cannot split, and a part sharing a parameter with another slot, e.g. tied embeddings across slots).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

import torch
from torch import nn

from mmhub.errors import MMHubError
from mmhub.regimes import slots


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def placement_problems(model: Any, stage: Any, regimes: dict[str, str]) -> list[str]:
    """Every reason `stage.placement` cannot be applied to `model`, each naming the slot and the fix."""
    problems = []
    table = dict(slots(model))
    owners: dict[int, str] = {}
    for path, mod in table.items():
        for p in mod.parameters():
            owners.setdefault(id(p), path)
    for slot, how in stage.placement.items():
        where = f"stage {stage.name!r}: placement.{slot}"
        if slot not in table:
            problems.append(f"{where}: no such slot (slots: {', '.join(table)})")
            continue
        if how != "shard":
            continue
        if regimes.get(slot, "frozen") == "frozen":
            problems.append(f"{where}: {slot} is frozen in this stage; sharding it saves nothing a frozen replica "
                            f"needs (no gradients, no optimizer state): use replicate, or train it in this stage")
        cfg = getattr(table[slot], "config", None)
        if getattr(cfg, "quantize", None):
            problems.append(f"{where}: {slot} is quantized ({cfg.quantize}): FSDP cannot split packed 4-bit weights; "
                            "replicate it, or load it unquantized to shard it")
        if _tied(table[slot]):
            problems.append(f"{where}: {slot}'s input and output embeddings are tied (one matrix used in two places "
                            "mmhub calls separately); sharding it is not supported yet: replicate it")
        shared = sorted({owners[id(p)] for p in table[slot].parameters() if owners[id(p)] != slot})
        if shared:
            problems.append(f"{where}: {slot} shares parameters with {shared} (tied weights); shard the slots "
                            "together or replicate them")
    return problems


def _embeddings(module: nn.Module) -> list[nn.Module]:
    """A language model slot's input and output embeddings: mmhub calls them directly (splicing media tokens in,
    the chunked loss), so each must be an FSDP unit of its own to be gathered when called."""
    lm = module.language_model() if hasattr(module, "language_model") else None
    if lm is None or not hasattr(lm, "get_input_embeddings"):
        return []
    found = [lm.get_input_embeddings(), lm.get_output_embeddings()]
    return [m for m in found if m is not None]


def _tied(module: nn.Module) -> bool:
    found = _embeddings(module)
    return len(found) == 2 and found[0].weight is found[1].weight


def _blocks(module: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a slot (a transformers model's decoder layers: its ``_no_split_modules`` classes)."""
    names = set()
    for m in module.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return [m for m in module.modules() if type(m).__name__ in names and m is not module]


class ShardedStage:
    """The sharding of one stage: which slots were sharded, the replicated trainable parameters, and the hooks."""

    def __init__(self, model: Any, stage: Any, regimes: dict[str, str], world: int) -> None:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        problems = placement_problems(model, stage, regimes)
        if problems:
            raise MMHubError(f"the stage's placement cannot be used: {len(problems)} problem(s):\n"
                             + "\n".join(f"  - {p}" for p in problems))
        device = next(model.parameters()).device
        self.mesh = init_device_mesh(device.type, (world,))
        self.world = world
        self.sharded: list[nn.Module] = []
        table = dict(slots(model))
        for slot, how in stage.placement.items():
            if how != "shard":
                continue
            with torch.no_grad():  # FSDP2 shards contiguous storage; mmhub's weight layout may store W transposed
                for p in table[slot].parameters():
                    if not p.is_contiguous():
                        p.data = p.data.contiguous()
            # a language model: its blocks and embeddings each an FSDP unit of their own, side by side (no unit
            # around them: mmhub calls the embeddings outside the model's forward, which would make them roots
            # before the slot's); what lies outside them (a final norm) stays replicated. Other slots: one unit.
            units = _blocks(table[slot]) + _embeddings(table[slot]) or [table[slot]]
            for unit in units:
                fully_shard(unit, mesh=self.mesh)
                self.sharded.append(unit)
        self.replicated = [p for p in model.parameters() if p.requires_grad and not _is_dtensor(p)]
        self._sync = True
        self._hooks = [p.register_post_accumulate_grad_hook(self._average) for p in self.replicated]
        self._dist = dist

    def _average(self, p: torch.Tensor) -> None:
        if self._sync and p.grad is not None:
            self._dist.all_reduce(p.grad, op=self._dist.ReduceOp.SUM)
            p.grad.div_(self.world)

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally (a micro-batch before the last of a step): no all-reduce, no reduce-scatter."""
        self._sync = False
        for m in self.sharded:
            m.set_requires_gradient_sync(False, recurse=False)
        try:
            yield
        finally:
            self._sync = True
            for m in self.sharded:
                m.set_requires_gradient_sync(True, recurse=False)

    def close(self) -> None:
        for h in self._hooks:
            h.remove()


class ShardedAccelerator:
    """The loop's accelerator interface for a sharded stage, over the run's accelerate `Accelerator`."""

    def __init__(self, accelerator: Any, sharded: ShardedStage) -> None:
        self.acc, self.sharded = accelerator, sharded
        self.num_processes = accelerator.num_processes
        self.process_index = accelerator.process_index
        self.is_main_process = accelerator.is_main_process
        self.device = accelerator.device
        self.optimizer_step_was_skipped = False

    def no_sync(self, model: Any) -> Any:
        return self.sharded.no_sync()

    def autocast(self) -> Any:
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return self.acc.reduce(tensor, reduction=reduction)

    def clip_grad_norm_(self, params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
        """Clip by the global norm over every process's shards plus the replicated gradients (counted once)."""
        dist = self.sharded._dist
        local = torch.zeros((), dtype=torch.float64, device=self.device)
        replicated = torch.zeros((), dtype=torch.float64, device=self.device)
        grads = [p.grad for p in params if p.grad is not None]
        for g in grads:
            if _is_dtensor(g):
                local += g.to_local().double().pow(2).sum()
            else:
                replicated += g.double().pow(2).sum()
        dist.all_reduce(local, op=dist.ReduceOp.SUM)
        total = (local + replicated).sqrt()
        coef = float(max_norm) / (float(total) + 1e-6)
        if coef < 1:
            for g in grads:
                (g.to_local() if _is_dtensor(g) else g).mul_(coef)
        return total

    def wait_for_everyone(self) -> None:
        self.acc.wait_for_everyone()


def full_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with every sharded tensor gathered (a collective: every process calls it, in the same order)."""
    return {k: (v.full_tensor() if _is_dtensor(v) else v).detach() for k, v in state.items()}


def full_optimizer_state(model: nn.Module, optimizer: Any) -> dict[str, Any]:
    """The optimizer's state with full tensors, keyed by parameter name (torch.distributed.checkpoint.state_dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))


def load_full_state(model: nn.Module, optimizer: Any, state: dict[str, torch.Tensor],
                    optim_state: dict[str, Any] | None) -> None:
    """Put full tensors (every process has them) into the sharded model and its optimizer."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, state, options=options)
    if optim_state is not None:  # accelerate's AcceleratedOptimizer wraps the torch optimizer these functions want
        set_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), optim_state_dict=optim_state,
                                 options=options)
