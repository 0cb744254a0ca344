"""Cross-component validation: a `Spec` -> a `Plan` of typed configs and known shapes.

Runs before any weights load. Each component slot is resolved through the
registry and its settings validated by the component's own ``Config``; then
widths, token budget, template and stages are checked across components. Every
problem found is collected, each naming the spec path, both numbers and the fix,
and raised together as one `SpecError`.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from mmhub import weights as weight_sources
from mmhub.attention import xformers_importable
from mmhub.errors import Problem, SpecError, UnknownComponentError, WeightsNotFoundError, close_matches
from mmhub.interfaces import (
    BackboneFacts,
    BuildContext,
    ComponentConfig,
    EncoderFacts,
    GeneratorFacts,
    InjectorFacts,
    OutputProjectorFacts,
    ProjectorFacts,
)
from mmhub.registry import ComponentInfo, Registry, get_registry
from mmhub.spec import PART_KEYS, LoraRegime, Spec, problems_from_validation
from mmhub.templates import resolve_template, template_problems


@dataclass
class Slot:
    """A resolved component slot: where it is in the spec, what it is, and its typed settings."""

    path: str
    info: ComponentInfo
    config: ComponentConfig

    def as_dict(self) -> dict[str, Any]:
        return {"type": self.info.name, **self.config.model_dump(mode="json")}


@dataclass
class Plan:
    """A validated spec: typed slots plus the facts each check used (widths, tokens, template)."""

    spec: Spec
    ctx: BuildContext
    encoders: dict[str, Slot] = field(default_factory=dict)
    projectors: dict[str, Slot] = field(default_factory=dict)
    backbone: Slot | None = None
    injectors: dict[str, Slot] = field(default_factory=dict)
    shared: dict[str, str] = field(default_factory=dict)  # modality -> modality whose encoder instance it uses
    encoder_facts: dict[str, EncoderFacts] = field(default_factory=dict)
    projector_facts: dict[str, ProjectorFacts] = field(default_factory=dict)
    backbone_facts: BackboneFacts | None = None
    injector_facts: dict[str, InjectorFacts] = field(default_factory=dict)
    output_projectors: dict[str, Slot] = field(default_factory=dict)
    generators: dict[str, Slot] = field(default_factory=dict)
    generator_facts: dict[str, GeneratorFacts] = field(default_factory=dict)
    output_facts: dict[str, OutputProjectorFacts] = field(default_factory=dict)
    tokenizer: Any = None
    template: Any = None
    sandbox: Any = None  # the roots a loaded folder's files must lie in (None: a user's own spec)

    def resolved_dict(self) -> dict[str, Any]:
        """The spec with every default filled in and inferred widths written out."""
        data = self.spec.model_dump(mode="json", exclude={"resolved"})
        data["encoders"] = {m: self.shared.get(m) or s.as_dict() for m, s in self.encoders.items()}
        data["projectors"] = {m: s.as_dict() for m, s in self.projectors.items()}
        data["backbone"] = self.backbone.as_dict() if self.backbone else data["backbone"]
        data["injectors"] = {n: s.as_dict() for n, s in self.injectors.items()}
        data["output_projectors"] = {m: s.as_dict() for m, s in self.output_projectors.items()}
        data["generators"] = {m: s.as_dict() for m, s in self.generators.items()}
        data["signal_tokens"] = {m: self.spec.signal_count(m) for m in self.spec.generators}
        data.pop("init_from", None)  # a saved model's own weights supersede the folder it started from (unless
        # that folder ships with mmhub: checkpoint.save_model then writes it back and stores only the difference)
        data["template"] = self.template.name if self.template is not None else self.spec.template
        data["placeholders"] = {m: self.spec.placeholder(m) for m in self.spec.encoders}
        data["max_items"] = {m: self.spec.max_items.get(m, 1) for m in self.spec.encoders}
        return data

    @property
    def context_modalities(self) -> dict[str, str]:
        """Modality -> the injector that takes it as cross-attention context (not spliced into the text)."""
        return {m: name for name, f in self.injector_facts.items() for m in f.context_modalities}

    def tokens_per_item(self, modality: str) -> int:
        """Sequence tokens one item of `modality` occupies (1 when an injector takes it as context)."""
        if modality in self.context_modalities:
            return 1
        return self.projector_facts[modality].out_tokens


def _slot(kind: str, path: str, cs: Any, registry: Registry, problems: list[Problem]) -> Slot | None:
    try:
        info = registry.get(kind, cs.type)  # type: ignore[arg-type]
    except UnknownComponentError as exc:
        problems.append(
            Problem(
                f"{path}.type",
                str(exc).split(" Install")[0],
                "use a registered name (`mmhub plugins`) or install the plugin that provides it",
            )
        )
        return None
    try:
        config = info.cls.Config.model_validate(cs.settings())
    except ValidationError as exc:
        problems.extend(problems_from_validation(exc, prefix=path, fields=info.cls.Config.model_fields))
        return None
    before = len(problems)
    check_sizes(path, config.model_dump(), problems)
    return Slot(path, info, config) if len(problems) == before else None


# settings that size a tensor: negative is never meant, zero only for counts (layers, tokens), and past
# MAX_SIZE no model fits in memory (a 4M-wide hidden state is 16 MB per token in float32)
_SIZE_KEY = re.compile(
    r"(size|dim|width|heads|vocab|channels|hidden|intermediate|embed|positions|layers|tokens|depth|"
    r"experts|latents|queries|frames|^num_|_num$)"
)
_POSITIVE_KEY = re.compile(r"(size|dim|width|heads|vocab|channels|hidden|intermediate|embed)")
MAX_SIZE = 1 << 22


def check_sizes(path: str, settings: Any, problems: list[Problem]) -> None:
    """Every size-like integer in a component's settings (nested config dicts included) is within range."""
    stack = [(path, settings)]
    while stack:
        where, node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            here = f"{where}.{key}" if isinstance(key, str) else f"{where}[{key}]"
            if isinstance(value, (dict, list)):
                stack.append((here, value))
                continue
            if not isinstance(key, str) or isinstance(value, bool) or not isinstance(value, int):
                continue
            name = key.lower()
            if not _SIZE_KEY.search(name):
                continue
            low = 1 if _POSITIVE_KEY.search(name) else 0
            if not low <= value <= MAX_SIZE:
                problems.append(
                    Problem(
                        here,
                        f"is {value:,}; a size must be within {low}..{MAX_SIZE:,}",
                        f"give a size this machine can hold (1 to {MAX_SIZE:,})",
                    )
                )


