"""Recipe: train the `pixel_diffusion` generator on easy-VQA's images and captions, export it, measure it.

    python -m mmhub.recipes.easyvqa_draw train --out runs/easyvqa-draw [--steps N] [--resume]
    python -m mmhub.recipes.easyvqa_draw export --out runs/easyvqa-draw [--dest mmhub/demo_model/easyvqa-draw]
    python -m mmhub.recipes.easyvqa_draw eval [--model DIR]

    # the shipped easyvqa-draw-outline: the easyvqa-draw weights fine-tuned with the shape-aware loss
    python -m mmhub.recipes.easyvqa_draw train --out runs/draw-outline \
        --init mmhub/demo_model/easyvqa-draw/model.safetensors \
        --steps 1000 --lr 3e-4 --warmup 20 --edge-weight 4 --freeze-text --threads 1

* data: the train split's 4,000 images (64x64, area-downsampled to the UNet's 32x32, random
  horizontal flips) with their captions ("a red circle", from `mmhub.data.easy_vqa`'s caption task);
  10 % of the captions are replaced by "" so classifier-free guidance has an unconditional model
  (`mmhub.recipes.draw_data`);
* the steps run in mmhub's one training loop (`mmhub.train.loop`) with the generator's denoising loss
  as the objective (`mmhub.train.objectives.DiffusionLoss`); AdamW with warm-up and cosine decay,
  an EMA of the weights (what is exported), a checkpoint (`mmhub.recipes.draw_run`:
  weights, EMA, optimizer state, step) written atomically every ``--checkpoint-minutes`` and at
  the end; every step's randomness (batch order, flips, dropped captions, noise, timesteps) is
  seeded by (seed, step), so ``--resume`` continues exactly where the checkpoint stopped;
* ``--edge-weight W`` makes the loss shape-aware: the squared error on the figure's outline (a 3-pixel band
  around the edge, `mmhub.generators.pixel_diffusion.outline_band`) counts 1 + W times, since the handful of
  pixels that tell a circle from a rectangle are otherwise drowned by flat background; ``--freeze-text`` keeps
  the text encoder (and so the caption features the drawing models' output projectors were aligned to) fixed;
* export: the EMA weights as fp16 safetensors (``model.safetensors``) plus the settings as
  ``generator.json`` (a generator block: ``type: pixel_diffusion`` and its settings);
* eval: a FIXED prompt set (all 24 colour x shape captions x 4 seeds = 96 images): the dominant
  colour (the nearest palette colour of the non-background pixels, by majority) must be the asked
  one, and the shape classifier (`mmhub.evaluation.shape_classifier`) must name the asked shape.
  Prints JSON with both rates and per-colour / per-shape breakdowns.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from mmhub.atomic import write_text_atomic
from mmhub.recipes.draw_data import DrawingBatches, load_split
from mmhub.recipes.draw_run import Saver, Schedule, StepLog, initial_weights, run_info
from mmhub.train.loop import Loop, Progress, SingleProcess, run_loop
from mmhub.train.objectives import DiffusionLoss

HERE = Path(__file__).resolve().parent
DEMO = HERE.parent / "demo_model" / "easyvqa-draw"
WEIGHTS = "model.safetensors"
SETTINGS_FILE = "generator.json"
# the generator the recipe trains: ~1.5 M parameters, sized for a contended 2-core CPU
SETTINGS: dict[str, Any] = {
    "image_size": 32, "output_size": 64, "upscale": "bicubic", "block_out_channels": [32, 64, 64],
    "layers_per_block": 1, "attention_levels": 1, "attention_head_dim": 32, "norm_num_groups": 32,
    "pooled_text": True, "cond_len": 6, "cond_dim": 64, "text_layers": 2, "text_heads": 2,
    "vocab": "mmhub:recipes/easyvqa-words.txt", "prediction_type": "v_prediction", "beta_schedule": "squaredcos_cap_v2",
    "sampler": "dpm", "steps": 20, "guidance_scale": 3.0,
}
TRAIN: dict[str, Any] = {"steps": 3000, "batch": 32, "lr": 7e-4, "warmup": 100, "min_lr_ratio": 0.1,
                         "weight_decay": 0.01, "ema": 0.995, "uncond_p": 0.1, "flip": True, "seed": 0,
                         "grad_clip": 1.0, "edge_weight": 0.0, "freeze_text": False}
EVAL_SEEDS = (0, 1, 2, 3)


def _ctx():
    from mmhub import weights
    from mmhub.interfaces import BuildContext
    from mmhub.registry import get_registry

    reg = get_registry()
    return BuildContext(resolve=lambda uri: weights.resolve(uri, reg), registry=reg)


def build_generator(settings: dict[str, Any]):
    """A `PixelDiffusionGenerator` from settings (through its registered class)."""
    from mmhub.generators.pixel_diffusion import PixelDiffusionGenerator as G

    return G(G.Config.model_validate(settings), _ctx())


def load_draw_model(folder: str | Path = DEMO):
    """The exported generator in `folder` (``generator.json`` + ``model.safetensors``), in eval mode."""
    folder = Path(folder)
    spec_file = folder / SETTINGS_FILE
    if not spec_file.is_file():
        from mmhub.errors import WeightsNotFoundError

        raise WeightsNotFoundError(f"{folder} holds no exported drawing model ({SETTINGS_FILE} is missing); train and "
                                   f"export one with `python -m mmhub.recipes.easyvqa_draw train` then `... export`")
    settings = json.loads(spec_file.read_text())
    settings.pop("type", None)
    settings["pretrained"] = str(folder / WEIGHTS)
    return build_generator(settings).eval()


def train(out: Path, steps: int | None = None, resume: bool = False, settings: dict[str, Any] | None = None,
          overrides: dict[str, Any] | None = None, checkpoint_minutes: float = 3.0, data=None,
          log_every: int = 10, threads: int | None = None, stop_after: int | None = None,
          init: str | None = None) -> dict[str, Any]:
    """Train (or resume) into `out`; returns the final state info. `data` = (pixels, captions) skips loading;
    `stop_after` stops (with a checkpoint) at that step, as an interrupted run would; `init` (a fresh run only)
    starts from another run's weights (its checkpoint folder's EMA, or a safetensors file) instead of random ones.
    The steps run in mmhub's training loop (`mmhub.train.loop`) with the generator's own loss as the objective."""
    out = Path(out)
    ckpt = out / "checkpoint"
    if threads:
        torch.set_num_threads(threads)
    info, settings, cfg = run_info(ckpt, steps, resume, settings or SETTINGS, {**TRAIN, **(overrides or {})}, init)
    torch.manual_seed(cfg["seed"])  # the initial weights (a resumed run overwrites them)
    model = build_generator(settings).train()
    if cfg.get("freeze_text"):  # the caption features stay as they are: a model aligned to them keeps working
        model.text.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg["weight_decay"]},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                            lr=cfg["lr"], betas=(0.9, 0.99))
    ema = initial_weights(model, opt, ckpt, int(info["step"]), cfg, init)
    pixels, captions = data if data is not None else load_split("train", settings["image_size"])
    batches = DrawingBatches(pixels, model.token_ids(captions), model.token_ids([""])[0], cfg)
    print(f"[draw] {sum(p.numel() for p in params) / 1e6:.2f} M parameters, {pixels.shape[0]} images, batch "
          f"{cfg['batch']}, {cfg['steps']} steps, threads {torch.get_num_threads()}", flush=True)
    end = cfg["steps"] if stop_after is None else min(cfg["steps"], stop_after)
    steps_log = StepLog(model, params, ema, info, cfg, log_every)
    saver = Saver(ckpt, model, ema, opt, info, steps_log.t_start, checkpoint_minutes, end)
    scheduler = Schedule(opt, cfg, int(info["step"]))
    run_loop(Loop(model=model, objective=DiffusionLoss(), optimizer=opt, scheduler=scheduler,
                  accelerator=SingleProcess(), stage=SimpleNamespace(name="draw", lr=cfg["lr"]), total=end,
                  max_grad_norm=cfg["grad_clip"], progress=Progress("draw", 0, global_step=int(info["step"])),
                  next_batches=batches, after_step=steps_log, save=saver.save, save_due=saver.due, clip_params=params))
    return info


def checkpoint_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's weights with its EMA over the trained ones (frozen tensors, e.g. a frozen text encoder,
    come from its ``model.safetensors``)."""
    from safetensors.torch import load_file

    state = load_file(str(Path(ckpt) / "model.safetensors"))
    state.update(load_file(str(Path(ckpt) / "ema.safetensors")))
    return state


