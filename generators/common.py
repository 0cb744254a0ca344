"""What mmhub's diffusers generators share: settings, weight loading, schedulers, seeding and guidance.

A diffusers generator is built either from ``source`` (a local diffusers folder, as written by
``pipeline.save_pretrained``, given as a path or weight-source URI) or from ``config`` (per-part
keyword overrides of the generator's tiny defaults, random weights). Everything stays local: folders
load with ``local_files_only=True``, only ``.safetensors`` weights (never pickles), no remote code.

`DiffusersGenerator` is the base of `StableDiffusionGenerator`, `TextToVideoGenerator` and
`AudioLDMGenerator`: it reads part configs (JSON only) for `describe`, builds or loads the pipeline,
keeps its models as submodules (so they are in the state dict), and runs the pipeline with the
conditioning as ``prompt_embeds``, a fresh scheduler of the chosen kind, a seeded CPU generator,
progress bars off, and ``encode_text([""])`` as the negative branch when guidance is above 1.
"""

from __future__ import annotations

import importlib
import json
from abc import abstractmethod
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Iterator, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mmhub.errors import InputError, WeightsNotFoundError
from mmhub.interfaces import BuildContext, Generator, GeneratorConfig, GeneratorFacts

SCHEDULERS: tuple[str, ...] = ("DDIM", "DDPM", "EulerDiscrete", "DPMSolverMultistep", "PNDM")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Stable Diffusion's noise schedule, for generators built from config (a source folder brings its own)
DEFAULT_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "skip_prk_steps": True}


def scheduler_name(name: str) -> str:
    """'ddim', 'DDIM' or 'DDIMScheduler' -> 'DDIM'; anything else is an error listing the allowed ones."""
    key = name[:-len("Scheduler")] if name.endswith("Scheduler") else name
    for allowed in SCHEDULERS:
        if key.lower() == allowed.lower():
            return allowed
    raise ValueError(f"unknown scheduler {name!r}; allowed: {', '.join(SCHEDULERS)}")


def make_scheduler(name: str, config: dict[str, Any]) -> Any:
    """A diffusers scheduler of kind `name` (one of `SCHEDULERS`) from a scheduler config dict
    (keys meant for other compatible schedulers are dropped by diffusers)."""
    import diffusers

    return getattr(diffusers, f"{scheduler_name(name)}Scheduler").from_config(dict(config))


def build_model(cls_name: str, kwargs: dict[str, Any], what: str) -> Any:
    """A diffusers model `cls_name` from keyword settings; an unknown or bad setting names the part."""
    import diffusers

    try:
        return getattr(diffusers, cls_name)(**kwargs)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what}: {cls_name} rejects these settings: {exc}") from None


def merged(defaults: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of `defaults` with `overrides` on top (one level: part dicts are flat keyword sets)."""
    return {**defaults, **overrides}


def fill(part: dict[str, Any], key: str, value: Any, what: str, source: str) -> None:
    """Set ``part[key]`` to `value` unless it is set; a different explicit value is an error naming both."""
    if key not in part or part[key] is None:
        part[key] = value
    elif part[key] != value:
        raise InputError(f"{what}.{key} is {part[key]} but {source} is {value}; they must agree "
                         f"(drop {what}.{key} to have it filled in, or make them equal)")


def check_latent_channels(who: str, parts: dict[str, dict[str, Any]]) -> None:
    """Raise unless the VAE's latent channels are what the UNet takes."""
    latent, unet_in = parts["vae"].get("latent_channels", 4), parts["unet"].get("in_channels", 4)
    if latent != unet_in:
        raise InputError(f"{who}: the VAE has {latent} latent_channels but the UNet takes {unet_in} in_channels; "
                         f"they must be equal")


def fill_sample_size(unet: dict[str, Any], parts: "Parts", default: int) -> None:
    """The UNet's sample_size: ``config.unet.sample_size``, else ``config.sample_size``, else `default`."""
    if parts.sample_size is None:
        unet.setdefault("sample_size", default)
    else:
        fill(unet, "sample_size", parts.sample_size, "config.unet", "config.sample_size")


def vae_factor(vae: dict[str, Any]) -> int:
    """How much the VAE shrinks each side: 2 ** (its number of blocks - 1)."""
    return 2 ** (len(vae.get("block_out_channels", (64,))) - 1)


class Parts(BaseModel):
    """``config:`` of a diffusers generator built with random weights: keyword overrides of each part's
    tiny defaults (the generator's ``example_settings``), plus ``sample_size`` (the UNet's latent size)."""

    model_config = ConfigDict(extra="forbid")

    unet: dict[str, Any] = {}
    vae: dict[str, Any] = {}
    text_encoder: dict[str, Any] = {}
    scheduler: dict[str, Any] = {}
    sample_size: int | None = Field(None, ge=1)


class DiffusersGeneratorConfig(GeneratorConfig):
    """Settings every diffusers generator has."""

    source: str | None = Field(None, description="a local diffusers folder (path or weight-source URI)")
    config: Parts | None = Field(None, description="build from config with random weights: per-part overrides")
    scheduler: str | None = Field(None, description=f"one of {', '.join(SCHEDULERS)}; default: the folder's own "
                                                    f"(source) or DDIM (config)")
    steps: int = Field(50, ge=1)
    guidance_scale: float = Field(7.5, ge=0.0)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, v: str | None) -> str | None:
        return None if v is None else scheduler_name(v)

    @model_validator(mode="after")
    def _one_source(self) -> "DiffusersGeneratorConfig":
        if (self.source is None) == (self.config is None):
            raise ValueError("give exactly one of `source` (a local diffusers folder) or `config` (build with random "
                             "weights; `config: {}` is the tiny default)")
        return self


