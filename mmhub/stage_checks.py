"""Checks of a validated plan's chat template and training stages.

`check_template` resolves the spec's template against the tokenizer and refuses placeholders that are ordinary
tokens and tokenizers larger than the model's vocabulary; `check_stages` checks every stage's ``train:`` entries
against the plan's slots. Each appends `Problem`s naming the spec path and the fix; `mmhub.validation.plan_spec`
runs them with the other cross-checks (`mmhub.cross_checks`).
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from mmhub.errors import Problem
from mmhub.spec import PART_KEYS, LoraRegime
from mmhub.templates import resolve_template, template_problems

if TYPE_CHECKING:  # the plan's type only; validation imports these checks
    from mmhub.validation import Plan


def check_template(plan: Plan, problems: list[Problem]) -> None:
    if plan.tokenizer is None:
        return
    try:
        plan.template = resolve_template(plan.spec.template, plan.tokenizer)
    except Exception as exc:
        problems.append(Problem("template", str(exc), "use one of the named templates"))
        return
    problems.extend(template_problems(plan.template, plan.tokenizer))
    vocab = plan.tokenizer.get_vocab()
    # special: the named ones and every added token marked special (Llama-3.2-Vision's <|image|>)
    special = set(getattr(plan.tokenizer, "all_special_tokens", [])) | {
        t.content for t in getattr(plan.tokenizer, "added_tokens_decoder", {}).values() if getattr(t, "special", False)}
    for m in plan.spec.encoders:
        mark = plan.spec.placeholder(m)
        if mark in vocab and mark not in special:
            problems.append(
                Problem(
                    f"placeholders.{m}",
                    f"placeholder {mark!r} is an ordinary token of this tokenizer, "
                    "so plain text could be mistaken for media",
                    "pick a marker the tokenizer does not know",
                )
            )
    # placeholder ids may lie past the embedding table: they are replaced before the lookup
    marks = {vocab.get(plan.spec.placeholder(m)) for m in plan.spec.encoders}
    past = [i for i in range(plan.backbone_facts.vocab_size if plan.backbone_facts else 0, len(plan.tokenizer))
            if i not in marks]
    if plan.backbone_facts is not None and past:
        problems.append(
            Problem(
                "backbone",
                f"tokenizer has {len(plan.tokenizer)} tokens > the model's vocabulary "
                f"size {plan.backbone_facts.vocab_size}",
                "raise the backbone's vocab_size to at least the tokenizer size",
            )
        )


def check_stages(plan: Plan, problems: list[Problem]) -> None:
    """Stage names are unique, every `train:` key names a slot that exists with a regime it can take, and every
    stage trains something."""
    spec = plan.spec
    for dup, times in Counter(s.name for s in spec.stages).items():
        if times > 1:
            problems.append(
                Problem("stages", f"stage name {dup!r} is used {times} times", "give each stage its own name")
            )
    slots = {
        "encoders": spec.encoders,
        "projectors": spec.projectors,
        "backbone": {},
        "injectors": spec.injectors,
        "signal_tokens": {},
        "output_projectors": spec.output_projectors,
        "generators": spec.generators,
    }
    assert set(slots) == set(PART_KEYS)
    for i, st in enumerate(spec.stages):
        for key, regime in st.train.items():
            _check_train_key(plan, slots, f"stages[{i}].train.{key}", key, regime, problems)
        if not any(r != "frozen" for r in st.train.values()):
            problems.append(
                Problem(
                    f"stages[{i}].train",
                    f"stage {st.name!r} trains nothing",
                    "set e.g. train: {projectors: full} or backbone: {lora: {r: 8}}",
                )
            )


def _check_train_key(plan: Plan, slots: dict[str, Any], where: str, key: str, regime: Any,
                     problems: list[Problem]) -> None:
    """One ``train:`` entry (``projectors``, ``encoders.image``, ...) against the plan's slots."""
    head, _, slot = key.partition(".")
    if head == "signal_tokens" and not plan.spec.generators:
        problems.append(Problem(where, "this model has no signal tokens (no generators)",
                                "remove it, or add output_projectors and generators"))
    if head == "signal_tokens" and isinstance(regime, LoraRegime):
        problems.append(Problem(where, "signal tokens are embedding rows, not layers", "use signal_tokens: full"))
    if slot and slot not in slots[head]:
        problems.append(Problem(where, f"there is no {head} slot {slot!r}",
                                f"slots: {', '.join(slots[head]) or '(none)'}"))
    if isinstance(regime, LoraRegime) and head not in ("backbone", "encoders"):
        problems.append(Problem(where, "LoRA is for the backbone or encoders", "train projectors with `full`"))
    quantize = getattr(plan.backbone.config if plan.backbone else None, "quantize", None)
    if head == "backbone" and regime == "full" and quantize:
        problems.append(Problem(where, f"the backbone is quantized ({quantize}); 4-bit weights cannot be trained "
                                       "in full", "use backbone: {lora: {r: 16}} (QLoRA), or remove backbone.quantize"))