def _describe(slot: Slot, ctx: BuildContext, problems: list[Problem]) -> Any:
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


def plan_spec(
    spec: Spec,
    registry: Registry | None = None,
    source: str | None = None,
    sandbox: Any = None,
    trust_remote_code: bool = False,
) -> Plan:
    """Validate `spec` against the registry and across components; raise `SpecError` with every problem.

    `sandbox` (a `mmhub.weights.sandbox.Sandbox`) confines every file the spec names to its roots: set when the
    spec comes from a model folder, which someone else may have written. `trust_remote_code` lets components run
    code shipped with their weights (transformers' ``auto_map``); only the caller can set it, never a spec."""
    registry = registry or get_registry()
    ctx = BuildContext(
        resolve=lambda uri: weight_sources.resolve(uri, registry, sandbox),
        attention=spec.attention,
        registry=registry,
        trust_remote_code=trust_remote_code,
    )
    plan = Plan(spec=spec, ctx=ctx, sandbox=sandbox)
    problems: list[Problem] = []

    if spec.attention == "xformers" and not xformers_importable():
        problems.append(
            Problem(
                "attention",
                "xformers is requested but not importable here",
                "install xformers (CUDA machines) or set attention: auto",
            )
        )
    for m, cs in spec.encoders.items():
        if isinstance(cs, str):
            continue
        if (s := _slot("encoder", f"encoders.{m}", cs, registry, problems)) is not None:
            plan.encoders[m] = s
            if m not in s.info.cls.modalities_in:
                problems.append(
                    Problem(
                        f"encoders.{m}.type",
                        f"{s.info.name} accepts {', '.join(s.info.cls.modalities_in)}, not {m!r}",
                        f"use an encoder for {m}, or key it by a modality it accepts",
                    )
                )
    for m, ref in spec.encoders.items():
        if not isinstance(ref, str):
            continue
        owner = plan.encoders.get(ref)
        if ref not in spec.encoders or isinstance(spec.encoders[ref], str):
            own = [k for k, v in spec.encoders.items() if not isinstance(v, str)]
            problems.append(
                Problem(
                    f"encoders.{m}",
                    f"shares the encoder of {ref!r}, which is not an encoder slot of its own",
                    f"name a modality with a `type:`{_hint(ref, own)}",
                )
            )
        elif owner is not None:
            if m not in owner.info.cls.modalities_in:
                problems.append(
                    Problem(
                        f"encoders.{m}",
                        f"shares the {owner.info.name} encoder of {ref!r}, which accepts "
                        f"{', '.join(owner.info.cls.modalities_in)}, not {m!r}",
                        "give this modality its own encoder",
                    )
                )
            else:
                plan.encoders[m] = owner
                plan.shared[m] = ref
    for m, cs in spec.projectors.items():
        if (s := _slot("projector", f"projectors.{m}", cs, registry, problems)) is not None:
            plan.projectors[m] = s
    plan.backbone = _slot("backbone", "backbone", spec.backbone, registry, problems)
    for name, cs in spec.injectors.items():
        if (s := _slot("injector", f"injectors.{name}", cs, registry, problems)) is not None:
            plan.injectors[name] = s

    for m in spec.encoders.keys() - spec.projectors.keys():
        problems.append(
            Problem(f"projectors.{m}", f"encoder {m!r} has no projector", f"add projectors.{m}: {{type: mlp}}")
        )
    for m in spec.projectors.keys() - spec.encoders.keys():
        problems.append(
            Problem(
                f"projectors.{m}",
                f"projector {m!r} has no encoder",
                f"add encoders.{m} or remove projectors.{m}" + _hint(m, spec.encoders),
            )
        )
    for m, cs in spec.output_projectors.items():
        if (s := _slot("output_projector", f"output_projectors.{m}", cs, registry, problems)) is not None:
            plan.output_projectors[m] = s
    for m, cs in spec.generators.items():
        if (s := _slot("generator", f"generators.{m}", cs, registry, problems)) is not None:
            plan.generators[m] = s
    for key in ("placeholders", "max_items"):
        for m in getattr(spec, key).keys() - spec.encoders.keys():
            problems.append(
                Problem(
                    f"{key}.{m}", f"names modality {m!r}, which has no encoder", f"remove it{_hint(m, spec.encoders)}"
                )
            )
    marks = [spec.placeholder(m) for m in spec.encoders]
    if len(set(marks)) != len(marks):
        problems.append(
            Problem("placeholders", f"two modalities share a placeholder: {marks}", "give each modality its own marker")
        )

    for m, slot in plan.encoders.items():
        if m in plan.shared:
            continue
        if (facts := _describe(slot, ctx, problems)) is not None:
            plan.encoder_facts[m] = facts
    for m, owner in plan.shared.items():
        if owner in plan.encoder_facts:
            plan.encoder_facts[m] = plan.encoder_facts[owner]
    if plan.backbone is not None:
        plan.backbone_facts = _describe(plan.backbone, ctx, problems)
        if plan.backbone_facts is not None:
            try:
                plan.tokenizer = plan.backbone.info.cls.load_tokenizer(plan.backbone.config, ctx)  # type: ignore[attr-defined]
            except Exception as exc:
                problems.append(
                    Problem(
                        "backbone",
                        f"the tokenizer could not be loaded: {type(exc).__name__}: {exc}",
                        "check backbone.tokenizer / backbone.source",
                    )
                )

    _check_injectors(plan, problems)
    _check_projectors(plan, problems)
    _check_output_side(plan, problems)
    _check_budget(plan, problems)
    _check_template(plan, problems)
    _check_stages(plan, problems)
    if problems:
        raise SpecError(problems, source or f"spec {spec.name!r}")
    return plan


