"""`mmhub train`: build a spec, train its stages into a run folder, resume a stopped run.

A run folder holds ``run_spec.json`` (the spec as given, written atomically at the
start), ``run_settings.json`` (``--max-steps``, which a resume keeps unless given again),
one folder per stage with its ``checkpoints/step-N``, ``metrics.jsonl`` and, once the stage
is done, ``model/`` (loadable with `MMModel.from_pretrained`).

``--resume DIR`` rebuilds the model from ``DIR/run_spec.json``, skips finished stages and
continues the current one from its newest checkpoint that reads whole (a damaged one is
passed over, and said); ``--resume DIR SPEC`` with SPEC = the run's spec plus stages appended
at the end runs those too. Leftovers of interrupted saves are cleaned when a run starts or
resumes (`mmhub.train.cleanup`). Launch several processes with ``accelerate launch`` or
``torchrun`` for DDP; FSDP and DeepSpeed come from accelerate's config.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from mmhub.atomic import write_text_atomic
from mmhub.errors import MMHubError

RUN_SPEC = "run_spec.json"
RUN_SETTINGS = "run_settings.json"  # the command-line settings a resume keeps: {"max_steps": N or null}


def train(spec: Any = None, out: str | Path | None = None, stage: str | None = None,
          resume: str | Path | None = None, max_steps: int | None = None, progress_bar: bool = True,
          datasets: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train `spec` (a file, preset, dict or Spec) into `out`, or continue the run in `resume`."""

    from mmhub.assembly import build
    from mmhub.spec import load_spec
    from mmhub.train.deepspeed import make_accelerator
    from mmhub.train.trainer import Trainer

    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
        raise MMHubError(f"--max-steps must be a whole number >= 1, got {max_steps!r}; omit it to train each stage's "
                         "own step count")
    accelerator = make_accelerator(mixed_precision=_precision(spec, resume))
    main = accelerator.is_main_process

    if resume is not None:
        run_dir = Path(resume)
        data = read_run_spec(run_dir)
        if main:
            _clean(run_dir)
            _resume_max_steps(run_dir, max_steps)
        accelerator.wait_for_everyone()
        max_steps = stored_max_steps(run_dir)  # every process reads what the main one settled
        if spec is not None:
            given = load_spec(spec).model_dump(mode="json", exclude={"resolved"})
            if given != data:
                if not extends(data, given):
                    raise MMHubError(f"--resume {run_dir}: the spec given differs from the one the run started with "
                                     f"({run_dir / RUN_SPEC}) in more than new stages at the end; resume without a "
                                     "spec, or start a new run with --out")
                if main:  # the run goes on with the new stages appended; its finished stages stay as they are
                    write_text_atomic(run_dir / RUN_SPEC, json.dumps(given, indent=2))
                data = given
        model = build(data)
    else:
        if spec is None:
            raise MMHubError("give a spec (file or preset) to train, or --resume RUN_DIR")
        sp = load_spec(spec)
        run_dir = Path(out) if out is not None else Path("runs") / sp.name
        if main:
            if (run_dir / RUN_SPEC).exists():
                raise MMHubError(f"{run_dir} already holds a run; continue it with --resume {run_dir}, "
                                 "or choose another --out")
            run_dir.mkdir(parents=True, exist_ok=True)
            _clean(run_dir)
            write_text_atomic(run_dir / RUN_SETTINGS, json.dumps({"max_steps": max_steps}))
            write_text_atomic(run_dir / RUN_SPEC,
                              json.dumps(sp.model_dump(mode="json", exclude={"resolved"}), indent=2))
        accelerator.wait_for_everyone()
        model = build(sp)
    trainer = Trainer(model, run_dir, datasets=datasets, accelerator=accelerator, progress_bar=progress_bar)
    return trainer.run(stage=stage, resume=resume is not None, max_steps=max_steps)


def read_run_spec(run_dir: Path) -> dict[str, Any]:
    """A run folder's ``run_spec.json`` as a record, or `MMHubError` saying it is missing or damaged."""
    path = Path(run_dir) / RUN_SPEC
    if not path.is_file():
        raise MMHubError(f"{run_dir} is not an mmhub run folder ({RUN_SPEC} is missing); pass the --out folder of "
                         "an earlier `mmhub train`")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MMHubError(f"{path} is damaged ({exc}; {path.stat().st_size} bytes): the run cannot be rebuilt from it. "
                         "Put back the spec the run started with, or start a new run with --out") from None
    if not isinstance(data, dict) or not isinstance(data.get("stages", []), list):
        raise MMHubError(f"{path} is damaged: a {type(data).__name__} without a stages list, not a spec; put back the "
                         "spec the run started with, or start a new run with --out")
    return data