# ---- export ----------------------------------------------------------------------------------------------
def export(out: Path, dest: Path = DEMO, fp16: bool = True) -> Path:
    """Write the checkpoint's EMA weights (fp16) and settings to `dest` (its other files are kept)."""
    from safetensors.torch import save_file

    ckpt = Path(out) / "checkpoint"
    info = json.loads((ckpt / "state.json").read_text())
    state = checkpoint_state(ckpt)
    dtype = torch.float16 if fp16 else torch.float32
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    meta = {"recipe": "mmhub.recipes.easyvqa_draw", "step": str(info["step"]),
            "final_loss": str(info["losses"][-1][1] if info["losses"] else "")}
    tmp = dest / f".{WEIGHTS}.tmp"
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(dest / WEIGHTS)
    settings = {"type": "pixel_diffusion", **info["settings"],
                "pretrained": f"mmhub:demo_model/{dest.name}/{WEIGHTS}"}
    write_text_atomic(dest / SETTINGS_FILE, json.dumps(settings, indent=1) + "\n")
    print(f"[draw] exported step {info['step']} ({(dest / WEIGHTS).stat().st_size / 1e6:.2f} MB) to {dest}", flush=True)
    return dest


# ---- eval ------------------------------------------------------------------------------------------------
def dominant_color(image) -> str | None:
    """The palette colour most non-background pixels are nearest to (None for an empty image).

    Every pixel goes to its nearest colour among white and the 8 palette colours; the pixels that
    go to white are background."""
    from mmhub.data.easy_vqa import PALETTE

    names = ["white", *PALETTE]
    pal = np.array([(255, 255, 255), *PALETTE.values()], dtype=np.float32)
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32).reshape(-1, 3)
    nearest = ((rgb[:, None, :] - pal[None]) ** 2).sum(-1).argmin(1)
    counts = np.bincount(nearest, minlength=len(names))[1:]
    return names[1 + int(counts.argmax())] if counts.max() > 0 else None


