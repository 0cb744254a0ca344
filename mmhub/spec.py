"""The declarative spec: YAML/JSON -> typed objects, with every structural problem reported.

A spec has one ``{type: <registered name>, ...settings}`` slot per component:
encoders and their projectors keyed by modality (``image``, ``audio``, ...), one
backbone, optional output projectors and generators, the chat template, the
attention backend and the training stages. This module checks the *shape* of
the document; `mmhub.validation` checks it against the registry and across
components before any weights load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mmhub.errors import Problem, SpecError, close_matches
from mmhub.runtime import RuntimeOptions, lift_legacy_options
from mmhub.spec_file import check_tree, load_yaml, read_text

MAX_SIGNAL_TOKENS = 256  # per output item; published systems use 4 to 64
MAX_ITEMS = 1024  # media items of one modality in one sample
MAX_TEXT_TOKENS = 1 << 20


class ComponentSpec(BaseModel):
    """One component slot: the registered ``type`` and its settings (checked by the component)."""

    model_config = ConfigDict(extra="allow")
    type: str

    def settings(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class LoraSpec(BaseModel):
    """LoRA settings (peft): rank, scaling, dropout and which modules get adapters."""

    model_config = ConfigDict(extra="forbid")
    r: int = Field(8, gt=0)
    alpha: float = 16.0
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: Union[list[str], str] = "all-linear"
    layers: list[int] | None = Field(
        None, description="only these layers get adapters: a layer's index is the first number in its module path "
                          "(the decoder layer of an LLM, ``model.layers.3.self_attn.q_proj`` -> 3); unset: every layer")

    @field_validator("layers")
    @classmethod
    def _layers_ok(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("layers is empty: list the layer indices to adapt (e.g. [0, 1, 2]), or leave it out")
        bad = [i for i in v if i < 0]
        if bad:
            raise ValueError(f"layers {bad} are negative: layer indices count from 0")
        return sorted(set(v))


class LoraRegime(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora: LoraSpec = Field(default_factory=LoraSpec)


Regime = Union[Literal["frozen", "full"], LoraRegime]


class KeepStatesSpec(BaseModel):
    """Feature distillation against a frozen reference: the stage's loss adds ``weight`` times the mean relative
    squared distance between the model's hidden states and the reference's, after every transformer block but the
    last, at the chosen positions (`mmhub.train.keep_states`)."""

    model_config = ConfigDict(extra="forbid")
    reference: str = Field(description="the model whose hidden states are kept: a saved mmhub folder or a preset name "
                                       "(usually the base the fine-tune starts from)")
    weight: float = Field(1.0, gt=0, description="the term's weight against the next-token loss per target token")
    positions: Literal["media", "prompt", "all"] = Field(
        "media", description="media: the positions a media item's tokens fill (the update leaves how the model reads "
                             "its inputs alone); prompt: every unlabelled real position; all: every real position")
    data: Any = Field(None, description="anchor samples (any dataset spec, e.g. the other skill's questions): when "
                                        "set, the states are kept on these, one micro-batch of them per training "
                                        "micro-batch, instead of on the training batch")
    batch_size: int | None = Field(None, gt=0, description="anchor samples per micro-batch (default: the stage's)")
PART_KEYS = ("encoders", "projectors", "backbone", "injectors", "signal_tokens", "output_projectors", "generators")


class StageSpec(BaseModel):
    """One training stage: which parts train (frozen / full / LoRA) and its optimisation settings."""

    model_config = ConfigDict(extra="forbid")
    name: str
    data: Any = None
    train: dict[str, Regime] = Field(default_factory=dict)
    lr: float = Field(1e-4, gt=0)
    backbone_lr: float | None = Field(None, gt=0)
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0)
    epochs: float = Field(1.0, gt=0)
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    objective: Literal["sft", "dpo", "blip2_qformer", "pformer", "nlf"] = Field(
        "sft", description="sft: next-token loss on assistant turns; dpo: preference pairs against the model as the "
                           "stage began; blip2_qformer: BLIP-2's first stage, the Q-Former's ITC + ITM + ITG on "
                           "(image, caption) samples (a qformer projector with pretrain_heads); pformer: DLP's "
                           "language-only phase (pformer projectors learn, from the assistant text alone, the prompt "
                           "from which the frozen LLM reconstructs it); "
                           "nlf: DRESS's natural-language-feedback alignment, next-token loss on the replies refined "
                           "after feedback (the earlier reply and the critique are context; samples without a "
                           "feedback round are skipped)")
    beta: float = Field(0.1, gt=0, description="DPO temperature")
    keep_states: KeepStatesSpec | None = Field(
        None, description="keep a reference model's hidden states (objective sft, decoder-only backbones): "
                          "{reference: runs/base/model, weight: 1.0, positions: media}")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    max_grad_norm: float | None = Field(1.0, gt=0)
    save_every: int | None = Field(None, gt=0, description="checkpoint every N optimizer steps (and at the stage end)")
    keep_last: int = Field(2, ge=1, description="checkpoints kept per stage")
    group_by_length: bool = False
    pack: int | None = Field(None, gt=0, description="pack samples into rows of this many tokens (each sample attends "
                                                      "only to itself; under SDPA each sample's attention runs on its "
                                                      "own, so a row may be as long as the whole batch: no padding)")
    cache_features: bool = Field(True, description="cache frozen encoders' outputs on disk")
    max_bad_fraction: float = Field(0.01, ge=0, le=1, description="share of bad samples skipped before the run stops")
    log_every: int = Field(10, gt=0)
    placement: dict[str, Literal["shard", "replicate"]] = Field(
        default_factory=dict, description="with several processes: slots to shard (torch FSDP2 `fully_shard`: each "
                                          "process holds 1/N of the slot's parameters, gradients and optimizer state) "
                                          "or replicate (every process holds all of it; trainable ones average their "
                                          "gradients). Empty: DDP for the whole model. Only a slot that trains in "
                                          "this stage may be sharded (mmhub.train.fsdp)")

    @model_validator(mode="after")
    def _keep_states_with_sft(self) -> StageSpec:
        if self.keep_states is not None and self.objective != "sft":
            raise ValueError(f"keep_states works with objective sft, and this stage's objective is "
                             f"{self.objective!r}; drop keep_states or set objective: sft")
        return self

    @field_validator("train", mode="before")
    @classmethod
    def _known_parts(cls, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise ValueError("train must map parts to regimes, e.g. {projectors: full, backbone: {lora: {r: 8}}}")
        problems, out = [], {}
        for key, regime in value.items():
            head = str(key).split(".")[0]
            if head not in PART_KEYS:
                hint = close_matches(head, PART_KEYS, n=1)
                problems.append(f"unknown part {key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                                + f"; parts are {', '.join(PART_KEYS)}, optionally with a slot: encoders.image")
            elif regime in ("frozen", "full"):
                out[key] = regime
            elif isinstance(regime, dict) and set(regime) == {"lora"}:
                try:
                    out[key] = LoraRegime.model_validate(regime)
                except ValidationError as exc:
                    problems += [f"{key}.{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e.get('input')!r})"
                                 for e in exc.errors()]
            else:
                problems.append(f"{key}: regime {regime!r} is not one of frozen, full or {{lora: {{r: 8, ...}}}}")
        if problems:
            raise ValueError("; ".join(problems))
        return out


class Spec(BaseModel):
    """A whole MM-LLM: components, template, attention backend, token budget and stages."""

    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    encoders: dict[str, Union[ComponentSpec, str]] = Field(
        default_factory=dict, description="per modality a component, or the name of another modality whose encoder "
                                          "instance it shares (ImageBind-like: `audio: image`)")
    projectors: dict[str, ComponentSpec] = Field(default_factory=dict)
    backbone: ComponentSpec
    injectors: dict[str, ComponentSpec] = Field(
        default_factory=dict, description="components that hook into the backbone's layers (Flamingo's gated "
                                          "cross-attention, CogVLM's visual experts)")
    output_projectors: dict[str, ComponentSpec] = Field(
        default_factory=dict, description="per output modality, signal-token states -> the generator's conditioning")
    generators: dict[str, ComponentSpec] = Field(
        default_factory=dict, description="per output modality, conditioning -> media (diffusers pipelines)")
    signal_tokens: dict[str, Annotated[int, Field(ge=1, le=MAX_SIGNAL_TOKENS)]] = Field(
        default_factory=dict, description="per output modality, how many signal tokens (<img_0>..<img_{k-1}>) the "
                                          "backbone learns to emit for one item (default 4)")
    template: str = "auto"
    attention: Literal["auto", "xformers", "sdpa", "eager"] = "auto"
    runtime: RuntimeOptions = Field(
        default_factory=RuntimeOptions, description="speed and memory settings (weight_layout, loss_chunk, "
                                                    "labelled_only_mlp; mmhub.runtime), apart from what the model is")
    placeholders: dict[str, str] = Field(default_factory=dict)
    max_items: dict[str, Annotated[int, Field(ge=1, le=MAX_ITEMS)]] = Field(default_factory=dict)
    min_text_tokens: int = Field(32, ge=0, le=MAX_TEXT_TOKENS)
    stages: list[StageSpec] = Field(default_factory=list)
    seed: int = Field(0, ge=0, lt=2**63)
    init_from: str | None = Field(
        None, description="an mmhub model folder (a path, or mmhub:REL inside the package) whose weights and LoRA "
                          "adapters initialise the matching slots before training; slots it lacks (a new output side) "
                          "keep fresh weights. Saved models drop it: their own weights supersede it")
    adapters: dict[str, LoraSpec] = Field(
        default_factory=dict, description="LoRA adapters this model carries, by slot (`backbone`, `encoders.image`); "
                                          "written by training, re-injected when the model is loaded")
    trained: list[str] = Field(default_factory=list, description="slots whose own weights training changed (saved in "
                                                                   "full even when their weights come from a source)")
    resolved: dict[str, Any] | None = Field(
        None, description="written by mmhub next to saved models: package versions and weight hashes (informational)")

    @model_validator(mode="before")
    @classmethod
    def _runtime_options(cls, data: Any) -> Any:
        """Top-level ``loss_chunk`` / ``weight_layout`` (specs written before ``runtime:``) move under ``runtime``."""
        return lift_legacy_options(data)

    def placeholder(self, modality: str) -> str:
        """The text marker where items of `modality` go (default ``<modality>``)."""
        return self.placeholders.get(modality, f"<{modality}>")

    def modalities(self) -> list[str]:
        return list(self.encoders)

    def signal_count(self, modality: str) -> int:
        """Signal tokens per generated item of `modality` (``signal_tokens``, default 4)."""
        from mmhub.signals import DEFAULT_COUNT

        return self.signal_tokens.get(modality, DEFAULT_COUNT)

    def encoder_owner(self, modality: str) -> str:
        """The modality whose encoder slot `modality` uses (itself unless it shares another's instance)."""
        ref = self.encoders[modality]
        return ref if isinstance(ref, str) else modality


def _loc(loc: tuple[Any, ...]) -> str:
    parts = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        else:
            parts.append(("." if parts else "") + str(p))
    return "".join(parts)


def problems_from_validation(exc: ValidationError, prefix: str = "", fields: Any = None) -> list[Problem]:
    """Turn pydantic errors into `Problem`s with dotted spec paths and a fix."""
    problems = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"]
                    if not (isinstance(p, str) and ("[" in p or p in ("literal['frozen','full']", "LoraRegime"))))
        path = ".".join(filter(None, [prefix, _loc(loc)]))
        kind = err["type"]
        if kind == "extra_forbidden":
            name = str(loc[-1]) if loc else "?"
            known = list(fields) if fields is not None else []
            hint = close_matches(name, known, n=1)
            known_text = f"known settings: {', '.join(sorted(known))}" if known else "remove it"
            fix = f"did you mean {hint[0]!r}?" if hint else known_text
            problems.append(Problem(path, f"unknown setting {name!r}", fix))
        elif kind == "missing":
            problems.append(Problem(path, "is required but missing", "add it"))
        else:
            given = err.get("input")
            shown = "" if isinstance(given, (dict, list)) else f" (got {given!r})"
            problems.append(Problem(path, f"{err['msg'].removeprefix('Value error, ')}{shown}", "correct the value"))
    return problems


