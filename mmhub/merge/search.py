"""Merge weights chosen on held-out data: a grid of per-model weights, each merge scored on a validation split.

Equal weights are rarely the best merge: one model's task vector can drown another's skill (two easy-VQA
specialists merged by task arithmetic at 1 + 1 keep shape and colour but answer "yes" to almost every yes/no
question). A merge config's ``search`` section names, per model, the weights to try; every combination is merged
in memory (the models are loaded and their adapters folded once; the base's merged slots are restored between
candidates) and scored with an evaluation task on a split that is not the one reported (``test`` is refused).

Objectives:

- ``keep_skills`` (default): for each question type ``t`` of the task's ``per_type`` scores, the margin
  ``merged[t] - max over the merged models m of m[t]`` (each model scored alone on the same items); the candidate's
  score is its worst margin, ties broken by overall accuracy. A merge that keeps every specialist's skill scores
  near 0; one that loses a skill scores that skill's loss.
- ``accuracy``: the overall score.

`search_weights` returns the chosen weights and a row per candidate (weights, scores, objective); `mmhub merge`
saves the chosen merge and writes the rows beside it (``merge_search.json``).
"""

from __future__ import annotations

import itertools
from typing import Any, Callable

import torch

from mmhub.errors import MMHubError
from mmhub.merge.config import MergeConfig, SlotMerge, WeightSearch
from mmhub.merge.tensor_weights import WeightValue, plain
from mmhub.registry import Registry, get_registry

Scores = dict[str, Any]


def candidates(cfg: MergeConfig, registry: Registry | None = None) -> list[dict[str, dict[str, Any]]]:
    """Every combination of the search's candidate weights and method settings, in grid order: each a dict with
    ``weights`` (model -> weight) and ``settings`` (setting -> value)."""
    search = _search(cfg)
    registry = registry or get_registry()
    merged_models = {n for sm in cfg.slots.values() for n in (sm.weights or cfg.models)}
    problems = [f"search.weights.{n}: {n!r} is not merged by any slot (models merged: {sorted(merged_models)})"
                for n in search.weights if n not in merged_models or n not in cfg.models]
    problems += [f"search.weights.{n}: no weight to try" for n, ws in search.weights.items() if not ws]
    problems += [f"search.settings.{k}: no value to try" for k, vs in search.settings.items() if not vs]
    known = {k for sm in cfg.slots.values() for k in _method_cls(sm, registry).Settings.model_fields}
    problems += [f"search.settings.{k}: no merged slot's method takes {k!r} (they take: {sorted(known) or 'none'})"
                 for k in search.settings if k not in known]
    if problems:
        raise MMHubError("the weight search cannot run:\n" + "\n".join(f"  - {p}" for p in problems))
    axes = [("weights", n, search.weights[n]) for n in search.weights]
    axes += [("settings", k, search.settings[k]) for k in search.settings]
    grid = []
    for combo in itertools.product(*(values for _, _, values in axes)):
        cand: dict[str, dict[str, Any]] = {"weights": {}, "settings": {}}
        for (part, name, _), value in zip(axes, combo, strict=True):
            cand[part][name] = value
        grid.append(cand)
    if len(grid) > search.max_candidates:
        sizes = " x ".join(str(len(values)) for _, _, values in axes)
        raise MMHubError(f"search: {sizes} = {len(grid)} combinations, more than max_candidates "
                         f"({search.max_candidates}); each is one merge and one evaluation: try fewer values, or "
                         f"raise max_candidates")
    return grid


def _method_cls(sm: SlotMerge, registry: Registry) -> Any:
    return registry.merge_method(sm.method).cls


def _search(cfg: MergeConfig) -> WeightSearch:
    if cfg.search is None:
        raise MMHubError("the merge config has no search section")
    if cfg.search.split == "test":
        raise MMHubError("search.split: test: weights chosen on the test split make its scores optimistic; choose "
                         "on train (or a validation split) and report on test")
    if cfg.adapters != "fold":
        raise MMHubError("search: the weight search merges folded weights; set adapters: fold (combine the chosen "
                         "weights as adapters afterwards)")
    return cfg.search


def with_weights(cfg: MergeConfig, weights: dict[str, WeightValue], registry: Registry | None = None,
                 settings: dict[str, Any] | None = None) -> MergeConfig:
    """`cfg` with `weights` put into every slot that merges those models (other models keep their weights), and
    `settings` into every slot whose method takes them."""
    from mmhub.merge.run import _weights

    registry = registry or get_registry()
    slots = {}
    for slot, sm in cfg.slots.items():
        cls = _method_cls(sm, registry)
        current = _weights(cfg, sm, cls)
        current.update({n: w for n, w in weights.items() if n in current})
        taken = {k: v for k, v in (settings or {}).items() if k in cls.Settings.model_fields}
        slots[slot] = SlotMerge.model_validate({**sm.model_dump(), **taken, "weights": current})
    return cfg.model_copy(update={"slots": slots, "search": None})