def prompts() -> list[tuple[str, str, str]]:
    """The fixed prompt set: (caption, colour, shape) for all 24 combinations."""
    from mmhub.data.easy_vqa import COLORS, SHAPES

    return [(f"a {c} {s}", c, s) for c in COLORS for s in SHAPES]


def evaluate(model, seeds=EVAL_SEEDS, steps: int | None = None, guidance_scale: float | None = None,
             classifier=None, save_grid: Path | None = None) -> dict[str, Any]:
    """Colour-match and shape-recognition rates on the fixed prompt set (len(seeds) images per prompt)."""
    from mmhub.evaluation.shape_classifier import load_classifier

    classifier = classifier or load_classifier()
    ps = prompts()
    caps = [p[0] for p in ps]
    cond = model.encode_text(caps)
    rows = []
    images_by_seed = []
    for seed in seeds:
        ims = model.generate(cond, seed=seed, steps=steps, guidance_scale=guidance_scale)
        images_by_seed.append(ims)
        shapes = classifier.classify(ims)
        for (cap, color, shape), im, got_shape in zip(ps, ims, shapes, strict=True):
            rows.append({"prompt": cap, "seed": seed, "color": color, "shape": shape,
                         "got_color": dominant_color(im), "got_shape": got_shape})
    if save_grid is not None:
        _grid(images_by_seed, save_grid)

    def rate(sel, key):
        return round(100.0 * sum(r[f"got_{key}"] == r[key] for r in sel) / max(1, len(sel)), 2)

    from mmhub.data.easy_vqa import COLORS, SHAPES

    return {
        "images": len(rows), "prompts": len(ps), "seeds": list(seeds),
        "steps": steps or model.config.steps,
        "guidance_scale": model.config.guidance_scale if guidance_scale is None else guidance_scale,
        "color_match_pct": rate(rows, "color"), "shape_recognised_pct": rate(rows, "shape"),
        "both_pct": round(100.0 * sum(r["got_color"] == r["color"] and r["got_shape"] == r["shape"] for r in rows)
                          / len(rows), 2),
        "per_color": {c: {"color_match_pct": rate([r for r in rows if r["color"] == c], "color"),
                          "shape_recognised_pct": rate([r for r in rows if r["color"] == c], "shape")} for c in COLORS},
        "per_shape": {s: {"color_match_pct": rate([r for r in rows if r["shape"] == s], "color"),
                          "shape_recognised_pct": rate([r for r in rows if r["shape"] == s], "shape")} for s in SHAPES},
        "misses": [r for r in rows if r["got_color"] != r["color"] or r["got_shape"] != r["shape"]],
    }


