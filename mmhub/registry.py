"""The registry: name -> component class (+ metadata and the plugin it came from).

Every kind of entry a plugin can add is one `EntryKind` row of `KIND_TABLE` (its
key, hook, plural and how an entry is built and keyed); registration, the hook
loop and the listings are derived from that table. The registry is filled by
calling every plugin's hooks with a ``register`` callback bound to that plugin,
so each entry knows its origin. A plugin may register a class by reference
(``register("package.module:Class", name="...")``): the entry is known by name and kind at once and
its module is imported only when the class is first used (`ComponentInfo.cls`), so discovering the
plugins imports no model code; the built-ins register this way. Lookups never return ``None``: an
unknown name raises `UnknownComponentError` listing close matches, everything registered and
the plugins that failed to load. A name registered twice never takes the hub
down: built-ins win over third parties (even against ``override=True``), between
third parties the first wins unless the later one asks for ``override=True``,
and the refused entry is listed under ``failed`` with both distributions and the fix.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmhub.errors import DuplicateComponentError, UnknownComponentError
from mmhub.plugins import FailedPlugin, PluginSet, discover
from mmhub.registry_entries import (
    ComponentInfo,
    PluginClassInfo,
    WeightSourceInfo,
    _component,
    _plugin_class,
    _weight_source,
)

if TYPE_CHECKING:  # the component contracts import torch; the registry loads them only to check a class
    from mmhub.interfaces import Component, Kind


@dataclass(frozen=True)
class PresetInfo:
    """A shipped spec, addressed as ``name:size``."""

    name: str
    size: str
    spec: dict[str, Any]
    plugin: str
    io: str = ""
    description: str = ""
    missing: str = ""  # what the published system has that the spec lacks ("slot: reason; ..."), declared

    @property
    def status(self) -> str:
        """Derived (`mmhub.presets.status`): ``complete`` only when every slot loads published weights, else
        ``partial: <slot>: <what is missing>; ...`` (plus the declared `missing`)."""
        from mmhub.presets.status import derive_status

        return derive_status(self, get_registry())

    @property
    def key(self) -> str:
        return f"{self.name}:{self.size}"

    def metadata(self) -> dict[str, Any]:
        return {"name": self.key, "plugin": self.plugin}


def _preset(plugin: str, name: str, size: str, spec: dict[str, Any], io: str = "", description: str = "",
            missing: str = "") -> PresetInfo:
    return PresetInfo(name=name, size=size, spec=spec, plugin=plugin, io=io, description=description, missing=missing)


@dataclass(frozen=True)
class EntryKind:
    """One kind of registry entry: its key, the hook that registers it, its plural and its entry builder.

    ``make(plugin, *register_args, **register_kwargs)`` validates what a plugin passed to
    ``register`` and returns the entry; the entry's ``key`` property is the name it is stored under,
    its ``metadata()`` what listings show. Listings sort entries by key unless `sort` is False
    (then they keep registration order).
    """

    key: str
    hook: str
    plural: str
    make: Callable[..., Any]
    component: bool = False
    sort: bool = True

    @property
    def label(self) -> str:
        return self.key.replace("_", " ")


KIND_TABLE: tuple[EntryKind, ...] = (
    EntryKind("encoder", "register_encoders", "encoders", _component("encoder"), component=True),
    EntryKind("projector", "register_projectors", "projectors", _component("projector"), component=True),
    EntryKind("backbone", "register_backbones", "backbones", _component("backbone"), component=True),
    EntryKind("injector", "register_injectors", "injectors", _component("injector"), component=True),
    EntryKind("output_projector", "register_output_projectors", "output_projectors", _component("output_projector"),
              component=True),
    EntryKind("generator", "register_generators", "generators", _component("generator"), component=True),
    EntryKind("weight_source", "register_weight_sources", "weight_sources", _weight_source, sort=False),
    EntryKind("preset", "register_presets", "presets", _preset, sort=False),
    EntryKind("dataset", "register_datasets", "datasets", _plugin_class("dataset", "mmhub.data.base:Dataset")),
    EntryKind("eval_task", "register_eval_tasks", "eval_tasks",
              _plugin_class("eval task", "mmhub.evaluation.base:EvalTask")),
    EntryKind("importer", "register_importers", "importers",
              _plugin_class("importer", "mmhub.importers.base:Importer")),
    EntryKind("merge_method", "register_merge_methods", "merge_methods",
              _plugin_class("merge method", "mmhub.merge.methods:MergeMethod")),
)
ENTRY_KINDS: dict[str, EntryKind] = {k.key: k for k in KIND_TABLE}
KINDS: tuple[str, ...] = tuple(k.key for k in KIND_TABLE if k.component)  # the component kinds
HOOK_OF_KIND: dict[str, str] = {k.key: k.hook for k in KIND_TABLE if k.component}
PLURAL: dict[str, str] = {k.key: k.plural for k in KIND_TABLE if k.component}
_KIND_OF_PLURAL: dict[str, str] = {k.plural: k.key for k in KIND_TABLE}


@dataclass
class Registry:
    """Everything plugins registered (one table per `EntryKind`), plus the plugins that failed to load."""

    entries: dict[str, dict[str, Any]] = field(default_factory=lambda: {k.key: {} for k in KIND_TABLE})
    plugins: PluginSet | None = None

    @property
    def components(self) -> dict[str, dict[str, ComponentInfo]]:
        return {k: self.entries[k] for k in KINDS}

    @property
    def weight_sources(self) -> dict[str, WeightSourceInfo]:
        return self.entries["weight_source"]

    @property
    def presets(self) -> dict[str, PresetInfo]:
        return self.entries["preset"]

    @property
    def datasets(self) -> dict[str, PluginClassInfo]:
        return self.entries["dataset"]

    @property
    def eval_tasks(self) -> dict[str, PluginClassInfo]:
        return self.entries["eval_task"]

    @property
    def merge_methods(self) -> dict[str, PluginClassInfo]:
        return self.entries["merge_method"]

    # -- registration -------------------------------------------------------------
    def add_entry(self, kind: str, plugin: str, *args: Any, override: bool = False, **kwargs: Any) -> Any:
        """Register what `plugin` passed to the `kind` hook's ``register``; a refused duplicate raises.

        A built-in entry is never replaced by a third party's (not even with `override`); otherwise a
        second registration of a key raises `DuplicateComponentError` unless `override` is set.
        """
        spec = ENTRY_KINDS[kind]
        info = spec.make(plugin, *args, **kwargs)
        table = self.entries[kind]
        old = table.get(info.key)
        if old is not None:
            refused_builtin = self.is_builtin(old.plugin) and not self.is_builtin(plugin)
            if refused_builtin or not override:
                message = self._clash(spec, info.key, old.plugin, plugin, override, refused_builtin)
                raise DuplicateComponentError(message)
        table[info.key] = info
        return info

    def _clash(self, spec: EntryKind, key: str, first: str, second: str, override: bool, builtin: bool) -> str:
        d1, d2 = self.dist_of(first), self.dist_of(second)
        rename = f"{d2.replace('-', '_').replace('(in process)', 'my')}_{key}"
        if builtin:
            return (f"{spec.label} {key!r} from plugin {second!r} (distribution {d2}) was not registered: mmhub's "
                    f"built-in plugin {first!r} (distribution {d1}) registers {key!r}, and built-ins are never "
                    f"replaced{', not even with override=True' if override else ''}. Fix: rename it in {d2} "
                    f"(e.g. {rename!r}) and use that name in specs.")
        return (f"{spec.label} {key!r} is registered twice: by plugin {first!r} (distribution {d1}) and by "
                f"{second!r} (distribution {d2}); the first is kept. Fix: rename one of them (e.g. {rename!r}), "
                f"uninstall one (pip uninstall {d2}), or pass override=True from {second!r} to replace it on purpose.")

    def add(self, kind: Kind, cls: type[Component], plugin: str, override: bool = False) -> None:
        """Register component `cls` under its ``name`` for `kind`; duplicates raise unless `override`."""
        self.add_entry(kind, plugin, cls, override=override)

    def add_weight_source(self, scheme: str, resolver: Callable[[str], Path], plugin: str,
                          override: bool = False) -> None:
        """Register a weight-source URI scheme (without the trailing colon)."""
        self.add_entry("weight_source", plugin, scheme, resolver, override=override)

    def add_preset(self, name: str, size: str, spec: dict[str, Any], plugin: str, io: str = "",
                   description: str = "", override: bool = False, missing: str = "") -> None:
        """Register a shipped spec as ``name:size`` (`missing`: what it lacks, making its status partial)."""
        self.add_entry("preset", plugin, name, size, spec, io=io, description=description, missing=missing,
                       override=override)

    def add_named(self, table: str, cls: type, plugin: str, override: bool = False) -> None:
        """Register a dataset format (`table` "datasets") or an evaluation task ("eval_tasks") under its ``name``."""
        self.add_entry(_KIND_OF_PLURAL[table], plugin, cls, override=override)

    # -- plugins ------------------------------------------------------------------
    def dist_of(self, plugin: str) -> str:
        """The pip distribution that ships `plugin` (``(in process)`` for plugins passed in by tests)."""
        ps = self.plugins
        found = next((p.dist for p in ps.loaded + ps.failed if p.name == plugin), None) if ps else None
        return found or ("mmhub" if plugin.startswith("mmhub.") else "?")

    def is_builtin(self, plugin: str) -> bool:
        ps = self.plugins
        loaded = next((p for p in ps.loaded if p.name == plugin), None) if ps else None
        return loaded.builtin if loaded is not None else plugin.startswith("mmhub.")

    @property
    def failed(self) -> list[FailedPlugin]:
        return list(self.plugins.failed) if self.plugins else []

    # -- lookup -------------------------------------------------------------------
    def get(self, kind: Kind, name: str) -> ComponentInfo:
        """The component registered as `name` for `kind`; raises with close matches when unknown."""
        table = self.components[kind]
        if name not in table:
            raise UnknownComponentError(kind.replace("_", " "), name, list(table), failed=self.failed)
        return table[name]

    def names(self, kind: Kind) -> list[str]:
        return sorted(self.components[kind])

    def preset(self, key: str) -> PresetInfo:
        """A preset by ``name:size`` (``name`` alone means ``name:tiny``)."""
        if ":" not in key:
            key = f"{key}:tiny"
        if key not in self.presets:
            raise UnknownComponentError("preset", key, list(self.presets), failed=self.failed)
        return self.presets[key]

    def dataset(self, name: str) -> PluginClassInfo:
        """The dataset format registered as `name` (``-`` and ``_`` are interchangeable); close matches when unknown."""
        return self._named("dataset", name)

    def eval_task(self, name: str) -> PluginClassInfo:
        """The evaluation task registered as `name` (``easy-vqa`` finds ``easy_vqa``); close matches when unknown."""
        return self._named("eval_task", name)

    def merge_method(self, name: str) -> PluginClassInfo:
        """The merge method registered as `name` (``dare-ties`` finds ``dare_ties``); close matches when unknown."""
        return self._named("merge_method", name)

    def _named(self, kind: str, name: str) -> PluginClassInfo:
        table = self.entries[kind]
        for key in (name, name.replace("-", "_")):
            if key in table:
                return table[key]
        raise UnknownComponentError(ENTRY_KINDS[kind].label, name, list(table), failed=self.failed)


def _run_hooks(reg: Registry, ps: PluginSet) -> None:
    """Call every plugin's hooks, one implementation at a time, so each entry knows its plugin."""
    bad: dict[str, str] = {}
    for kind in KIND_TABLE:
        for impl in getattr(ps.pm.hook, kind.hook).get_hookimpls():
            _call(reg, ps, kind.key, impl, bad)
    for plugin_name, error in bad.items():
        ps.failed.append(FailedPlugin(name=plugin_name, dist=reg.dist_of(plugin_name), error=error))
        ps.loaded = [p for p in ps.loaded if p.name != plugin_name]


def _call(reg: Registry, ps: PluginSet, kind: str, impl: Any, bad: dict[str, str]) -> None:
    """Run one hook implementation; a refused duplicate is listed under ``failed`` and the rest carries on."""
    plugin = impl.plugin_name

    def register(*args: Any, override: bool = False, **kwargs: Any) -> None:
        try:
            reg.add_entry(kind, plugin, *args, override=override, **kwargs)
        except DuplicateComponentError as exc:
            ps.failed.append(FailedPlugin(name=plugin, dist=reg.dist_of(plugin), error=str(exc)))

    try:
        impl.function(register=register)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - one plugin's bug, or sys.exit(), must not end mmhub
        bad.setdefault(plugin, f"{impl.function.__name__} raised {type(exc).__name__}: {exc}")


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
