"""Which models the demo can serve, and a shared, thread-safe pool of the loaded ones.

A model is named by a key: ``default`` (the hub's trained demo model, see
`mmhub.demo_model`), ``preset:NAME:tiny`` (a shipped preset built from its configs:
random weights, useful to see the assembly work, not to get answers), or
``folder:PATH`` (a model folder written by `MMModel.save_pretrained`, e.g. a training
run's ``STAGE/model``). Each browser session picks its own key; the pool keeps the
last few loaded models so switching back is instant, and every session
chats with it through its continuous-batching engine (`mmhub.serve.engine`): one queue per model.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mmhub.errors import InputError, MMHubError

DEFAULT = "default"


@dataclass
class LoadedModel:
    """A model ready to chat, with what the UI says about it."""

    key: str
    label: str
    note: str  # shown above the chat: what this model is and any caveat (fallback default, untrained)
    model: Any
    lock: threading.Lock = field(default_factory=threading.Lock)
    _engine: Any = None  # mmhub.serve.engine.Engine, started on first use (or given: `mmhub serve --ui`)

    def engine(self) -> Any:
        """The model's continuous-batching engine: every chat on this model goes through its one queue."""
        with self.lock:
            if self._engine is None:
                from mmhub.serve.engine import Engine

                self._engine = Engine(self.model).start()
            return self._engine

    @property
    def modalities(self) -> list[str]:
        return list(self.model.modalities)

    @property
    def context_length(self) -> int:
        return int(self.model.plan.backbone_facts.context_length)


def model_choices(folders: list[str] | None = None, registry: Any = None) -> list[tuple[str, str]]:
    """(label, key) for the model dropdown: the default, every tiny preset, and the given folders."""
    from mmhub.demo_model import find_default
    from mmhub.registry import get_registry

    reg = registry or get_registry()
    try:
        found = find_default()
        default_label = f"default: {found.name}" + (" (fallback)" if found.fallback else "")
    except MMHubError:
        default_label = "default: (none shipped)"
    out = [(default_label, DEFAULT)]
    out += [(f"folder: {f}", f"folder:{Path(f).resolve()}") for f in folders or []]
    out += [(f"preset: {p.key} ({p.io}, untrained)", f"preset:{p.key}")
            for p in sorted(reg.presets.values(), key=lambda p: p.key) if p.size == "tiny"]
    return out


def check_model_folder(path: Path) -> Path:
    """`path` if it is a model folder written by `save_pretrained`, else an InputError naming the fix."""
    if not (path / "mmhub_spec.json").is_file():
        raise InputError(f"{path} is not an mmhub model folder (no mmhub_spec.json); give a folder written by "
                         "save_pretrained, such as runs/NAME/STAGE/model")
    return path


def load(key: str, registry: Any = None) -> LoadedModel:
    """Load the model a key names (see the module docstring) through `mmhub.load`; bad keys and folders are
    InputErrors."""
    from mmhub.loading import load as load_model

    if key == DEFAULT:
        model = load_model(DEFAULT)
        info = model.default_info
        note = f"**{info.name}**: {info.description}."
        if info.fallback:
            from mmhub.demo_model import CHOICES

            note += (f" The hub's first-choice default model ({CHOICES[0][0]}: {CHOICES[0][1]}) is not in this "
                     "checkout, so this is the fallback: the best trained model that is.")
        return LoadedModel(key, f"default: {info.name}", note, model)
    if key.startswith("preset:"):
        name = key.removeprefix("preset:")
        model = load_model(name, registry=registry)
        note = (f"**{name}**: built from the preset's configs with random weights: it shows the assembly "
                "(encoders, projectors, backbone, parameter counts) but its answers are noise.")
        return LoadedModel(key, f"preset: {name}", note, model)
    if key.startswith("folder:"):
        path = check_model_folder(Path(key.removeprefix("folder:")).expanduser())
        model = load_model(path, registry=registry)
        return LoadedModel(key, f"folder: {path}", f"**{path.name}**: loaded from `{path}`.", model)
    raise InputError(f"unknown model {key!r}; choose 'default', 'preset:NAME:tiny' or 'folder:PATH'")


class ModelPool:
    """The last `capacity` loaded models, shared by every session; loading is serialised."""

    def __init__(self, capacity: int = 2, loader: Callable[[str], LoadedModel] = load):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._loader = loader
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> LoadedModel:
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            loaded = self._loader(key)
            self._models[key] = loaded
            while len(self._models) > self.capacity:
                self._models.popitem(last=False)
            return loaded

    def loaded_keys(self) -> list[str]:
        with self._lock:
            return list(self._models)