def _hint(name: str, options: Any) -> str:
    h = close_matches(name, list(options), n=1)
    return f" (did you mean {h[0]!r}?)" if h else ""


def _check_injectors(plan: Plan, problems: list[Problem]) -> None:
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
                        f"use one of {', '.join(plan.spec.encoders) or '(none)'}{_hint(m, plan.spec.encoders)}",
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


def _check_projectors(plan: Plan, problems: list[Problem]) -> None:
    hidden = plan.backbone_facts.hidden_size if plan.backbone_facts else None
    for m, slot in plan.projectors.items():
        enc = plan.encoder_facts.get(m)
        cfg = slot.config
        update = {}
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
                        f"{cfg.out_dim} != backbone hidden size {hidden}",
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
        plan.projector_facts[m] = ProjectorFacts(enc.out_dim, hidden, out_tokens)


def _check_output_side(plan: Plan, problems: list[Problem]) -> None:
    """Pairs of output projector + generator per output modality, their shapes, and the signal tokens."""
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
                f"add generators.{m} or remove output_projectors.{m}" + _hint(m, spec.generators),
            )
        )
    for m, k in spec.signal_tokens.items():
        if m not in spec.generators:
            problems.append(
                Problem(
                    f"signal_tokens.{m}",
                    f"names output modality {m!r}, which has no generator",
                    f"remove it{_hint(m, spec.generators)}",
                )
            )
        elif k < 1:
            problems.append(
                Problem(f"signal_tokens.{m}", f"{k} signal tokens cannot carry anything", "use at least 1 (4 is usual)")
            )
    if not spec.generators:
        return
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
    for m, slot in plan.generators.items():
        gen = _describe(slot, plan.ctx, problems)
        if gen is None:
            continue
        if gen.modality != m:
            problems.append(
                Problem(
                    f"generators.{m}.type",
                    f"{slot.info.name} produces {gen.modality}, not {m}",
                    f"key it as generators.{gen.modality}, or use a {m} generator",
                )
            )
            continue
        plan.generator_facts[m] = gen
        op = plan.output_projectors.get(m)
        if op is None or facts is None:
            continue
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
            continue
        op.config = cfg.model_copy(update=fill)
        out = _describe(op, plan.ctx, problems)
        if out is None:
            continue
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
            continue
        plan.output_facts[m] = out


