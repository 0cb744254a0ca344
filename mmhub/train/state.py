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
never unpickles anything.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mmhub.checkpoint import _dedupe, atomic_dir, tensors_to_save
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


def save_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any, progress: dict[str, Any]) -> Path:
    """Write a resumable checkpoint to `path` atomically."""
    state, aliases = _dedupe(tensors_to_save(model, full=False))
    opt_tensors: dict[str, torch.Tensor] = {}
    opt_json = _tensors_and_json(optimizer.state_dict(), "opt", opt_tensors)
    rng_tensors, rng_json = rng_state()
    progress = {**progress, "adapters": {k: v.model_dump() for k, v in model.spec.adapters.items()},
                "trained": list(model.spec.trained)}
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
    try:
        return json.loads((Path(path) / "progress.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not a readable mmhub training checkpoint ({exc}); pass a folder written by "
                              "`mmhub train` (…/checkpoints/step-N)") from None


def load_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """Restore model tensors, optimizer, scheduler and RNG from `path`; returns its progress record."""
    path = Path(path)
    progress = read_progress(path)
    state = load_file(str(path / "model.safetensors"))
    with safe_open(str(path / "model.safetensors"), "pt") as fh:
        aliases = json.loads((fh.metadata() or {}).get("aliases", "{}"))
    for alias, canonical in aliases.items():
        state[alias] = state[canonical]
    _, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise CheckpointError(f"{path}: {len(unexpected)} tensors do not belong to this model, e.g. {unexpected[:3]}; "
                              "resume with the spec the run was started with")
    opt_tensors = load_file(str(path / "optimizer.safetensors"))
    optimizer.load_state_dict(_rebuild(json.loads((path / "optimizer.json").read_text()), opt_tensors))
    if scheduler is not None:
        scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    set_rng_state(load_file(str(path / "rng.safetensors")), json.loads((path / "rng.json").read_text()))
    return progress


def checkpoints(stage_dir: Path) -> list[Path]:
    """A stage's complete checkpoints, oldest first (temp folders of interrupted writes are ignored)."""
    folder = Path(stage_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX) and (p / "progress.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def prune(stage_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints of a stage."""
    for old in checkpoints(stage_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
