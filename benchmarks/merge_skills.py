"""Skill merging, measured: two specialists from one base, merged with every method, scored per question type.

    mmhub train skills-base --out runs/skills-base                  # the projector on captions (no questions)
    mmhub train skills-shape-color --out runs/skills-shape-color    # + LoRA on shape and colour questions only
    mmhub train skills-yes-no --out runs/skills-yes-no              # + LoRA on yes/no questions only
    python -m benchmarks.merge_skills [--runs runs] [--limit 450] [--out runs/skills-merge]
    python -m benchmarks.merge_skills --search 'shape_color=0.5,0.75,1;yes_no=1,1.5,2'   # weights chosen on train
    python -m benchmarks.merge_skills --methods ties --search 'yes_no=1.5,2' --search-settings 'density=0.5,0.7'

For each method (`linear`, `slerp`, `task_arithmetic`, `ties`, `dare_linear`, `dare_ties`) the script writes a merge
config (``OUT/METHOD.yaml``: the backbone slot merged, every other slot the base's; the specialists' LoRA
adapters folded into their weights first; the ``+combine`` rows merge them as one adapter instead), runs
``mmhub merge`` on it and scores the merged model with the easy-VQA task (``mmhub eval MODEL --task easy-vqa
--limit N``: strict, per question type) beside the base and both specialists. ``OUT/table.json`` holds every
score; the table printed is the one in docs/merging.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from mmhub.atomic import write_text_atomic

# the task-vector methods add each specialist's whole update (weight 1); linear and slerp average the two models
METHODS: dict[str, dict[str, Any]] = {
    "linear": {"method": "linear", "weights": {"shape_color": 0.5, "yes_no": 0.5}},
    "slerp": {"method": "slerp", "weights": {"shape_color": 1.0, "yes_no": 1.0}, "t": 0.5},
    "task_arithmetic": {"method": "task_arithmetic", "weights": {"shape_color": 1.0, "yes_no": 1.0}},
    "ties": {"method": "ties", "weights": {"shape_color": 1.0, "yes_no": 1.0}, "density": 0.5},
    "dare_linear": {"method": "dare_linear", "weights": {"shape_color": 1.0, "yes_no": 1.0}, "density": 0.5},
    "dare_ties": {"method": "dare_ties", "weights": {"shape_color": 1.0, "yes_no": 1.0}, "density": 0.5},
}
# the same methods with the adapters merged as one adapter (``adapters: combine``) instead of folded first
COMBINED = {f"{m}+combine": m for m in ("task_arithmetic", "ties")}
TYPES = ("shape", "color", "yes_no")


def folders(runs: Path, yes_no: str = "skills-yes-no", base: str = "skills-base/align",
            shape_color: str = "skills-shape-color") -> dict[str, Path]:
    """The three trained models (the recipes' run folders: ``base`` is RUN/STAGE, the specialists' stage is
    ``skill``); a missing one says which recipe to run."""
    out = {"base": runs / base / "model",
           "shape_color": runs / shape_color / "skill" / "model",
           "yes_no": runs / yes_no / "skill" / "model"}
    recipes = {"base": base.split("/")[0], "shape_color": shape_color, "yes_no": yes_no}
    for name, path in out.items():
        if not (path / "mmhub_spec.json").is_file():
            raise SystemExit(f"{path} is missing: run `mmhub train {recipes[name]} --out {runs / recipes[name]}` first")
    return out


def parse_grid(text: str) -> dict[str, list[float]]:
    """'shape_color=0.5,1;yes_no=1,2' -> {'shape_color': [0.5, 1.0], 'yes_no': [1.0, 2.0]}."""
    grid = {}
    for part in filter(None, text.split(";")):
        name, _, values = part.partition("=")
        grid[name.strip()] = [float(v) for v in values.split(",") if v.strip()]
    return grid


def score(path: Path, limit: int, task: str = "easy_vqa") -> dict[str, Any]:
    """Strict accuracy overall and per question type on the first `limit` test questions of `task` (``easy_vqa``, or
    ``easy_vqa_balanced``: the yes/no questions replaced by ones whose answer the wording does not give)."""
    from mmhub.evaluation import evaluate
    from mmhub.model import MMModel

    result = evaluate(MMModel.from_pretrained(path), task, limit=limit, batch_size=50)
    return {"accuracy": result["accuracy"], "per_type": {t: result["per_type"][t]["accuracy"] for t in TYPES},
            "n": result["n"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.merge_skills", description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--limit", type=int, default=450)
    ap.add_argument("--out", default="runs/skills-merge")
    ap.add_argument("--methods", default=",".join([*METHODS, *COMBINED]))
    ap.add_argument("--yes-no", default="skills-yes-no", help="the yes/no specialist's recipe (its run folder's name)")
    ap.add_argument("--shape-color", default="skills-shape-color", help="the shape + colour specialist's recipe")
    ap.add_argument("--base", default="skills-base/align", help="the common base: its recipe's run folder/stage")
    ap.add_argument("--search", default=None, metavar="GRID",
                    help="choose each method's weights on the train split first (`search:` in the merge config), "
                         "e.g. 'shape_color=0.5,0.75,1;yes_no=0.6,0.8,1'; the chosen merge is scored on test")
    ap.add_argument("--search-settings", default=None, metavar="GRID",
                    help="method settings searched with the weights, e.g. 'density=0.5,0.7' (TIES and DARE)")
    ap.add_argument("--search-limit", type=int, default=200, help="train questions scored per candidate")
    ap.add_argument("--task", default="easy_vqa", choices=("easy_vqa", "easy_vqa_balanced"),
                    help="the eval task scored (and searched on): easy_vqa_balanced asks yes/no questions whose answer "
                         "only looking gives")
    ap.add_argument("--slots", default="backbone",
                    help="the slots merged, comma-separated (e.g. 'backbone,projectors.image' when a specialist "
                         "trained its projector too); every other slot is the base's")
    a = ap.parse_args(argv)
    from mmhub.merge.config import read_config
    from mmhub.merge.run import merge

    models = folders(Path(a.runs), a.yes_no, a.base, a.shape_color)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    slots = [s.strip() for s in a.slots.split(",") if s.strip()]
    table: dict[str, Any] = {"limit": a.limit, "task": a.task, "slots": slots,
                             "models": {k: str(v) for k, v in models.items()}, "rows": {}}
    for name in ("base", "shape_color", "yes_no"):
        table["rows"][name] = score(models[name], a.limit, a.task)
        print(name, json.dumps(table["rows"][name]), flush=True)
    for method in a.methods.split(","):
        cfg = {"models": {k: str(v) for k, v in models.items()}, "base": "base", "seed": 0,
               "slots": {slot: METHODS[COMBINED.get(method, method)] for slot in slots}}
        if method in COMBINED:
            cfg["adapters"] = "combine"
        elif a.search:
            cfg["search"] = {"weights": parse_grid(a.search), "split": "train", "limit": a.search_limit,
                             "batch_size": 50, "task": a.task}
            if a.search_settings:
                cfg["search"]["settings"] = parse_grid(a.search_settings)
        path = out / f"{method}.yaml"
        write_text_atomic(path, yaml.safe_dump(cfg, sort_keys=False))
        t0 = time.perf_counter()
        report: dict[str, Any] = {}
        merged = merge(read_config(path), out / method, report=report)
        took = round(time.perf_counter() - t0, 1)
        row = score(merged, a.limit, a.task) | {"merge_s": took} | ({"adapters": report} if report else {})
        searched = merged / "merge_search.json"
        if searched.is_file():  # the weights chosen on train and every candidate's train scores
            found = json.loads(searched.read_text(encoding="utf-8"))
            row["search"] = {"chosen": found["chosen"][slots[0]]["weights"], "rows": found["rows"]}
        table["rows"][method] = row
        print(method, json.dumps(row), flush=True)
        write_text_atomic(out / "table.json", json.dumps(table, indent=1) + "\n")
    write_text_atomic(out / "table.json", json.dumps(table, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