def _check_budget(plan: Plan, problems: list[Problem]) -> None:
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


def _check_template(plan: Plan, problems: list[Problem]) -> None:
    if plan.tokenizer is None:
        return
    try:
        plan.template = resolve_template(plan.spec.template, plan.tokenizer)
    except Exception as exc:
        problems.append(Problem("template", str(exc), "use one of the named templates"))
        return
    problems.extend(template_problems(plan.template, plan.tokenizer))
    vocab = plan.tokenizer.get_vocab()
    for m in plan.spec.encoders:
        mark = plan.spec.placeholder(m)
        if mark in vocab and mark not in getattr(plan.tokenizer, "all_special_tokens", []):
            problems.append(
                Problem(
                    f"placeholders.{m}",
                    f"placeholder {mark!r} is an ordinary token of this tokenizer, "
                    "so plain text could be mistaken for media",
                    "pick a marker the tokenizer does not know",
                )
            )
    if plan.backbone_facts is not None and len(plan.tokenizer) > plan.backbone_facts.vocab_size:
        problems.append(
            Problem(
                "backbone",
                f"tokenizer has {len(plan.tokenizer)} tokens > the model's vocabulary "
                f"size {plan.backbone_facts.vocab_size}",
                "raise the backbone's vocab_size to at least the tokenizer size",
            )
        )


def _check_stages(plan: Plan, problems: list[Problem]) -> None:
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
    for i, st in enumerate(spec.stages):
        for key, regime in st.train.items():
            head, _, slot = key.partition(".")
            if head == "signal_tokens" and not spec.generators:
                problems.append(
                    Problem(
                        f"stages[{i}].train.{key}",
                        "this model has no signal tokens (no generators)",
                        "remove it, or add output_projectors and generators",
                    )
                )
            if head == "signal_tokens" and isinstance(regime, LoraRegime):
                problems.append(
                    Problem(
                        f"stages[{i}].train.{key}",
                        "signal tokens are embedding rows, not layers",
                        "use signal_tokens: full",
                    )
                )
            if slot and slot not in slots[head]:
                problems.append(
                    Problem(
                        f"stages[{i}].train.{key}",
                        f"there is no {head} slot {slot!r}",
                        f"slots: {', '.join(slots[head]) or '(none)'}",
                    )
                )
            if isinstance(regime, LoraRegime) and head not in ("backbone", "encoders"):
                problems.append(
                    Problem(
                        f"stages[{i}].train.{key}",
                        "LoRA is for the backbone or encoders",
                        "train projectors with `full`",
                    )
                )
            if (
                head == "backbone"
                and regime == "full"
                and getattr(plan.backbone.config if plan.backbone else None, "quantize", None)
            ):
                problems.append(
                    Problem(
                        f"stages[{i}].train.{key}",
                        f"the backbone is quantized "
                        f"({plan.backbone.config.quantize}); 4-bit weights cannot be trained in full",
                        "use backbone: {lora: {r: 16}} (QLoRA), or remove backbone.quantize",
                    )
                )
        if not any(r != "frozen" for r in st.train.values()):
            problems.append(
                Problem(
                    f"stages[{i}].train",
                    f"stage {st.name!r} trains nothing",
                    "set e.g. train: {projectors: full} or backbone: {lora: {r: 8}}",
                )
            )
    assert set(slots) == set(PART_KEYS)
