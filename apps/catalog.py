"""The Plugins tab's tables: every registered component, dataset and eval task, the loaded plugins, the failures."""

from __future__ import annotations

from typing import Any

COMPONENT_COLUMNS = ["kind", "name", "plugin", "modalities", "library", "output width", "tokens", "docs"]
PLUGIN_COLUMNS = ["plugin", "distribution", "version"]
FAILED_COLUMNS = ["plugin", "distribution", "error"]


def component_rows(registry: Any = None) -> list[list[str]]:
    """One row per registered component, dataset and eval task."""
    from mmhub.registry import get_registry

    reg = registry or get_registry()
    rows = []
    for kind, table in reg.components.items():
        for _, info in sorted(table.items()):
            m = info.metadata()
            mods = ", ".join(m["modalities_in"] + [f"-> {x}" for x in m["modalities_out"]]) or "-"
            rows.append([kind, m["name"], m["plugin"], mods, m["library"] or "-", m["out_dim"] or "-",
                         m["tokens"] or "-", m["doc"]])
    for kind, table in (("dataset", reg.datasets), ("eval task", reg.eval_tasks)):
        for _, info in sorted(table.items()):
            m = info.metadata()
            rows.append([kind, m["name"], m["plugin"], "-", "-", "-", "-", m["doc"]])
    return rows


def plugin_rows(registry: Any = None) -> list[list[str]]:
    from mmhub.registry import get_registry

    reg = registry or get_registry()
    return [[p.name, p.dist or "-", p.version or "-"] for p in (reg.plugins.loaded if reg.plugins else [])]


def failed_rows(registry: Any = None) -> list[list[str]]:
    from mmhub.registry import get_registry

    reg = registry or get_registry()
    return [[f.name, f.dist or "-", f.error] for f in reg.failed]


def summary(registry: Any = None) -> str:
    from mmhub.registry import PLURAL, get_registry

    reg = registry or get_registry()
    counts = ", ".join(f"{len(reg.components.get(k, {}))} {PLURAL[k].replace('_', ' ')}" for k in PLURAL)
    failed = len(reg.failed)
    return (f"{counts}; {len(reg.datasets)} datasets, {len(reg.eval_tasks)} eval tasks, {len(reg.presets)} presets. "
            + (f"**{failed} plugin(s) failed to load** (below)." if failed else "No plugin failed to load."))
