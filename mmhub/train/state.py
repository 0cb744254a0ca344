"""Training checkpoints without pickle: model tensors, optimizer, scheduler, RNG and data position.

A checkpoint folder (written atomically: temp sibling + rename) holds

* ``model.safetensors``: what `mmhub.checkpoint.tensors_to_save` keeps (trainable,
  adapter and config-built tensors), tied tensors stored once;
* ``optimizer.safetensors`` + ``optimizer.json``: AdamW moments as tensors, the
  rest of its state dict (param groups, step counters) as JSON;
* ``scheduler.json``: the LR scheduler's state;
* ``rng.safetensors`` + ``rng.json``: torch (CPU and CUDA), numpy and python RNG states;
* ``progress.json``: stage, epoch, step within the epoch, global step, samples seen,
  skipped samples, the spec's adapters/trained slots.

Loading reads tensors with safetensors and everything else as JSON, so resuming
never unpickles anything. Every file is read and checked before anything is restored: a
missing, truncated or damaged one is a `CheckpointError` naming it, and `load_newest`
then resumes from the checkpoint before (saying so).
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mmhub.atomic import atomic_dir
from mmhub.checkpoint import _dedupe, tensors_to_save
from mmhub.errors import CheckpointError

STEP_PREFIX = "step-"


def _tensors_and_json(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Split a nested state dict: tensors go to `tensors` (by path), the rest stays as JSON with references."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().contiguous().cpu()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[_key(k), _tensors_and_json(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_tensors_and_json(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _key(k: Any) -> Any:
    return {"__int__": k} if isinstance(k, int) else k


def _rebuild(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__dict__" in obj:
        return {(k["__int__"] if isinstance(k, dict) else k): _rebuild(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_rebuild(v, tensors) for v in obj]
    return obj


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    np_state = np.random.get_state()
    info = {"python": _pyrandom(random.getstate()),
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, info


def _pyrandom(state: tuple) -> list:
    return [state[0], list(state[1]), state[2]]


def set_rng_state(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    p = info["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    n = info["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def save_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any, progress: dict[str, Any],
                    model_state: dict[str, torch.Tensor] | None = None,
                    optimizer_state: dict[str, Any] | None = None) -> Path:
    """Write a resumable checkpoint to `path` atomically. A sharded stage passes its gathered `model_state` and its
    `optimizer_state` keyed by parameter name (`mmhub.train.fsdp`); the record notes the keying."""
    state, aliases = _dedupe(model_state if model_state is not None else tensors_to_save(model, full=False))
    opt_tensors: dict[str, torch.Tensor] = {}
    opt_json = _tensors_and_json(optimizer_state if optimizer_state is not None else optimizer.state_dict(), "opt",
                                 opt_tensors)
    rng_tensors, rng_json = rng_state()
    progress = {**progress, "adapters": {k: v.model_dump() for k, v in model.spec.adapters.items()},
                "trained": list(model.spec.trained),
                "optimizer_keys": "names" if optimizer_state is not None else "indices"}
    with atomic_dir(path) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"aliases": json.dumps(aliases)})
        save_file(opt_tensors or {"_empty": torch.zeros(0)}, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(opt_json))
        (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict() if scheduler is not None else {}))
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        (tmp / "rng.json").write_text(json.dumps(rng_json))
        (tmp / "progress.json").write_text(json.dumps(progress, indent=2))
    return path


def read_progress(path: Path) -> dict[str, Any]:
    """A checkpoint's ``progress.json``, checked to be a record with the integer counters a resume needs."""
    record = _json(Path(path), "progress.json")
    counters = ("stage_index", "epoch", "batch_in_epoch", "global_step", "samples_seen")
    wrong = [k for k in counters if not isinstance(record.get(k), int) or isinstance(record.get(k), bool)]
    if not isinstance(record, dict) or wrong:
        raise CheckpointError(f"{path}/progress.json is damaged: " + (f"{', '.join(wrong)} missing or not an integer"
                              if isinstance(record, dict) else f"a {type(record).__name__}, not a record")
                              + "; resume from an earlier checkpoint (delete this folder)")
    return record


def _json(path: Path, name: str) -> Any:
    try:
        return json.loads((path / name).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a complete mmhub training checkpoint: {name} is missing; resume from an "
                              "earlier checkpoint (delete this folder)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}/{name} is damaged ({exc}); resume from an earlier checkpoint (delete this "
                              "folder)") from None