def _grid(images_by_seed: list[list], path: Path) -> None:
    from PIL import Image

    rows, cols = len(images_by_seed), len(images_by_seed[0])
    w, h = images_by_seed[0][0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for r, ims in enumerate(images_by_seed):
        for c, im in enumerate(ims):
            grid.paste(im, (c * w, r * h))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def _load_for_eval(path: Path):
    """An exported folder (generator.json) or a training run / checkpoint folder (its EMA weights)."""
    from mmhub.weights import load_into

    path = Path(path)
    if (path / SETTINGS_FILE).is_file():
        return load_draw_model(path)
    ckpt = path / "checkpoint" if (path / "checkpoint").is_dir() else path
    info = json.loads((ckpt / "state.json").read_text())
    model = build_generator(info["settings"])
    load_into(model, checkpoint_state(ckpt), what=f"draw checkpoint {ckpt} (EMA)")
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mmhub.recipes.easyvqa_draw", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train (or --resume) the generator")
    t.add_argument("--out", default="runs/easyvqa-draw")
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--resume", action="store_true")
    t.add_argument("--batch", type=int, default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--checkpoint-minutes", type=float, default=3.0)
    t.add_argument("--threads", type=int, default=None,
                   help="torch threads (1 is faster on a CPU shared with another job)")
    t.add_argument("--init", default=None,
                   help="start a fresh run from another run's EMA weights (folder or .safetensors)")
    t.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=None)
    t.add_argument("--warmup", type=int, default=None)
    t.add_argument("--stop-after", type=int, default=None, help="stop (with a checkpoint) at this step")
    t.add_argument("--edge-weight", type=float, default=None,
                   help="shape-aware loss: the figure's outline pixels count 1 + this many times (0: plain MSE)")
    t.add_argument("--min-lr-ratio", type=float, default=None)
    t.add_argument("--freeze-text", action="store_true",
                   help="keep the text encoder as initialised (models aligned to its caption features keep working)")
    e = sub.add_parser("export", help="write the trained generator (fp16 EMA weights + settings)")
    e.add_argument("--out", default="runs/easyvqa-draw")
    e.add_argument("--dest", default=str(DEMO))
    e.add_argument("--fp32", action="store_true")
    v = sub.add_parser("eval", help="colour-match and shape-recognition rates on the fixed prompt set")
    v.add_argument("--model", default=str(DEMO), help="an exported folder, or a training run's --out")
    v.add_argument("--steps", type=int, default=None)
    v.add_argument("--guidance-scale", type=float, default=None)
    v.add_argument("--seeds", type=int, default=len(EVAL_SEEDS))
    v.add_argument("--grid", default=None, help="save all images as one PNG (rows = seeds)")
    v.add_argument("--json-out", default=None)
    v.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    if a.cmd == "train":
        over = {k: v for k, v in (("batch", a.batch), ("lr", a.lr), ("warmup", a.warmup),
                                  ("edge_weight", a.edge_weight), ("min_lr_ratio", a.min_lr_ratio)) if v is not None}
        if a.freeze_text:
            over["freeze_text"] = True
        settings = dict(SETTINGS)
        if a.prediction_type:
            settings["prediction_type"] = a.prediction_type
        train(Path(a.out), a.steps, a.resume, settings=settings, overrides=over,
              checkpoint_minutes=a.checkpoint_minutes,
              threads=a.threads, stop_after=a.stop_after, init=a.init)
    elif a.cmd == "export":
        export(Path(a.out), Path(a.dest), fp16=not a.fp32)
    else:
        if a.threads:
            torch.set_num_threads(a.threads)
        model = _load_for_eval(Path(a.model))
        t0 = time.time()
        res = evaluate(model, seeds=tuple(range(a.seeds)), steps=a.steps, guidance_scale=a.guidance_scale,
                       save_grid=Path(a.grid) if a.grid else None)
        res["model"] = str(a.model)
        res["seconds"] = round(time.time() - t0, 1)
        text = json.dumps({k: v for k, v in res.items() if k != "misses"} | {"misses": len(res["misses"])}, indent=1)
        print(text)
        if a.json_out:
            write_text_atomic(Path(a.json_out), json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
