"""The entries a registry holds, and how a plugin's ``register(...)`` call is checked and turned into one.

`ComponentInfo` (a component class, possibly registered by reference and imported on first use),
`WeightSourceInfo` and `PluginClassInfo` (datasets, eval tasks, importers). The ``_component``,
``_weight_source`` and ``_plugin_class`` builders check what a plugin passed (the class's interface,
its ``name``, the names it registers under) and raise `PluginError` with the plugin and the fix. `mmhub.registry`
stores the entries, one table per kind, and holds presets (`PresetInfo`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmhub.classref import ClassRef
from mmhub.errors import MMHubError, PluginError

if TYPE_CHECKING:  # the component contracts import torch; entries load them only to check a class
    from mmhub.interfaces import Component, Kind


@dataclass(frozen=True)
class ComponentInfo:
    """A registered component: its class (or a `ClassRef` to it, imported on first use) and its metadata."""

    name: str
    kind: Kind
    source: type[Component] | ClassRef
    plugin: str

    @property
    def cls(self) -> type[Component]:
        """The component class; a class registered by reference is imported (and checked) here, once."""
        src = self.source
        if isinstance(src, ClassRef):
            return src.load(check=lambda cls: _check_component(self.kind, self.plugin, cls, self.name, src.ref))
        return src

    @property
    def key(self) -> str:
        return self.name

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

    @property
    def key(self) -> str:
        return self.scheme

    def metadata(self) -> dict[str, Any]:
        return {"name": self.scheme, "plugin": self.plugin, "doc": self.doc}


@dataclass(frozen=True)
class PluginClassInfo:
    """A registered dataset format, evaluation task or importer: its class (or a `ClassRef` to it) and plugin."""

    name: str
    source: type | ClassRef
    plugin: str
    base: str = ""  # ``module:Class`` the class must subclass (checked when a reference is loaded)
    what: str = ""  # "dataset", "eval task", "importer": for messages

    @property
    def cls(self) -> type:
        """The class; one registered by reference is imported (and checked) here, once."""
        src = self.source
        if isinstance(src, ClassRef):
            return src.load(check=lambda cls: _check_subclass(self.what, self.base, self.plugin, cls, self.name,
                                                              src.ref))
        return src

    @property
    def key(self) -> str:
        return self.name

    def metadata(self) -> dict[str, Any]:
        cls = self.cls
        doc = (cls.__doc__ or "").strip().splitlines()
        return {"name": self.name, "plugin": self.plugin, "doc": doc[0] if doc else "",
                "modalities": list(getattr(cls, "modalities", ())), "streaming": bool(getattr(cls, "streaming", False)),
                "settings": sorted(cls.Config.model_fields) if hasattr(cls, "Config") else [],
                "model_types": list(getattr(cls, "model_types", ())),
                "class": f"{cls.__module__}.{cls.__qualname__}"}


def _class_name(cls: Any, plugin: str) -> str:
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise MMHubError(f"plugin {plugin!r}: {cls.__name__} has no `name` class attribute; set name = '...'.")
    return name


def _lazy_name(what: str, plugin: str, ref: ClassRef, name: Any) -> str:
    """The name a class registered by reference is listed under: it must be given, as ``name=``."""
    if not isinstance(name, str) or not name:
        raise MMHubError(f"plugin {plugin!r} registered the {what} {ref.ref!r} by reference without a name; pass "
                         f"the class's `name` too: register({ref.ref!r}, name='...').")
    return name


def _same_name(plugin: str, cls: type, registered: str | None, ref: str | None) -> str:
    """The class's own ``name``, which must equal the name it was registered under (when one was given)."""
    name = _class_name(cls, plugin)
    if registered is not None and name != registered:
        what = f"{ref!r}" if ref else cls.__name__
        raise (PluginError if ref else MMHubError)(
            f"plugin {plugin!r} registered {what} under the name {registered!r}, but the class's `name` is "
            f"{name!r}; make them agree (register(..., name={name!r}) or rename the class's `name`).")
    return name


def _check_component(kind: str, plugin: str, cls: Any, name: str | None = None, ref: str | None = None) -> str:
    """Checks that `cls` is a mmhub component of `kind` whose ``name`` is `name` (when given); returns its name.

    A class registered directly fails with `MMHubError` while its plugin registers; one registered by
    reference (`ref`) is checked when first loaded and fails with `PluginError`.
    """
    from mmhub.interfaces import Component  # imports torch: only when a class is checked

    error = PluginError if ref else MMHubError
    what = repr(ref) if ref else repr(cls)
    if not isinstance(cls, type) or not issubclass(cls, Component):
        raise error(f"plugin {plugin!r} registered {what} as a {kind}, but it is not a mmhub component "
                    f"class (subclass one of mmhub.interfaces.Encoder/Projector/Backbone/...).")
    if cls.kind != kind:
        raise error(f"plugin {plugin!r} registered {what if ref else cls.__name__} through the {kind} hook, but it "
                    f"is a {cls.kind}; register it from register_{cls.kind}s.")
    return _same_name(plugin, cls, name, ref)


def _component(kind: Kind) -> Callable[..., ComponentInfo]:
    """The entry builder of a component kind: a component class of that kind with a name, or a reference to one
    (``"module:Class"`` with ``name=``), checked when first used."""
    def make(plugin: str, cls: type[Component] | str, name: str | None = None) -> ComponentInfo:
        if isinstance(cls, str):
            ref = ClassRef(cls, plugin)
            return ComponentInfo(name=_lazy_name(kind, plugin, ref, name), kind=kind, source=ref, plugin=plugin)
        return ComponentInfo(name=_check_component(kind, plugin, cls, name), kind=kind, source=cls, plugin=plugin)
    return make


def _weight_source(plugin: str, scheme: str, resolver: Callable[[str], Path]) -> WeightSourceInfo:
    doc = (resolver.__doc__ or "").strip().splitlines()
    return WeightSourceInfo(scheme, resolver, plugin, doc[0] if doc else "")


def _check_subclass(what: str, base: str, plugin: str, cls: Any, name: str | None = None,
                    ref: str | None = None) -> str:
    """Checks that `cls` subclasses `base` (``module:Class``) and is called `name` (when given); returns its name."""
    module, attr = base.split(":")
    base_cls = getattr(importlib.import_module(module), attr)  # the data/evaluation layers load only when used
    if not isinstance(cls, type) or not issubclass(cls, base_cls):
        public = module.rsplit(".", 1)[0]
        raise (PluginError if ref else MMHubError)(
            f"plugin {plugin!r} registered {ref or cls!r} as a {what}, but it is not a subclass of {public}.{attr}.")
    return _same_name(plugin, cls, name, ref)


def _plugin_class(what: str, base: str) -> Callable[..., PluginClassInfo]:
    """The entry builder of a class registered by name (`base`: ``module:Class`` it must subclass), or by reference
    (``"module:Class"`` with ``name=``, checked when first used)."""
    def make(plugin: str, cls: type | str, name: str | None = None) -> PluginClassInfo:
        if isinstance(cls, str):
            ref = ClassRef(cls, plugin)
            return PluginClassInfo(name=_lazy_name(what, plugin, ref, name), source=ref, plugin=plugin, base=base,
                                   what=what)
        return PluginClassInfo(name=_check_subclass(what, base, plugin, cls, name), source=cls, plugin=plugin,
                               base=base, what=what)
    return make
