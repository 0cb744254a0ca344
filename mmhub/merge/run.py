"""`merge`: load the models, check that every merged slot lines up (pre-flight), merge tensor by tensor, save.

Pre-flight lists every problem at once, each with the slot, both sides and the fix, before any tensor is merged
or anything written: an unknown slot, model or method, bad method settings or model counts, a slot whose component
type differs between models, a tensor missing or of another shape, tokenizers or signal tokens that
differ. LoRA adapters are folded into their base weights first (peft's merge), so a slot is merged as the weights
it computes with; or, with ``adapters: combine``, merged as one adapter over the shared base
(`mmhub.merge.adapters`). The merged model is the base with its merged slots' tensors replaced; it is saved
atomically, so a failure writes nothing: self-contained (``full=True``: merged weights are no longer the weight
sources') when adapters were folded, as the merged slots and adapters alone when they were combined.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from mmhub.errors import MMHubError
from mmhub.merge.adapters import adapter_slots, base_weights, combine_adapters, combine_problems
from mmhub.merge.config import MergeConfig, SlotMerge
from mmhub.merge.methods import MergeMethod
from mmhub.merge.tensor_weights import WeightValue, positions, uncovered, weight_for
from mmhub.regimes import slots as model_slots
from mmhub.registry import Registry, get_registry


def _component_type(module: Any) -> str:
    """A slot module's registered component type (its ``name``); shapes are compared tensor by tensor."""
    return str(getattr(module, "name", type(module).__name__))