def _tensors(path: Path, name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors file's tensors and metadata, or `CheckpointError` naming the file (missing or truncated)."""
    file = path / name
    if not file.is_file():
        raise CheckpointError(f"{path} is not a complete mmhub training checkpoint: {name} is missing; resume from an "
                              "earlier checkpoint (delete this folder)")
    try:
        with safe_open(str(file), "pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise CheckpointError(f"{file} is damaged ({file.stat().st_size} bytes; {exc}), e.g. cut short by a full disk; "
                              "resume from an earlier checkpoint (delete this folder)") from None


def load_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any, sharded: bool = False) -> dict[str, Any]:
    """Restore model tensors, optimizer, scheduler and RNG from `path`; returns its progress record.

    Every file is read and parsed before anything is restored, so a missing or damaged file raises
    `CheckpointError` naming it and leaves the model as it was; a file that parses but does not fit
    the run raises it too."""
    path = Path(path)
    progress = read_progress(path)
    state, meta = _tensors(path, "model.safetensors")
    opt_tensors, _ = _tensors(path, "optimizer.safetensors")
    opt_json, sched = _json(path, "optimizer.json"), _json(path, "scheduler.json")
    rng_tensors, rng_json = _tensors(path, "rng.safetensors")[0], _json(path, "rng.json")
    try:
        aliases = json.loads(meta.get("aliases", "{}"))
        for alias, canonical in aliases.items():
            state[alias] = state[canonical]
        opt_state = _rebuild(opt_json, opt_tensors)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: model.safetensors aliases or optimizer.json do not fit their tensors "
                              f"({type(exc).__name__}: {exc}); resume from an earlier checkpoint (delete this "
                              "folder)") from None
    by_name = progress.get("optimizer_keys") == "names"
    if sharded and not by_name:
        raise CheckpointError(f"{path} was written by an unsharded stage; resume it without the stage's placement "
                              "(or on one process)")
    unexpected = [k for k in state if k not in model.state_dict()]
    if unexpected:
        raise CheckpointError(f"{path}: {len(unexpected)} tensors do not belong to this model, e.g. {unexpected[:3]}; "
                              "resume with the spec the run was started with")
    if sharded or by_name:  # parameter-name keyed full state: onto shards, or onto a plain model (another count)
        from mmhub.train.fsdp import load_full_state

        real = hasattr(optimizer, "param_groups")  # not the stand-in of a finished stage replayed for its weights
        try:
            load_full_state(model, optimizer if real else None, state, opt_state if real else None)
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: its tensors do not fit this run ({type(exc).__name__}: {exc}); resume "
                                  "from an earlier checkpoint (delete this folder)") from None
        _restore(path, None, None, scheduler, sched, rng_tensors, rng_json)
        return progress
    model.load_state_dict(state, strict=False)
    _restore(path, optimizer, opt_state, scheduler, sched, rng_tensors, rng_json)
    return progress



def _restore(path: Path, optimizer: Any, opt_state: Any, scheduler: Any, sched: Any, rng_tensors: dict[str, Any],
             rng_json: Any) -> None:
    step = "optimizer.json"
    try:
        if optimizer is not None:
            optimizer.load_state_dict(opt_state)
        step = "scheduler.json"
        if scheduler is not None:
            scheduler.load_state_dict(sched)
        step = "rng.json / rng.safetensors"
        set_rng_state(rng_tensors, rng_json)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: {step} does not fit this run ({type(exc).__name__}: {exc}); resume from an "
                              "earlier checkpoint (delete this folder)") from None


def load_newest(stage_dir: Path, model: Any, optimizer: Any, scheduler: Any,
                log: Callable[[str], None], sharded: bool = False) -> tuple[Path, dict[str, Any]] | None:
    """Restore the newest checkpoint of a stage that reads whole, saying which damaged ones were passed over;
    None when the stage has none. Raises `CheckpointError` when every one is damaged."""
    found = step_folders(stage_dir)
    problems = []
    for path in reversed(found):
        try:
            return path, load_checkpoint(path, model, optimizer, scheduler, sharded)
        except CheckpointError as exc:
            problems.append(str(exc))
            log(f"warning: checkpoint {path} cannot be used ({exc}); trying the one before it")
    if found:
        raise CheckpointError(f"none of the {len(found)} checkpoint(s) in {Path(stage_dir) / 'checkpoints'} can be "
                              f"used; newest: {problems[0]}. Delete that folder to train the stage from its start.")
    return None


def step_folders(stage_dir: Path) -> list[Path]:
    """Every ``step-N`` folder of a stage, complete or not, oldest first."""
    folder = Path(stage_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX)
             and p.name[len(STEP_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def checkpoints(stage_dir: Path) -> list[Path]:
    """A stage's complete checkpoints (with ``progress.json``), oldest first; temp folders of interrupted writes
    are ignored."""
    return [p for p in step_folders(stage_dir) if (p / "progress.json").is_file()]


def prune(stage_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints of a stage."""
    for old in checkpoints(stage_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
