"""The base every component kind shares: its settings model, build context and common metadata.

`mmhub.interfaces` builds one abstract interface per kind on top of `Component`; plugins import
them from there (which re-exports these names).
"""

from __future__ import annotations

import dataclasses
from abc import ABC
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

Kind = Literal["encoder", "projector", "backbone", "injector", "output_projector", "generator"]
KINDS: tuple[Kind, ...] = ("encoder", "projector", "backbone", "injector", "output_projector", "generator")


class _NeedsWeights(Exception):
    """Raised by `Component.memory_estimate`'s probe context where a constructor asks for a weight file."""


class ComponentConfig(BaseModel):
    """Base of every component's settings: typed, defaults filled, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


@dataclass
class BuildContext:
    """What a component may use while it is described or built.

    ``resolve`` turns a weight-source URI into a local path (raising
    `WeightsNotFoundError` with a fix when it is missing); ``attention`` is the
    spec's attention backend choice (pass it to `mmhub.attention`); ``weight_files``
    collects every file a component read, so the resolved spec can record their
    hashes; ``component`` resolves nested component settings through the registry.
    """

    resolve: Any  # Callable[[str], Path]; typed loosely to avoid an import cycle
    attention: str = "auto"
    weight_files: dict[str, Path] = field(default_factory=dict)
    registry: Any = None  # the Registry, for components that build nested components (video over an image encoder)
    trust_remote_code: bool = False  # set only by the caller (mmhub.build/load argument, CLI flag), never by a spec

    def component(self, kind: str, spec: dict[str, Any]) -> tuple[type["Component"], "ComponentConfig"]:
        """Resolve a nested ``{type: NAME, ...settings}`` of `kind` to (class, validated settings)."""
        settings = dict(spec)
        if "type" not in settings:
            raise ValueError(f"a nested {kind} needs a `type:` (a registered {kind} name)")
        if self.registry is None:
            raise ValueError(f"a nested {kind} needs the registry; build the BuildContext with registry=...")
        info = self.registry.get(kind, settings.pop("type"))
        return info.cls, info.cls.Config.model_validate(settings)

    def weights(self, uri: str) -> Path:
        """Resolve `uri` to a local path and remember it for the resolved spec's hashes."""
        path = self.resolve(uri)
        self.weight_files[uri] = path
        return path


class Component(nn.Module, ABC):
    """Behaviour shared by all component kinds."""

    kind: ClassVar[Kind]
    name: ClassVar[str]
    Config: ClassVar[type[ComponentConfig]] = ComponentConfig
    modalities_in: ClassVar[tuple[str, ...]] = ()
    modalities_out: ClassVar[tuple[str, ...]] = ()
    out_dim_doc: ClassVar[str] = ""
    tokens_doc: ClassVar[str] = ""
    library: ClassVar[str] = "torch (mmhub)"  # the library it is built on, shown in the components table
    # settings for a tiny instance (seconds on a CPU, random weights): used by the shared
    # component tests (`mmhub.testing`) and shown as an example in the docs
    example_settings: ClassVar[dict[str, Any]] = {}

    def __init__(self, config: ComponentConfig, ctx: BuildContext):
        super().__init__()
        self.config = config

    @classmethod
    def summary(cls) -> str:
        """First line of the class docstring: the one-line description shown in listings."""
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    @classmethod
    def memory_estimate(cls, config: ComponentConfig, ctx: BuildContext) -> int | None:
        """Bytes the built component's parameters and buffers will take, known before building; None: unknown.

        By default the component is built on PyTorch's ``meta`` device (nothing allocated, the global RNG untouched)
        and its tensors' bytes counted. A constructor that reads a weight file is not run through (None: the file
        is not read twice); one that cannot build on ``meta`` gives None. `mmhub.memory_check` sums the estimates
        while validating and refuses a spec that cannot fit in the memory available. Override it where the
        component knows better (e.g. quantized weights)."""
        def refuse(uri: str) -> Path:
            raise _NeedsWeights(uri)

        probe = dataclasses.replace(ctx, resolve=refuse, weight_files={})
        try:
            with torch.random.fork_rng(devices=[]), torch.device("meta"):
                module = cls(config, probe)
        except Exception:  # noqa: BLE001 - an estimate only; building reports the real error
            return None
        tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def has_weight_source(self) -> bool:
        """True when this component's weights come from a weight source (so they need not be saved)."""
        return False