def per_type(scores: Scores) -> dict[str, float]:
    """A task result's per-type accuracies (``{type: fraction}``); empty when the task reports none."""
    out = {}
    for t, v in (scores.get("per_type") or {}).items():
        out[t] = float(v["accuracy"] if isinstance(v, dict) else v)
    return out


def objective(scores: Scores, references: dict[str, Scores], kind: str = "keep_skills") -> float:
    """The candidate's score (higher is better): its overall accuracy, or its worst per-type margin to the best
    reference model on that type (`keep_skills`; overall accuracy when the task reports no types)."""
    if kind == "accuracy":
        return float(scores["accuracy"])
    mine = per_type(scores)
    if not mine:
        return float(scores["accuracy"]) - max(float(r["accuracy"]) for r in references.values())
    return min(mine[t] - max(per_type(r).get(t, 0.0) for r in references.values()) for t in mine)


def _slot_state(model: Any, slots: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    from mmhub.merge.run import _slot_maps

    maps = _slot_maps({"m": model})["m"]
    return {s: maps[s].state_dict() for s in slots if s in maps}


@torch.no_grad()
def search_weights(cfg: MergeConfig, models: dict[str, Any], score: Callable[[Any], Scores],
                   registry: Registry | None = None,
                   on_row: Callable[[dict[str, Any]], None] | None = None) -> tuple[dict[str, dict], list[dict]]:
    """Try every candidate of ``cfg.search`` on the loaded `models` (merging into ``models[cfg.base]``, restored
    after each); `score(model)` evaluates one model. Returns the best candidate (``weights`` and ``settings``,
    as `candidates` gives them) and one row per candidate (the
    models scored alone come first, as ``{"model": name, ...}`` rows). The base is left as it was loaded (adapters
    folded)."""
    from mmhub.merge.run import fold_adapters, merge_models

    registry = registry or get_registry()
    search = _search(cfg)
    grid = candidates(cfg, registry)
    fold_adapters(models)
    merged_names = sorted({n for sm in cfg.slots.values() for n in (sm.weights or models)} - {cfg.base})
    rows: list[dict[str, Any]] = []
    references: dict[str, Scores] = {}
    for name in merged_names or [n for n in models if n != cfg.base]:
        references[name] = score(models[name])
        rows.append({"model": name, **_summary(references[name])})
        if on_row:
            on_row(rows[-1])
    base = models[cfg.base]
    saved = {s: {k: t.clone() for k, t in sd.items()} for s, sd in _slot_state(base, list(cfg.slots)).items()}
    best: tuple[float, float, int] | None = None
    try:
        for i, cand in enumerate(grid):
            merged = merge_models(with_weights(cfg, cand["weights"], registry, cand["settings"]), models, registry)
            scores = score(merged)
            value = objective(scores, references, search.objective)
            row = {k: plain(v) for k, v in cand.items() if v}
            rows.append({**row, "objective": round(value, 6), **_summary(scores)})
            if on_row:
                on_row(rows[-1])
            key = (value, float(scores["accuracy"]), -i)
            if best is None or key > best:
                best = key
            _restore(base, saved)
    finally:
        _restore(base, saved)
    assert best is not None
    index = -best[2]  # the key holds -i, so that the earlier of equal candidates wins
    rows[len(references) + index]["chosen"] = True
    chosen = grid[index]
    return chosen, rows


def _restore(model: Any, saved: dict[str, dict[str, torch.Tensor]]) -> None:
    for slot, sd in _slot_state(model, list(saved)).items():
        for k, t in sd.items():
            t.copy_(saved[slot][k])


def _summary(scores: Scores) -> dict[str, Any]:
    return {"accuracy": float(scores["accuracy"]), "per_type": per_type(scores), "n": scores.get("n")}


def task_scorer(search: WeightSearch, registry: Registry | None = None) -> Callable[[Any], Scores]:
    """`score(model)` running ``search.task`` on ``search.split`` (first ``search.limit`` items)."""
    from mmhub.evaluation import evaluate

    def score(model: Any) -> Scores:
        was_training = model.training
        model.eval()
        try:
            return evaluate(model, search.task, registry=registry, split=search.split, limit=search.limit,
                            batch_size=search.batch_size)
        finally:
            model.train(was_training)

    return score


__all__ = ["candidates", "with_weights", "objective", "per_type", "search_weights", "task_scorer"]