def source_folder(ctx: BuildContext, source: str, who: str) -> Path:
    """Resolve `source` to a diffusers folder (one with ``model_index.json``), or raise naming the fix."""
    try:
        folder = Path(ctx.weights(source))
    except WeightsNotFoundError as exc:
        raise WeightsNotFoundError(f"{who}: source {source!r} not found: {exc} (it should be a local diffusers "
                                   f"folder, as written by pipeline.save_pretrained(folder))") from None
    if not folder.is_dir() or not (folder / "model_index.json").is_file():
        raise WeightsNotFoundError(f"{who}: source {source!r} ({folder}) is not a diffusers folder: it has no "
                                   f"model_index.json. Point it at the folder pipeline.save_pretrained wrote.")
    return folder


def read_json(folder: Path, relative: str, who: str, required: bool = True) -> dict[str, Any]:
    """A part's JSON config inside a diffusers folder (no weights are read)."""
    path = folder / relative
    if not path.is_file():
        if not required:
            return {}
        raise WeightsNotFoundError(f"{who}: {path} is missing; the diffusers folder {folder} lacks the "
                                   f"{relative.split('/')[0]} part this generator needs")
    return json.loads(path.read_text())


def byte_tokenizer(max_length: int) -> Any:
    """mmhub's byte tokenizer (nothing to download) framed as ``<s> text </s>`` and cut to `max_length`."""
    from tokenizers import processors

    from mmhub.backbones.byte_tokenizer import byte_tokenizer as make

    tok = make()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", tok.bos_token_id), ("</s>", tok.eos_token_id)])
    tok.model_max_length = max_length
    return tok


def byte_token_ids(text_encoder: dict[str, Any], what: str) -> None:
    """Fill a text-encoder config dict with the byte tokenizer's vocabulary size and special ids."""
    tok = byte_tokenizer(8)
    vocab = text_encoder.setdefault("vocab_size", len(tok))
    if vocab < len(tok):
        raise InputError(f"{what}.vocab_size {vocab} is below the byte tokenizer's {len(tok)} tokens; "
                         f"drop it or raise it to {len(tok)}")
    for key, value in (("bos_token_id", tok.bos_token_id), ("eos_token_id", tok.eos_token_id),
                       ("pad_token_id", tok.pad_token_id)):
        fill(text_encoder, key, value, what, f"the byte tokenizer's {key}")


def seeded(seed: int | None) -> torch.Generator | None:
    """A CPU generator seeded with `seed` (same seed, same noise on any device), or None (random)."""
    return None if seed is None else torch.Generator("cpu").manual_seed(int(seed))


@contextmanager
def inference(module: torch.nn.Module) -> Iterator[None]:
    """No grad and eval mode (no dropout) for the duration, restoring the module's mode afterwards."""
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was)


