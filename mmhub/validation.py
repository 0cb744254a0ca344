"""Cross-component validation: a `Spec` -> a `Plan` of typed configs and known shapes.

Runs before any weights load. Each component slot is resolved through the
registry and its settings validated by the component's own ``Config``; then
widths, token budget, template and stages are checked across components. Every
problem found is collected, each naming the spec path, both numbers and the fix,
and raised together as one `SpecError`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mmhub import weights as weight_sources
from mmhub.cross_checks import (
    check_budget,
    check_injectors,
    check_output_side,
    check_projectors,
    describe_slot,
    hint,
)
from mmhub.errors import PluginError, Problem, SpecError, UnknownComponentError
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
from mmhub.memory_check import check_memory
from mmhub.registry import ComponentInfo, Registry, get_registry
from mmhub.spec import Spec, problems_from_validation
from mmhub.stage_checks import check_stages, check_template
from mmhub.xformers_probe import xformers_status


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
        out = self.projector_facts[modality].out_tokens
        enc = self.encoder_facts.get(modality)
        if enc is not None and modality in enc.spliced_by_modality and out == enc.tokens_for(modality):
            return enc.spliced_for(modality)  # a per-token projector before a layout that pools (AnyRes, OneVision)
        return out


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
        cls = info.cls  # a class registered by reference is imported here, the first time a spec uses it
    except PluginError as exc:
        problems.append(Problem(f"{path}.type", str(exc), f"fix or reinstall the plugin {info.plugin!r}"))
        return None
    try:
        config = cls.Config.model_validate(cs.settings())
    except ValidationError as exc:
        problems.extend(problems_from_validation(exc, prefix=path, fields=cls.Config.model_fields))
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

    # installed is enough to build: backbones fall back to SDPA (logged) where xformers' kernels cannot run
    if spec.attention == "xformers" and not xformers_status().installed:
        problems.append(
            Problem(
                "attention",
                "xformers is requested but not importable here",
                "install xformers (CUDA machines) or set attention: auto",
            )
        )
    _resolve_inputs(plan, registry, problems)
    _resolve_outputs(plan, registry, problems)
    _check_pairing(spec, problems)
    _describe_all(plan, problems)

    check_injectors(plan, problems)
    check_projectors(plan, problems)
    check_output_side(plan, problems)
    check_budget(plan, problems)
    check_template(plan, problems)
    check_stages(plan, problems)
    if not problems:  # sizes are only meaningful for a spec that is otherwise valid
        check_memory(plan, problems)
    if problems:
        raise SpecError(problems, source or f"spec {spec.name!r}")
    return plan


def _resolve_inputs(plan: Plan, registry: Registry, problems: list[Problem]) -> None:
    """Encoders (own or shared with another modality), projectors, the backbone and injectors -> typed slots."""
    spec = plan.spec
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
                    f"name a modality with a `type:`{hint(ref, own)}",
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


def _resolve_outputs(plan: Plan, registry: Registry, problems: list[Problem]) -> None:
    """Output projectors and generators -> typed slots."""
    spec = plan.spec
    for m, cs in spec.output_projectors.items():
        if (s := _slot("output_projector", f"output_projectors.{m}", cs, registry, problems)) is not None:
            plan.output_projectors[m] = s
    for m, cs in spec.generators.items():
        if (s := _slot("generator", f"generators.{m}", cs, registry, problems)) is not None:
            plan.generators[m] = s


def _check_pairing(spec: Spec, problems: list[Problem]) -> None:
    """Every encoder has a projector and back; per-modality settings name real modalities; placeholders differ."""
    for m in spec.encoders.keys() - spec.projectors.keys():
        problems.append(
            Problem(f"projectors.{m}", f"encoder {m!r} has no projector", f"add projectors.{m}: {{type: mlp}}")
        )
    for m in spec.projectors.keys() - spec.encoders.keys():
        problems.append(
            Problem(
                f"projectors.{m}",
                f"projector {m!r} has no encoder",
                f"add encoders.{m} or remove projectors.{m}" + hint(m, spec.encoders),
            )
        )
    for key in ("placeholders", "max_items"):
        for m in getattr(spec, key).keys() - spec.encoders.keys():
            problems.append(
                Problem(
                    f"{key}.{m}", f"names modality {m!r}, which has no encoder", f"remove it{hint(m, spec.encoders)}"
                )
            )
    marks = [spec.placeholder(m) for m in spec.encoders]
    if len(set(marks)) != len(marks):
        problems.append(
            Problem("placeholders", f"two modalities share a placeholder: {marks}", "give each modality its own marker")
        )


def _describe_all(plan: Plan, problems: list[Problem]) -> None:
    """Each component's facts (widths, token counts) and the tokenizer, read without loading weights."""
    ctx = plan.ctx
    for m, slot in plan.encoders.items():
        if m in plan.shared:
            continue
        if (facts := describe_slot(slot, ctx, problems)) is not None:
            plan.encoder_facts[m] = facts
    for m, owner in plan.shared.items():
        if owner in plan.encoder_facts:
            plan.encoder_facts[m] = plan.encoder_facts[owner]
    if plan.backbone is not None:
        plan.backbone_facts = describe_slot(plan.backbone, ctx, problems)
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


# top-level fields that only label a spec: when one is missing, the rest of the spec can still be checked
LABELS = {"name": "unnamed"}


def plan_source(source: Any, registry: Registry | None = None, **options: Any) -> Plan:
    """`plan_spec(load_spec(source))`, except that a spec missing only a label (``name``) is checked in full too:
    the missing label is reported together with every other problem, instead of hiding them."""
    from mmhub.spec import load_spec, parse_text, spec_from_dict
    from mmhub.spec_file import read_text

    registry = registry or get_registry()
    where = str(source) if isinstance(source, (str, Path)) else None
    try:
        spec = load_spec(source, registry)
    except SpecError as exc:
        labels = [p for p in exc.problems if p.path in LABELS and "missing" in p.message]
        path = Path(str(source)).expanduser() if isinstance(source, (str, Path)) else None
        data = source if isinstance(source, dict) else \
            parse_text(read_text(path), str(path)) if path is not None and path.is_file() else None
        if not labels or len(labels) != len(exc.problems) or not isinstance(data, dict):
            raise
        try:
            plan_spec(spec_from_dict({**data, **{p.path: LABELS[p.path] for p in labels}}), registry,
                      source=where, **options)
        except SpecError as more:
            raise SpecError(exc.problems + more.problems, exc.source) from None
        raise
    return plan_spec(spec, registry, source=where, **options)
