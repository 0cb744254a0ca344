"""Checks across the components of a validated plan: injectors, projectors, the output side and the token budget
(the chat template and the training stages: `mmhub.stage_checks`). Each appends `Problem`s naming the spec path,
both numbers and the fix; `mmhub.validation.plan_spec` runs them all and raises every problem together."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mmhub.errors import Problem, WeightsNotFoundError, close_matches
from mmhub.interfaces import (
    Encoder,
    ProjectorFacts,
)

if TYPE_CHECKING:  # the plan's type only; validation imports these checks
    from mmhub.interfaces import BuildContext
    from mmhub.validation import Plan, Slot


def describe_slot(slot: Slot, ctx: BuildContext, problems: list[Problem]) -> Any:
    try:
        return slot.info.cls.describe(slot.config, ctx)  # type: ignore[attr-defined]
    except WeightsNotFoundError as exc:
        problems.append(Problem(slot.path, str(exc)))
    except Exception as exc:  # a component that cannot even describe itself is a spec problem
        problems.append(
            Problem(
                slot.path,
                f"{slot.info.name} could not be set up from these settings: {type(exc).__name__}: {exc}",
                "check the settings against `mmhub plugins`",
            )
        )
    return None


def hint(name: str, options: Any) -> str:
    h = close_matches(name, list(options), n=1)
    return f" (did you mean {h[0]!r}?)" if h else ""


def check_injectors(plan: Plan, problems: list[Problem]) -> None:
    if plan.backbone_facts is None:
        return
    taken: dict[str, str] = {}
    for name, slot in plan.injectors.items():
        try:
            facts = slot.info.cls.describe(slot.config, plan.ctx, plan.backbone_facts)  # type: ignore[attr-defined]
        except (ValueError, WeightsNotFoundError) as exc:
            problems.append(Problem(slot.path, str(exc), "adjust the injector's settings to the backbone"))
            continue
        for m in facts.context_modalities:
            if m not in plan.spec.encoders:
                problems.append(
                    Problem(
                        f"{slot.path}.modalities",
                        f"names modality {m!r}, which has no encoder",
                        f"use one of {', '.join(plan.spec.encoders) or '(none)'}{hint(m, plan.spec.encoders)}",
                    )
                )
            elif m in taken:
                problems.append(
                    Problem(
                        f"{slot.path}.modalities",
                        f"modality {m!r} is already taken as context by injectors.{taken[m]}",
                        "give each modality to one injector",
                    )
                )
            taken[m] = name
        plan.injector_facts[name] = facts
        fill = {
            k: v
            for k, v in (("dim", plan.backbone_facts.hidden_size), ("num_layers", plan.backbone_facts.num_layers))
            if k in type(slot.config).model_fields and getattr(slot.config, k) is None
        }
        slot.config = slot.config.model_copy(update=fill)


def check_projectors(plan: Plan, problems: list[Problem]) -> None:
    backbone_hidden = plan.backbone_facts.hidden_size if plan.backbone_facts else None
    context_dims = {m: d for f in plan.injector_facts.values() for m, d in f.context_dims.items()}
    for m, slot in plan.projectors.items():
        enc = plan.encoder_facts.get(m)
        cfg = slot.config
        update = {}
        # a context modality's tokens go to its injector, at the width the injector takes them
        hidden = context_dims.get(m, backbone_hidden) if backbone_hidden is not None else None
        target = "backbone hidden size" if hidden == backbone_hidden else "the injector's context width"
        if enc is not None:
            if cfg.in_dim is not None and cfg.in_dim != enc.out_dim:
                problems.append(
                    Problem(
                        f"projectors.{m}.in_dim",
                        f"{cfg.in_dim} != encoders.{m} output width {enc.out_dim}",
                        f"set projectors.{m}.in_dim: {enc.out_dim} or leave it out to infer it",
                    )
                )
                continue
            update["in_dim"] = enc.out_dim
        if hidden is not None:
            if cfg.out_dim is not None and cfg.out_dim != hidden:
                problems.append(
                    Problem(
                        f"projectors.{m}.out_dim",
                        f"{cfg.out_dim} != {target} {hidden}",
                        f"set projectors.{m}.out_dim: {hidden} or leave it out to infer it",
                    )
                )
                continue
            update["out_dim"] = hidden
        if enc is None or hidden is None:
            continue
        slot.config = cfg.model_copy(update=update)
        try:
            out_tokens = slot.info.cls.num_tokens(slot.config, enc.tokens_for(m))  # type: ignore[attr-defined]
        except ValueError as exc:
            problems.append(
                Problem(f"projectors.{m}", str(exc), "adjust the projector settings to the encoder's token count")
            )
            continue
        enc_cls = plan.encoders[m].info.cls if m in plan.encoders else None
        if enc_cls is not None and enc_cls.arrange is not Encoder.arrange and out_tokens != enc.tokens_for(m):
            problems.append(  # e.g. AnyRes puts the projected tile tokens back into their grid
                Problem(
                    f"projectors.{m}",
                    f"the {enc_cls.name} encoder arranges its tokens after the projector, which must keep their count "
                    f"({enc.tokens_for(m)} in, {slot.info.name} gives {out_tokens})",
                    "use a per-token projector (mlp, linear)",
                )
            )
            continue
        plan.projector_facts[m] = ProjectorFacts(enc.out_dim, hidden, out_tokens)


def check_output_side(plan: Plan, problems: list[Problem]) -> None:
    """Pairs of output projector + generator per output modality, their shapes, and the signal tokens."""
    _check_output_pairs(plan, problems)
    if not plan.spec.generators:
        return
    _check_output_backbone(plan, problems)
    for m, slot in plan.generators.items():
        _check_generator(plan, m, slot, problems)


def _check_output_pairs(plan: Plan, problems: list[Problem]) -> None:
    """Each generator has an output projector and each output projector a generator; signal tokens name both."""
    spec = plan.spec
    for m in spec.generators.keys() - spec.output_projectors.keys():
        problems.append(
            Problem(
                f"output_projectors.{m}",
                f"generator {m!r} has no output projector",
                f"add output_projectors.{m}: {{type: output_transformer}}",
            )
        )
    for m in spec.output_projectors.keys() - spec.generators.keys():
        problems.append(
            Problem(
                f"output_projectors.{m}",
                f"output projector {m!r} has no generator",
                f"add generators.{m} or remove output_projectors.{m}" + hint(m, spec.generators),
            )
        )
    for m, k in spec.signal_tokens.items():
        if m not in spec.generators:
            problems.append(
                Problem(
                    f"signal_tokens.{m}",
                    f"names output modality {m!r}, which has no generator",
                    f"remove it{hint(m, spec.generators)}",
                )
            )
        elif k < 1:
            problems.append(
                Problem(f"signal_tokens.{m}", f"{k} signal tokens cannot carry anything", "use at least 1 (4 is usual)")
            )


def _check_output_backbone(plan: Plan, problems: list[Problem]) -> None:
    """What an output side asks of the backbone and tokenizer: decoder-only, no injectors, signal names unused."""
    spec = plan.spec
    facts = plan.backbone_facts
    if facts is not None and facts.is_encoder_decoder:
        problems.append(
            Problem(
                "generators",
                "signal tokens need a decoder-only (causal LM) backbone in this version of "
                "mmhub; this backbone is encoder-decoder",
                "use an hf_causal_lm backbone",
            )
        )
    if plan.injectors:
        problems.append(
            Problem(
                "generators",
                "an output side together with injectors is not supported yet (generation "
                "decodes step by step, which injectors do not follow)",
                "remove the injectors or the output side",
            )
        )
    if plan.tokenizer is not None:
        from mmhub.signals import group_marker, token_names

        vocab = plan.tokenizer.get_vocab()
        special = set(getattr(plan.tokenizer, "all_special_tokens", []))
        for m in spec.generators:
            for name in token_names(m, spec.signal_count(m)) + [group_marker(m)]:
                if name in vocab and name not in special:
                    problems.append(
                        Problem(
                            f"signal_tokens.{m}",
                            f"{name!r} is an ordinary token of this tokenizer, so plain text could trigger generation",
                            "use a tokenizer without it (signal token names are fixed)",
                        )
                    )


def _check_generator(plan: Plan, m: str, slot: Any, problems: list[Problem]) -> None:
    """One output modality: the generator's modality and conditioning shape, the output projector inferred to it."""
    spec, facts = plan.spec, plan.backbone_facts
    gen = describe_slot(slot, plan.ctx, problems)
    if gen is None:
        return
    if gen.modality != m:
        problems.append(
            Problem(
                f"generators.{m}.type",
                f"{slot.info.name} produces {gen.modality}, not {m}",
                f"key it as generators.{gen.modality}, or use a {m} generator",
            )
        )
        return
    plan.generator_facts[m] = gen
    op = plan.output_projectors.get(m)
    if op is None or facts is None:
        return
    cfg, fill, bad = op.config, {}, False
    for key, want, what in (
        ("in_dim", facts.hidden_size, "the backbone hidden size"),
        ("in_len", spec.signal_count(m), f"signal_tokens.{m}"),
        ("out_len", gen.cond_len, f"generators.{m} ({slot.info.name}) conditioning length"),
        ("out_dim", gen.cond_dim, f"generators.{m} ({slot.info.name}) conditioning width"),
    ):
        have = getattr(cfg, key)
        if have is not None and have != want:
            problems.append(
                Problem(
                    f"output_projectors.{m}.{key}",
                    f"{have} != {what} {want}",
                    f"set output_projectors.{m}.{key}: {want} or leave it out to infer it",
                )
            )
            bad = True
        fill[key] = want
    if bad:
        return
    op.config = cfg.model_copy(update=fill)
    out = describe_slot(op, plan.ctx, problems)
    if out is None:
        return
    if (out.out_len, out.out_dim) != (gen.cond_len, gen.cond_dim):
        problems.append(
            Problem(
                f"output_projectors.{m}",
                f"{op.info.name} produces {out.out_len} x {out.out_dim} "
                f"per item but generators.{m} ({slot.info.name}) takes "
                f"{gen.cond_len} x {gen.cond_dim}",
                "use an output projector that can produce the generator's conditioning shape",
            )
        )
        return
    plan.output_facts[m] = out


def check_budget(plan: Plan, problems: list[Problem]) -> None:
    if plan.backbone_facts is None or len(plan.projector_facts) != len(plan.spec.encoders):
        return
    spec = plan.spec
    parts = [(m, spec.max_items.get(m, 1), plan.tokens_per_item(m)) for m in plan.projector_facts]
    total = sum(n * t for _, n, t in parts) + spec.min_text_tokens
    ctx_len = plan.backbone_facts.context_length
    if total > ctx_len:
        detail = " + ".join(f"{m}: {n} x {t}" for m, n, t in parts) + f" + text: {spec.min_text_tokens}"
        problems.append(
            Problem(
                "max_items",
                f"token budget {total} ({detail}) > backbone context length {ctx_len}",
                "lower max_items or the projector's token count, or extend the context (backbone rope_scaling)",
            )
        )