class DiffusersGenerator(Generator):
    """Shared plumbing of the diffusers generators (not registered itself)."""

    Config: ClassVar[type] = DiffusersGeneratorConfig
    published_weights: ClassVar[bool] = True  # loads the published diffusers pipeline in `source` (preset status)
    library: ClassVar[str] = "diffusers"
    modalities_in: ClassVar[tuple[str, ...]] = ("conditioning",)
    pipeline_class: ClassVar[str] = ""  # the diffusers pipeline class, by name (diffusers is imported lazily)
    parts: ClassVar[tuple[str, ...]] = ("unet", "vae", "text_encoder")  # pipeline models kept as submodules
    pipeline_kwargs: ClassVar[dict[str, Any]] = {}  # extra pipeline constructor / from_pretrained arguments

    # ---- what subclasses provide -------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def tiny_parts(cls, parts: Parts) -> dict[str, dict[str, Any]]:
        """Part configs for a build from config: the tiny defaults with `parts` on top, derived keys filled."""

    @classmethod
    @abstractmethod
    def facts(cls, parts: dict[str, dict[str, Any]]) -> GeneratorFacts:
        """Conditioning facts from the part configs, raising when the parts disagree."""

    @classmethod
    @abstractmethod
    def text_max_length(cls, parts: dict[str, dict[str, Any]]) -> int:
        """Tokens the text encoder reads per caption (the tokenizer pads/cuts to this)."""

    @abstractmethod
    def build_models(self, parts: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Pipeline components (models and tokenizer, no scheduler) with random weights."""

    @abstractmethod
    def encode_for_pipeline(self, captions: list[str]) -> torch.Tensor:
        """Captions -> conditioning as the pipeline computes it (its own prompt encoding)."""

    @abstractmethod
    def run_pipeline(self, cond: torch.Tensor, negative: torch.Tensor | None, steps: int, guidance_scale: float,
                     generator: torch.Generator | None) -> list[Any]:
        """Call the pipeline on checked conditioning; returns the media items."""

    # ---- shared ------------------------------------------------------------------------------------------
    @classmethod
    def part_configs(cls, config: DiffusersGeneratorConfig, ctx: BuildContext) -> dict[str, dict[str, Any]]:
        """The parts' configs (JSON from the source folder, or tiny defaults + overrides); no weights."""
        if config.source is None:
            return cls.tiny_parts(config.config)
        folder = source_folder(ctx, config.source, cls.name)
        out = {p: read_json(folder, f"{p}/config.json", cls.name) for p in cls.parts}
        out["tokenizer"] = read_json(folder, "tokenizer/tokenizer_config.json", cls.name, required=False)
        out["scheduler"] = read_json(folder, "scheduler/scheduler_config.json", cls.name)
        return out

    @classmethod
    def describe(cls, config: DiffusersGeneratorConfig, ctx: BuildContext) -> GeneratorFacts:
        return cls.facts(cls.part_configs(config, ctx))

    def __init__(self, config: DiffusersGeneratorConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        parts = self.part_configs(config, ctx)
        self.cond_facts = self.facts(parts)
        pipeline_cls = getattr(importlib.import_module("diffusers"), self.pipeline_class)
        dtype = DTYPES[config.dtype]
        if config.source is not None:
            folder = source_folder(ctx, config.source, self.name)
            pipe = pipeline_cls.from_pretrained(str(folder), local_files_only=True, use_safetensors=True, dtype=dtype,
                                                **self.pipeline_kwargs)
            kind = config.scheduler or pipe.scheduler.__class__.__name__
            if config.scheduler is None and kind.removesuffix("Scheduler") not in SCHEDULERS:
                raise InputError(f"{self.name}: the folder's scheduler {kind} is not supported; set `scheduler:` "
                                 f"to one of {', '.join(SCHEDULERS)}")
            schedule = dict(pipe.scheduler.config)
        else:
            kind = config.scheduler or "DDIM"
            schedule = merged(DEFAULT_SCHEDULE, config.config.scheduler)
            pipe = pipeline_cls(**self.build_models(parts), scheduler=make_scheduler(kind, schedule),
                                **self.pipeline_kwargs)
            if dtype != torch.float32:  # models are built in float32
                pipe.to(dtype=dtype)
        self.scheduler_kind = scheduler_name(kind)
        self.schedule = dict(make_scheduler(self.scheduler_kind, schedule).config)
        pipe.tokenizer.model_max_length = self.text_max_length(parts)
        pipe.set_progress_bar_config(disable=True)
        for part in self.parts:  # submodules: in the state dict, moved by .to(), put in eval mode with the rest
            setattr(self, part, getattr(pipe, part))
        self.pipeline = pipe  # not a Module: holds the same model objects plus tokenizer and scheduler

    def has_weight_source(self) -> bool:
        return self.config.source is not None

    def check_cond(self, cond: torch.Tensor) -> torch.Tensor:
        """Raise unless `cond` is (N, cond_len, cond_dim); return it on the models' device and dtype."""
        L, D = self.cond_facts.cond_len, self.cond_facts.cond_dim
        if not isinstance(cond, torch.Tensor) or cond.ndim != 3 or tuple(cond.shape[1:]) != (L, D) or not len(cond):
            got = tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__
            raise InputError(f"{self.name} takes conditioning of shape (N, {L}, {D}) (N items, cond_len {L}, "
                             f"cond_dim {D}); got {got}. Project to {L} x {D} (an output projector with out_len {L}, "
                             f"out_dim {D}) or use encode_text(captions)")
        p = next(self.unet.parameters())
        return cond.to(device=p.device, dtype=p.dtype)

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        with inference(self):
            return self.encode_for_pipeline(list(captions))

    def generate(self, cond: torch.Tensor, seed: int | None = None, steps: int | None = None,
                 guidance_scale: float | None = None) -> list[Any]:
        cond = self.check_cond(cond)
        steps = self.config.steps if steps is None else int(steps)
        g = self.config.guidance_scale if guidance_scale is None else float(guidance_scale)
        if steps < 1:
            raise InputError(f"{self.name}: steps must be at least 1; got {steps}")
        with inference(self):
            negative = self.encode_for_pipeline([""]).to(cond).expand(len(cond), -1, -1) if g > 1 else None
            self.pipeline.scheduler = make_scheduler(self.scheduler_kind, self.schedule)  # fresh state every call
            return self.run_pipeline(cond, negative, steps, g, seeded(seed))
