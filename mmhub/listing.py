"""What ``mmhub plugins`` shows: the registry as JSON-able data, cached on disk so listing needs no imports.

`listing` turns a `Registry` into plain data, one key per entry kind of `mmhub.registry.KIND_TABLE`.
`cached_listing` answers from ``$MMHUB_HOME/plugins-listing.json`` when its fingerprint still
matches: the installed ``mmhub`` entry points (distribution, version, value), the size and mtime of
every file in each plugin's package, the ``sys.path`` folders (a pip install changes them) and
``MMHUB_PLUGINS``. On a miss it builds the real registry (importing every component) and rewrites
the file atomically. `describe` is ``mmhub plugins show NAME``: an entry's settings, types, defaults and docs.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import importlib.util
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mmhub.errors import PluginError, UnknownComponentError
from mmhub.plugins import ALLOW_ENV, GROUP
from mmhub.weights import mmhub_home

CACHE_NAME = "plugins-listing.json"
FORMAT = 1  # bump when the listing's shape changes


def listing(reg: Any) -> dict[str, Any]:
    """Every registered entry (by kind plural), the kinds themselves, and what loaded, failed or was left out."""
    from mmhub.registry import (
        KIND_TABLE,  # building the registry imports torch; callers with a cache hit never need it
    )

    out: dict[str, Any] = {}
    failed = [vars(f) for f in reg.failed]
    for kind in KIND_TABLE:
        table = reg.entries[kind.key]
        keys = sorted(table) if kind.sort else list(table)
        out[kind.plural] = []
        for k in keys:
            try:
                out[kind.plural].append(table[k].metadata())
            except PluginError as exc:  # a class registered by reference that does not load: listed as failed
                plugin = table[k].plugin
                failed.append({"name": plugin, "dist": reg.dist_of(plugin), "error": str(exc)})
    ps = reg.plugins
    out["plugins"] = [vars(p) for p in ps.loaded] if ps else []
    out["failed"] = failed
    out["disabled"] = list(ps.disabled) if ps else []
    out["warnings"] = list(ps.warnings) if ps else []
    out["kinds"] = [{"key": k.key, "plural": k.plural, "hook": k.hook, "component": k.component} for k in KIND_TABLE]
    return out


def _source_roots(value: str) -> list[str]:
    """The folders (or file) holding an entry point's module and its top-level package, found without importing it."""
    module = value.split(":")[0].strip()
    roots = []
    for name in {module.split(".")[0], module.rpartition(".")[0] or module}:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):  # a broken plugin: its failure is what the listing records
            continue
        if spec is not None:
            roots += list(spec.submodule_search_locations or []) or ([spec.origin] if spec.origin else [])
    return sorted(set(roots))


def _files(root: str) -> Iterator[os.DirEntry[str]]:
    try:
        entries = list(os.scandir(root))
    except (NotADirectoryError, FileNotFoundError):
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            if entry.name != "__pycache__" and not entry.name.startswith("."):
                yield from _files(entry.path)
        else:
            yield entry


def fingerprint() -> str:
    """A digest that changes when the installed plugins, their source files, sys.path or MMHUB_PLUGINS change."""
    h = hashlib.sha256(f"{FORMAT}|{sys.version}|{os.environ.get(ALLOW_ENV)!r}".encode())
    for p in sys.path[1:]:  # [0] is the running script's folder, which differs between `mmhub` and `python -m`
        try:
            h.update(f"|{p}:{os.stat(p or '.').st_mtime_ns}".encode())
        except OSError:
            h.update(f"|{p}:-".encode())
    roots: set[str] = set()
    for ep in sorted(md.entry_points(group=GROUP), key=lambda e: (e.name, e.value)):
        dist = f"{ep.dist.name}=={ep.dist.version}" if ep.dist else "?"
        h.update(f"|{dist}:{ep.name}={ep.value}".encode())
        roots.update(_source_roots(ep.value))
    for root in sorted(roots):
        if os.path.isfile(root):
            st = os.stat(root)
            h.update(f"|{root}:{st.st_size}:{st.st_mtime_ns}".encode())
        for f in sorted(_files(root), key=lambda e: e.path):
            st = f.stat(follow_symlinks=False)
            h.update(f"|{f.path}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def cached_listing(build: Callable[[], dict[str, Any]] | None = None, path: Path | None = None) -> dict[str, Any]:
    """The listing from the on-disk cache when it is current, else from `build` (default: the real registry)."""
    path = path or mmhub_home() / CACHE_NAME
    key = fingerprint()
    try:
        cached = json.loads(path.read_text())
        if cached.get("fingerprint") == key:
            return cached["listing"]
    except (OSError, ValueError, AttributeError):
        pass
    if build is None:
        from mmhub.registry import (
            get_registry,  # imports every component: only on a cache miss
        )

        data = listing(get_registry())
    else:
        data = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w") as f:
            json.dump({"fingerprint": key, "listing": data}, f, default=str)
        os.replace(tmp, path)  # atomic: a reader sees the old file or the new one, never half of one
    except OSError:  # a read-only home still lists, only without the cache
        pass
    return data


def _type_name(annotation: Any) -> str:
    return annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")


def settings_of(cls: type) -> list[dict[str, Any]]:
    """A class's pydantic ``Config`` fields: name, type, default (``(required)`` when none) and description."""
    rows = []
    for name, f in cls.Config.model_fields.items():
        if f.is_required():
            default: Any = "(required)"
        else:
            default = f.default_factory() if f.default_factory is not None else f.default
        rows.append({"name": name, "type": _type_name(f.annotation), "default": default, "doc": f.description or ""})
    return rows


def describe(reg: Any, name: str) -> list[dict[str, Any]]:
    """Every entry called `name` (a component, dataset, eval task, weight source or preset; ``-`` = ``_``)."""
    from mmhub.registry import (
        KIND_TABLE,  # building the registry imports torch; only `mmhub plugins show` needs it
    )

    found = []
    for kind in KIND_TABLE:
        for key, entry in reg.entries[kind.key].items():
            if name not in (key, key.replace("_", "-"), getattr(entry, "name", None)):
                continue
            row = {**entry.metadata(), "kind": kind.key, "distribution": reg.dist_of(entry.plugin)}
            cls = getattr(entry, "cls", None)
            if cls is not None and hasattr(cls, "Config"):
                row["doc"] = " ".join((cls.__doc__ or "").split())
                row["settings"] = settings_of(cls)
            if kind.key == "preset":
                row.update(io=entry.io, description=entry.description, status=entry.status)
            found.append(row)
    if not found:
        everything = [k for kind in KIND_TABLE for k in reg.entries[kind.key]]
        raise UnknownComponentError("plugin entry", name, everything, failed=reg.failed)
    return found