def _yaml_problem(exc: yaml.YAMLError) -> Problem:
    """A YAML syntax error as a Problem naming where it was noticed and, when earlier, where the construct began.

    An unclosed bracket or quote is noticed lines later; PyYAML's ``context_mark`` is where it was opened,
    which is usually the real mistake, so both lines are reported.
    """
    mark, context = getattr(exc, "problem_mark", None), getattr(exc, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    what = getattr(exc, "problem", None) or str(exc)
    if context is not None and (mark is None or context.line != mark.line):
        opened = f"line {context.line + 1}, column {context.column + 1}"
        return Problem("", f"not valid YAML/JSON{where}: {what}, {exc.context} that started at {opened}",
                       f"check line {context.line + 1} first (a bracket or quote opened there and never closed?), "
                       f"then line {mark.line + 1 if mark else '?'}")
    return Problem("", f"not valid YAML/JSON{where}: {what}", "fix the syntax at that position")


def parse_text(text: str, source: str) -> dict[str, Any]:
    """Parse YAML or JSON text; a syntax error becomes a SpecError naming line and column."""
    try:
        data = load_yaml(text, source)
    except yaml.YAMLError as exc:
        raise SpecError([_yaml_problem(exc)], source) from None
    if not isinstance(data, dict):
        raise SpecError([Problem("", f"a spec must be a mapping at the top level, got {type(data).__name__}",
                                 "start the file with keys such as name:, encoders:, backbone:")], source)
    return data


def spec_from_dict(data: dict[str, Any], source: str | None = None) -> Spec:
    """Validate a plain dict into a `Spec` (all structural problems at once)."""
    try:
        return Spec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(problems_from_validation(exc, fields=Spec.model_fields), source) from None


def load_spec(source: str | Path | dict[str, Any] | Spec, registry: Any = None) -> Spec:
    """A spec from a file path (YAML/JSON), a preset name (``llava-1.5:tiny``), a dict or a Spec."""
    if isinstance(source, Spec):
        return source
    if isinstance(source, dict):
        check_tree(source, "spec")
        return spec_from_dict(source)
    path = Path(str(source)).expanduser()
    if path.is_file():
        return spec_from_dict(parse_text(read_text(path), str(path)), str(path))
    if path.is_dir() and (path / "mmhub_spec.json").is_file():
        return spec_from_dict(parse_text(read_text(path / "mmhub_spec.json"), str(path)), str(path))
    if registry is None:
        from mmhub.registry import get_registry

        registry = get_registry()
    recipe = Path(__file__).parent / "recipes" / f"{source}.yaml"
    if ":" not in str(source) and "/" not in str(source) and recipe.is_file():  # a shipped training recipe
        return spec_from_dict(parse_text(read_text(recipe), str(recipe)), f"recipe {source}")
    key = str(source) if ":" in str(source) else f"{source}:tiny"
    if key in registry.presets:
        return spec_from_dict(registry.presets[key].spec, f"preset {key}")
    candidates = list(registry.presets) + [k.split(":")[0] for k in registry.presets]
    hint = close_matches(str(source), candidates, n=3)
    raise SpecError([Problem("", f"{str(source)!r} is neither a spec file, a saved model folder nor a preset",
                             (f"did you mean {', '.join(hint)}? " if hint else "") + "see `mmhub presets`")],
                    str(source))


def dump_spec(data: dict[str, Any]) -> str:
    """YAML text of a spec dict, keys in the order written."""
    return yaml.safe_dump(data, sort_keys=False)
