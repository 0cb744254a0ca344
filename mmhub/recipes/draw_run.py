"""The drawing recipe's run: its checkpoint (weights, EMA, optimizer state, progress) and what the training loop
calls each step (the learning rate, the EMA update and loss log, the time-based checkpoint).

A checkpoint folder holds ``model.safetensors``, ``ema.safetensors``, ``optim.safetensors`` (AdamW's
moments) and ``state.json`` (settings, training settings, step, elapsed time, the logged losses),
replaced atomically in one rename.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from mmhub.atomic import atomic_dir


def _optim_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for idx, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"{idx}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return out


def _load_optim(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    sd["state"] = state
    opt.load_state_dict(sd)


def save_checkpoint(folder: Path, model: Any, ema: dict[str, torch.Tensor], opt: torch.optim.Optimizer,
                    info: dict[str, Any]) -> None:
    """Weights, EMA, optimizer state and progress, replaced atomically in one rename."""
    from safetensors.torch import save_file

    with atomic_dir(folder) as tmp:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        save_file({k: v.contiguous() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
        save_file({k: v.contiguous() for k, v in _optim_tensors(opt).items()}, str(tmp / "optim.safetensors"))
        (tmp / "state.json").write_text(json.dumps(info, indent=1))


def _lr(step: int, cfg: dict[str, Any]) -> float:
    if step < cfg["warmup"]:
        return cfg["lr"] * (step + 1) / cfg["warmup"]
    p = min(1.0, (step - cfg["warmup"]) / max(1, cfg["steps"] - cfg["warmup"]))
    lo = cfg["min_lr_ratio"]
    return cfg["lr"] * (lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * p)))


def run_info(ckpt: Path, steps: int | None, resume: bool, settings: dict[str, Any], train: dict[str, Any],
             init: str | None) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The run's state record, generator settings and training settings: from the checkpoint, or (fresh) the
    `settings` and `train` given."""
    if resume and (ckpt / "state.json").is_file():
        info = json.loads((ckpt / "state.json").read_text())
        settings, cfg = info["settings"], info["train"]
        if steps is not None and steps != cfg["steps"]:
            print(f"[draw] resuming with --steps {steps} instead of {cfg['steps']} (the lr schedule stretches)",
                  flush=True)
            cfg["steps"] = steps
        return info, settings, cfg
    if resume:
        print(f"[draw] no checkpoint in {ckpt}; starting fresh", flush=True)
    if (ckpt / "state.json").is_file():
        raise SystemExit(f"{ckpt} already holds a checkpoint; pass --resume to continue it or use another --out")
    settings, cfg = dict(settings), dict(train)
    if steps is not None:
        cfg["steps"] = steps
    return {"settings": settings, "train": cfg, "step": 0, "elapsed_s": 0.0, "losses": [], "init": init}, settings, cfg


def initial_weights(model: Any, opt: torch.optim.Optimizer, ckpt: Path, step: int, cfg: dict[str, Any],
                    init: str | None) -> dict[str, torch.Tensor]:
    """Load `init`'s EMA weights (a fresh run) or the checkpoint (a resumed one); returns the EMA to keep updating."""
    from safetensors.torch import load_file

    from mmhub.weights import load_into

    ema = {k: p.detach().clone().float() for k, p in model.named_parameters() if p.requires_grad}
    if init is not None and not step:
        src = Path(init)
        if src.is_dir():
            src = (src / "checkpoint" if (src / "checkpoint").is_dir() else src) / "ema.safetensors"
        state = model.state_dict()
        state.update(load_file(str(src)))
        load_into(model, state, what=f"initial weights {src}")
        ema = {k: p.detach().clone().float() for k, p in model.named_parameters() if p.requires_grad}
        print(f"[draw] initialised from {src}", flush=True)
    if step:
        load_into(model, load_file(str(ckpt / "model.safetensors")), what="draw checkpoint")
        ema = load_file(str(ckpt / "ema.safetensors"))
        _load_optim(opt, load_file(str(ckpt / "optim.safetensors")))
        print(f"[draw] resumed at step {step}/{cfg['steps']}", flush=True)
    return ema


class Schedule:
    """The recipe's learning rate (warm-up, cosine decay to ``min_lr_ratio``) as the loop's scheduler."""

    def __init__(self, opt: torch.optim.Optimizer, cfg: dict[str, Any], step: int):
        self.opt, self.cfg, self.at = opt, cfg, step
        self._apply()

    def _apply(self) -> None:
        for group in self.opt.param_groups:
            group["lr"] = _lr(self.at, self.cfg)

    def get_last_lr(self) -> list[float]:
        return [_lr(self.at, self.cfg)]

    def step(self) -> None:
        self.at += 1
        self._apply()


class StepLog:
    """After each step: the EMA update, then every ``log_every`` steps the mean loss (kept in ``info["losses"]``)."""

    def __init__(self, model: Any, params: list[torch.nn.Parameter], ema: dict[str, torch.Tensor],
                 info: dict[str, Any], cfg: dict[str, Any], log_every: int):
        self.names = [k for k, p in model.named_parameters() if p.requires_grad]
        self.params, self.ema, self.info, self.cfg, self.log_every = params, ema, info, cfg, log_every
        self.t_start = time.time() - float(info["elapsed_s"])
        self.window: list[float] = []
        self.t_window = time.time()

    def __call__(self, progress: Any, result: Any, lr: float) -> None:
        step, cfg = progress.global_step, self.cfg
        d = min(cfg["ema"], (1 + step) / (10 + step))
        with torch.no_grad():
            for k, p in zip(self.names, self.params, strict=True):
                self.ema[k].mul_(d).add_(p.detach().float(), alpha=1 - d)
        self.window.append(result.loss)
        if step % self.log_every == 0 or step == cfg["steps"]:
            dt = (time.time() - self.t_window) / len(self.window)
            mean = sum(self.window) / len(self.window)
            self.info["losses"].append([step, round(mean, 5)])
            eta = dt * (cfg["steps"] - step) / 60
            print(f"[draw] step {step}/{cfg['steps']} loss {mean:.4f} lr {lr:.2e} {dt:.2f} s/step elapsed "
                  f"{(time.time() - self.t_start) / 60:.1f} min eta {eta:.1f} min", flush=True)
            self.window, self.t_window = [], time.time()


class Saver:
    """A checkpoint every ``minutes`` and at the last step."""

    def __init__(self, ckpt: Path, model: Any, ema: dict[str, torch.Tensor], opt: torch.optim.Optimizer,
                 info: dict[str, Any], t_start: float, minutes: float, end: int):
        self.ckpt, self.model, self.ema, self.opt, self.info = ckpt, model, ema, opt, info
        self.t_start, self.minutes, self.end, self.last = t_start, minutes, end, time.time()

    def due(self, step: int) -> bool:
        return time.time() - self.last > self.minutes * 60 or step == self.end

    def save(self, progress: Any) -> None:
        self.info.update(step=progress.global_step, elapsed_s=time.time() - self.t_start)
        save_checkpoint(self.ckpt, self.model, self.ema, self.opt, self.info)
        self.last = time.time()
        print(f"[draw] checkpoint at step {progress.global_step} -> {self.ckpt}", flush=True)
