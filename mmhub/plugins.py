"""Plugin discovery: the pluggy manager, entry points in group ``mmhub``, the allow-list.

A plugin is any module exposing ``@hookimpl`` functions from `mmhub.hookspecs`.
Installed packages announce theirs with an entry point in the ``mmhub`` group;
mmhub's own built-ins are announced the same way. A plugin that fails to import,
or that implements a hook which does not exist (a misspelt name), is recorded in
``failed`` with its error and left out; it never takes the hub down.

``MMHUB_PLUGINS`` (comma-separated entry-point names) restricts which third-party
plugins load; mmhub's built-in plugins always load. Set it to an empty string to
load no third-party plugin at all. A name in it that no installed plugin has is a
warning (in ``warnings``, shown by ``mmhub plugins``), naming the installed ones.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import ModuleType

import pluggy

from mmhub import hookspecs
from mmhub.errors import close_matches

GROUP = "mmhub"
ALLOW_ENV = "MMHUB_PLUGINS"
BUILTIN_DIST = "mmhub"


@dataclass(frozen=True)
class FailedPlugin:
    """A plugin that could not be loaded, and why."""

    name: str
    dist: str
    error: str


@dataclass(frozen=True)
class LoadedPlugin:
    """A plugin that loaded: its entry-point name, distribution and version."""

    name: str
    dist: str
    version: str
    builtin: bool


@dataclass
class PluginSet:
    """The outcome of discovery: a pluggy manager plus what loaded, failed or was not allowed, and warnings."""

    pm: pluggy.PluginManager
    loaded: list[LoadedPlugin]
    failed: list[FailedPlugin]
    disabled: list[str]
    warnings: list[str] = field(default_factory=list)


def hook_names() -> list[str]:
    """Names of every hook a plugin may implement."""
    return sorted(n for n in dir(hookspecs) if n.startswith("register_"))


def _unknown_hooks(pm: pluggy.PluginManager, plugin: object) -> list[str]:
    """Hook implementations in `plugin` whose names match no hookspec (typically typos)."""
    known = set(hook_names())
    problems = []
    for attr in dir(plugin):
        if pm.parse_hookimpl_opts(plugin, attr) is not None and attr not in known:
            hint = close_matches(attr, known, n=1)
            did_you_mean = f"; did you mean {hint[0]!r}?" if hint else ""
            problems.append(f"implements unknown hook {attr!r}{did_you_mean} (known hooks: {', '.join(sorted(known))})")
    return problems


def register_plugin(ps: PluginSet, plugin: object, name: str, dist: str, version: str = "",
                    builtin: bool = False) -> bool:
    """Register one plugin object; on an invalid plugin record it in ``ps.failed`` and return False."""
    problems = _unknown_hooks(ps.pm, plugin)
    if not problems:
        try:
            ps.pm.register(plugin, name=name)
        except (pluggy.PluginValidationError, ValueError) as exc:
            problems = [str(exc)]
    if problems:
        ps.failed.append(FailedPlugin(name=name, dist=dist, error="; ".join(problems)))
        return False
    ps.loaded.append(LoadedPlugin(name=name, dist=dist, version=version, builtin=builtin))
    return True


def _allowed() -> set[str] | None:
    raw = os.environ.get(ALLOW_ENV)
    if raw is None:
        return None
    return {p.strip() for p in raw.split(",") if p.strip()}


def check_allow_list(allowed: set[str] | None, third_party: Iterable[str]) -> str | None:
    """A warning naming the ``MMHUB_PLUGINS`` entries no installed plugin has (with the known ones), or None."""
    known = sorted(set(third_party))
    unknown = sorted((allowed or set()) - set(known))
    if not unknown:
        return None
    hints = [f"{u!r} (did you mean {close_matches(u, known, n=1)[0]!r}?)" if close_matches(u, known, n=1) else repr(u)
             for u in unknown]
    return (f"{ALLOW_ENV} names {len(unknown)} plugin(s) that are not installed: {', '.join(hints)}; installed "
            f"third-party plugins: {', '.join(known) or '(none)'}. Fix the spelling in {ALLOW_ENV} "
            f"(comma-separated entry-point names), or install the plugin.")


def discover(extra: Iterable[tuple[str, object]] = (), entry_points: bool = True) -> PluginSet:
    """Build a plugin manager from the ``mmhub`` entry points (and `extra` (name, plugin) pairs, for tests)."""
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    ps = PluginSet(pm=pm, loaded=[], failed=[], disabled=[])
    allowed = _allowed()
    if entry_points:
        eps = sorted(md.entry_points(group=GROUP),
                     key=lambda e: (e.dist.name != BUILTIN_DIST if e.dist else True, e.name))
        warning = check_allow_list(allowed, [e.name for e in eps if not e.dist or e.dist.name != BUILTIN_DIST])
        if warning:
            ps.warnings.append(warning)
            warnings.warn(warning, stacklevel=2)
        seen: set[str] = set()
        for ep in eps:
            dist = ep.dist.name if ep.dist else "?"
            version = ep.dist.version if ep.dist else ""
            builtin = dist == BUILTIN_DIST
            key = f"{dist}:{ep.name}"
            if key in seen:  # the same distribution visible twice on sys.path
                continue
            seen.add(key)
            name = f"mmhub.{ep.name}" if builtin else ep.name
            if not builtin and allowed is not None and ep.name not in allowed:
                ps.disabled.append(name)
                continue
            try:
                module: ModuleType = ep.load()
            except (Exception, SystemExit) as exc:  # noqa: BLE001 - a broken plugin, or sys.exit(), must not end mmhub
                ps.failed.append(FailedPlugin(name=name, dist=dist, error=f"{type(exc).__name__}: {exc}"))
                continue
            register_plugin(ps, module, name=name, dist=dist, version=version, builtin=builtin)
    for name, plugin in extra:
        register_plugin(ps, plugin, name=name, dist="(in process)")
    return ps