def _slot_maps(models: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each model's slot path -> component module, listed once."""
    return {name: dict(model_slots(m)) for name, m in models.items()}


def _weights(cfg: MergeConfig, sm: SlotMerge, cls: type[MergeMethod]) -> dict[str, WeightValue]:
    if sm.weights is not None:
        return dict(sm.weights)
    return {n: 1.0 for n in cfg.models if n != cfg.base or not cls.needs_base}


def method_plan(cfg: MergeConfig, registry: Registry, skip: list[str] = ()) -> tuple[
        dict[str, tuple[MergeMethod, dict]], dict[str, str]]:
    """Per slot of `cfg` (but `skip`), the method instance and weights by model; and per slot the problem with its
    method, settings, weights or model count. Needs no model, so it runs before any is loaded."""
    plan: dict[str, tuple[MergeMethod, dict]] = {}
    errors: dict[str, str] = {}
    for slot, sm in cfg.slots.items():
        if slot in skip:
            continue
        where = f"slots.{slot}"
        try:
            cls = registry.merge_method(sm.method).cls
            method = cls(cls.Settings.model_validate(sm.params))
        except ValidationError as exc:
            bad = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            errors[slot] = f"{where}: {sm.method}'s settings: {bad}"
            continue
        except MMHubError as exc:  # an unknown method: the message lists the registered ones
            errors[slot] = f"{where}: {exc}"
            continue
        weights = _weights(cfg, sm, cls)
        unknown = [n for n in weights if n not in cfg.models]
        if unknown:
            errors[slot] = f"{where}: weights name {unknown}, which are not among models ({', '.join(cfg.models)})"
            continue
        missing = [n for n in weights if n not in cfg.inputs] if cls.needs_inputs else []
        if missing:
            errors[slot] = (f"{where}: {sm.method} needs each merged model's own data; add inputs.{missing[0]}: "
                            "{data: DATASET, limit: N} (a dataset spec as in a training stage)"
                            + (f" and the same for {missing[1:]}" if len(missing) > 1 else ""))
            continue
        bound = method.bind(list(weights))
        if bound:
            errors[slot] = f"{where}: {sm.method}: " + "; ".join(bound)
            continue
        n = len(weights)
        if n < cls.min_models or (cls.max_models is not None and n > cls.max_models):
            want = cls.min_models if cls.max_models == cls.min_models else f"at least {cls.min_models}"
            errors[slot] = f"{where}: {sm.method} merges {want} model(s), the weights name {n}"
            continue
        plan[slot] = (method, weights)
    return plan, errors


def preflight(cfg: MergeConfig, models: dict[str, Any], registry: Registry,
              slot_maps: dict[str, dict[str, Any]] | None = None) -> dict[str, tuple[MergeMethod, dict]]:
    """Every problem of the merge, raised together; returns per slot (method instance, weights by model)."""
    problems: list[str] = []
    plan: dict[str, tuple[MergeMethod, dict]] = {}
    base = models[cfg.base]
    slot_maps = slot_maps or _slot_maps(models)
    base_slots = slot_maps[cfg.base]
    for name, m in models.items():
        if m.tokenizer.get_vocab() != base.tokenizer.get_vocab():
            problems.append(f"models.{name}: its tokenizer differs from the base's ({len(m.tokenizer)} vs "
                            f"{len(base.tokenizer)} tokens); merge models that share one tokenizer")
        sig, bsig = getattr(m, "signal_tokens", None), getattr(base, "signal_tokens", None)
        if (sig is None) != (bsig is None) or (sig is not None and sig.ids.tolist() != bsig.ids.tolist()):
            problems.append(f"models.{name}: its signal tokens differ from the base's; merge models with the same "
                            "output side")
    methods, method_errors = method_plan(cfg, registry, skip=[s for s in cfg.slots if s not in base_slots])
    for slot in cfg.slots:
        where = f"slots.{slot}"
        if slot not in base_slots:
            problems.append(f"{where}: the base has no slot {slot!r} (slots: {', '.join(base_slots)})")
            continue
        if slot in method_errors:
            problems.append(method_errors[slot])
            continue
        method, weights = methods[slot]
        if cfg.adapters == "combine" and adapter_slots(models, list(weights), slot):
            problems.extend(combine_problems(where, slot, models, list(weights), cfg.base, slot_maps))
        else:
            problems.extend(_slot_problems(where, slot, slot_maps, list(weights), cfg.base))
        problems.extend(_rule_problems(where, slot_maps[cfg.base][slot], weights))
        plan[slot] = (method, weights)
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise MMHubError(f"the merge cannot run: {len(problems)} problem(s):\n{listed}")
    return plan


def _slot_problems(where: str, slot: str, slot_maps: dict[str, dict[str, Any]], names: list[str],
                   base_name: str) -> list[str]:
    problems = []
    base_module = slot_maps[base_name][slot]
    want = base_module.state_dict()
    for name in names:
        mine = slot_maps[name].get(slot)
        if mine is None:
            problems.append(f"{where}: model {name} has no slot {slot!r}")
            continue
        mine_type, base_type = _component_type(mine), _component_type(base_module)
        if mine_type != base_type:
            problems.append(f"{where}: model {name}'s component is {mine_type!r} but {base_name}'s is {base_type!r}; "
                            "merge slots of the same component type")
            continue
        have = mine.state_dict()
        for key, t in want.items():
            if key not in have:
                problems.append(f"{where}: model {name} lacks tensor {key}")
            elif tuple(have[key].shape) != tuple(t.shape):
                problems.append(f"{where}: tensor {key} is {tuple(have[key].shape)} in {name} but "
                                f"{tuple(t.shape)} in {base_name}")
    return problems


def _rule_problems(where: str, module: Any, weights: dict[str, WeightValue]) -> list[str]:
    """Per model whose weight is rules: the slot's tensors no rule covers (named as without adapters)."""
    problems = []
    keys = [k for k, t in base_weights(module).items() if t.is_floating_point()]
    for name, value in weights.items():
        missed = uncovered(value, keys)
        if missed:
            more = f" and {len(missed) - 1} more" if len(missed) > 1 else ""
            problems.append(f"{where}.weights.{name}: no rule covers tensor {missed[0]}{more}; end the rules with a "
                            "default that has neither filter nor layers, e.g. {value: 1.0}")
    return problems


def fold_adapters(models: dict[str, Any]) -> dict[str, list[str]]:
    """Fold every model's LoRA adapters into its base weights (peft's own merge, `mmhub.adapters.merge_adapters`), so
    a slot is merged as the weights it computes with: averaging ``lora_A`` and ``lora_B`` separately would not
    average the adapters' updates (B1 A1 + B2 A2 != (B1 + B2)(A1 + A2)), and adapters of different ranks fold to the
    same shapes. Returns, per model, the slots folded."""
    from mmhub.adapters import merge_adapters

    return {name: merge_adapters(m) for name, m in models.items() if m.spec.adapters}


@torch.no_grad()
def merge_models(cfg: MergeConfig, models: dict[str, Any], registry: Registry | None = None) -> Any:
    """The base model with every configured slot merged (in place); pre-flight first. LoRA adapters are folded into
    their base weights first (`fold_adapters`), so the merged model carries none; with ``adapters: combine`` the
    slots whose models carry adapters are merged as adapters (`combine_adapters`) and the result keeps one. The
    merged slots are recorded as trained, and the merge report (per combined slot: rank and energy kept) is left
    on the model as ``merge_report``."""
    if cfg.adapters == "fold":
        fold_adapters(models)
    slot_maps = _slot_maps(models)
    plan = preflight(cfg, models, registry or get_registry(), slot_maps)
    merged_model = models[cfg.base]
    report: dict[str, Any] = {}
    grams = _input_grams(cfg, models, plan, slot_maps)  # before any slot of the base is merged into
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        for slot, (method, weights) in plan.items():
            if cfg.adapters == "combine" and adapter_slots(models, list(weights), slot):
                report[slot] = combine_adapters(slot, method, weights, models, cfg.base, cfg.adapter_rank)
                continue  # the base weights are the same in every model (pre-flight): only the adapters merge
            if slot not in merged_model.spec.trained:
                merged_model.spec.trained.append(slot)
            target = slot_maps[cfg.base][slot].state_dict()
            sources = {n: slot_maps[n][slot].state_dict() for n in weights}
            where = positions(k for k, t in target.items() if t.is_floating_point())
            for key, t in target.items():
                if not t.is_floating_point():
                    continue  # integer buffers (positions, counters) stay the base's
                layer, pos = where[key]
                args = (t if method.needs_base else None, [sources[n][key] for n in weights],
                        [weight_for(w, key, layer, pos) for w in weights.values()])
                seen = [grams.get((n, slot), {}).get(key) for n in weights]
                if method.needs_inputs and all(g is not None for g in seen):
                    t.copy_(method.merge_inputs(*args, grams=seen))
                else:
                    t.copy_(method.merge(*args))
    merged_model.merge_report = report
    return merged_model


def _input_grams(cfg: MergeConfig, models: dict[str, Any], plan: dict[str, tuple[MergeMethod, dict]],
                 slot_maps: dict[str, dict[str, Any]]) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    """Per (model, slot) merged by a data-aware method: its linear layers' input Gram matrices on its own data
    (`mmhub.merge.inputs`), kept on the model so a weight search records them once."""
    from mmhub.merge.inputs import gram_matrices

    out = {}
    for slot, (method, weights) in plan.items():
        if not method.needs_inputs:
            continue
        for name in weights:
            spec = cfg.inputs[name]
            cache = models[name].__dict__.setdefault("_merge_grams", {})
            key = (slot, spec.model_dump_json())
            if key not in cache:
                cache[key] = gram_matrices(models[name], slot_maps[name][slot], spec, f"inputs.{name}")
            out[(name, slot)] = cache[key]
    return out


def merge(config: MergeConfig, out: str | Path, allow_paths: list[str | Path] | None = None,
          registry: Registry | None = None, report: dict[str, Any] | None = None,
          on_search_row: Any = None) -> Path:
    """Load the config's models, merge, and save the result to `out` (atomically); returns the folder. `report`, if
    given, receives per combined-adapter slot the rank and the update energy kept. With a ``search`` section the
    weights are chosen first (`mmhub.merge.search`; each scored row goes to `on_search_row`), the chosen merge is
    saved and the rows written beside it as ``merge_search.json``."""
    from mmhub.loading import load
    from mmhub.merge.headers import check_headers

    registry = registry or get_registry()
    check_headers(config, registry)  # what the folders' files show, before any weight is read
    models = {}
    for name, ref in config.models.items():
        try:
            models[name] = load(ref, allow_paths=allow_paths)
        except MMHubError as exc:
            raise MMHubError(f"models.{name}: {ref} cannot be loaded: {exc}") from None
    if config.base not in models:
        raise MMHubError(f"base: {config.base!r} is not among models ({', '.join(models)})")
    rows, search = None, config.search
    if search is not None:
        from mmhub.merge.search import search_weights, task_scorer, with_weights

        chosen, rows = search_weights(config, models, task_scorer(search, registry), registry, on_search_row)
        config = with_weights(config, chosen["weights"], registry, chosen["settings"])
    merged = merge_models(config, models, registry)
    if rows is not None:
        merged.merge_search = rows
    if report is not None:
        report.update(merged.merge_report)
    if config.adapters == "combine":  # merged slots are marked trained: saved whole; sourced weights stay sourced
        merged.spec.init_from = None  # a base folder's adapters would have the old rank
        return merged.save_pretrained(out)
    search_text = None
    if rows is not None:  # serialised before anything is written, so a failure leaves no folder behind
        import json

        search_text = json.dumps({"search": search.model_dump(), "chosen": config.model_dump()["slots"],
                                  "rows": rows}, indent=1) + "\n"
    folder = merged.save_pretrained(out, full=True)
    if search_text is not None:
        from mmhub.atomic import write_text_atomic

        write_text_atomic(Path(folder) / "merge_search.json", search_text)
    return folder