def stored_max_steps(run_dir: Path) -> int | None:
    """The ``--max-steps`` a run was started (or last resumed) with: ``run_settings.json``; None when not set."""
    path = Path(run_dir) / RUN_SETTINGS
    if not path.is_file():
        return None  # a run folder written before the file existed
    try:
        value = json.loads(path.read_text()).get("max_steps")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise MMHubError(f"{path} is damaged ({exc}); write it again as {{\"max_steps\": N}} (or null for the "
                         "stages' own step counts)") from None
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise MMHubError(f"{path}: max_steps is {value!r}, not a whole number >= 1 or null; fix it")
    return value


def _resume_max_steps(run_dir: Path, given: int | None) -> None:
    """Settle the step cap of a resumed run: the stored one, unless `given` overrides it (then stored, and said)."""
    stored = stored_max_steps(run_dir)
    if given is None:
        if stored is not None:
            print(f"resuming with the run's --max-steps {stored} (from {run_dir / RUN_SETTINGS})")
        return
    if given != stored:
        was = f"the run's --max-steps {stored}" if stored is not None else "the stages' own step counts"
        print(f"--max-steps {given} overrides {was}; stored in {run_dir / RUN_SETTINGS} for later resumes")
        write_text_atomic(run_dir / RUN_SETTINGS, json.dumps({"max_steps": given}))


def _clean(run_dir: Path) -> None:
    from mmhub.train.cleanup import clean_stale  # reason: psutil comes with accelerate, a training-only dependency

    done = clean_stale(run_dir)
    if done.removed or done.restored:
        print(f"{run_dir}: {done}")


def extends(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether spec `new` is spec `old` with stages appended: everything else equal, old's stages its first ones."""
    rest = lambda d: {k: v for k, v in d.items() if k != "stages"}  # noqa: E731
    o, n = old.get("stages") or [], new.get("stages") or []
    return rest(old) == rest(new) and len(n) > len(o) and n[:len(o)] == o


def add_parser(sub: Any) -> None:
    s = sub.add_parser("train", help="train a spec's stages (accelerate; resumable)")
    s.add_argument("spec", nargs="?", help="spec file or preset (omit with --resume)")
    s.add_argument("--out", help="run folder (default runs/<spec name>)")
    s.add_argument("--stage", help="run only this stage (earlier stages must be finished in the run folder)")
    s.add_argument("--resume", metavar="DIR",
                   help="continue the run in DIR from its newest checkpoint "
                        "(with SPEC: the run's spec plus new stages at the end)")
    s.add_argument("--max-steps", type=int,
                   help="override every stage's step count (smoke runs); stored in the run: --resume keeps it unless "
                        "given again")
    s.add_argument("--no-progress", action="store_true", help="no progress bar (metrics still go to metrics.jsonl)")
    s.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    summary = train(args.spec, out=args.out, stage=args.stage, resume=args.resume, max_steps=args.max_steps,
                    progress_bar=not args.no_progress)
    print(json.dumps(summary))
    return 0


def _cpu_has_bf16_matmul() -> bool:
    """Whether oneDNN reports native bf16 support on this CPU (AVX512-BF16 or AMX)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True  # unknown: do not warn


def _precision(spec: Any, resume: Any) -> str:
    """accelerate's mixed precision is per process: every stage of a run must ask for the same one."""
    from mmhub.spec import load_spec

    if resume is not None:
        stages = read_run_spec(Path(resume)).get("stages", [])
        wanted = {s.get("precision", "fp32") if isinstance(s, dict) else "fp32" for s in stages}
    else:
        wanted = {st.precision for st in load_spec(spec).stages} if spec is not None else set()
    if len(wanted) > 1:
        raise MMHubError(f"the stages ask for different precisions {sorted(wanted)}; accelerate runs one per process: "
                         "give every stage the same precision (or train the stages in separate runs with --stage)")
    import torch

    p = next(iter(wanted), "fp32")
    if p == "fp16" and not torch.cuda.is_available():
        raise MMHubError("precision fp16 needs a CUDA GPU (loss scaling); use bf16 or fp32 on CPU")
    if p == "bf16" and not torch.cuda.is_available() and not _cpu_has_bf16_matmul():
        logging.getLogger(__name__).warning(
            "precision bf16 on a CPU without bf16 matrix instructions (no AVX512-BF16/AMX): bf16 matmuls take a slow "
            "path here (benchmarks.llava measured a bf16-autocast training step 29x slower than fp32 on such a CPU); "
            "train with precision: fp32 unless memory forces bf16")
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[p]
