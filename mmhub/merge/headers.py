"""Pre-flight of a merge from the model folders' files alone: specs, manifests and safetensors headers, no tensor read.

Before `mmhub.merge.run.merge` loads any model (which reads every weight), each saved folder's ``mmhub_spec.json``,
``mmhub_manifest.json`` and the header of ``model.safetensors`` (names, shapes and dtypes only) are compared with the
base's for every configured slot: the slot exists, its component type is the base's, every tensor both folders store
for it has the same shape, the signal tokens agree, and with ``adapters: combine`` the models carry the adapters.
Every problem is listed together, with the slot, both sides and the fix. References that are not saved folders
(presets, spec files) are checked after loading, by the full pre-flight, which also compares the tokenizers and
the tensors that the weight sources, not the folders, hold.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors import safe_open

from mmhub.checkpoint import SPEC_FILE, WEIGHTS_FILE, read_manifest
from mmhub.errors import MMHubError
from mmhub.merge.config import MergeConfig
from mmhub.storage import is_scale_entry


def spec_slots(spec: dict[str, Any]) -> list[str]:
    """The slot paths a saved spec defines, in `mmhub.regimes.slots`' order."""
    def table(head: str) -> list[str]:
        return [f"{head}.{n}" for n in (spec.get(head) or {})]

    return (table("encoders") + table("projectors") + ["backbone"] + table("injectors")
            + (["signal_tokens"] if spec.get("signal_tokens") else []) + table("output_projectors")
            + table("generators"))


def _slot_spec(spec: dict[str, Any], slot: str) -> dict[str, Any] | None:
    head, _, name = slot.partition(".")
    table = spec.get(head)
    if head in ("backbone", "signal_tokens"):
        return table if isinstance(table, dict) and (table or head == "backbone") else None
    return table.get(name) if isinstance(table, dict) else None


def _shapes(folder: Path, slot: str) -> dict[str, tuple[int, ...]]:
    """The stored tensors of `slot` (names inside the slot, adapters' names as without them) -> shape."""
    prefix = slot + "."
    out = {}
    with safe_open(str(folder / WEIGHTS_FILE), "pt") as fh:
        for key in fh.keys():
            if key.startswith(prefix) and not is_scale_entry(key) and "lora_" not in key:
                out[key[len(prefix):].replace(".base_layer.", ".")] = tuple(fh.get_slice(key).get_shape())
    return out


class FolderFacts:
    """What one saved model folder says about itself without reading a tensor."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.spec, self.manifest = read_manifest(folder)

    def slot_type(self, slot: str) -> str | None:
        found = _slot_spec(self.spec, slot)
        return None if found is None else str(found.get("type", slot))


def folder_of(ref: str) -> Path | None:
    """The saved folder a model reference names, or None (a preset, a spec file, ``default``)."""
    path = Path(ref).expanduser()
    return path if (path / SPEC_FILE).is_file() and (path / WEIGHTS_FILE).is_file() else None


def header_problems(cfg: MergeConfig, registry: Any) -> list[str]:
    """Every problem the folders' files (and the config alone) show for `cfg`'s merge: empty when none. When the base
    is no saved folder, only the methods' settings are checked here."""
    from mmhub.merge.run import method_plan

    base_folder = folder_of(cfg.models.get(cfg.base, ""))
    if base_folder is None:
        return list(method_plan(cfg, registry)[1].values())
    facts = {n: FolderFacts(f) for n, ref in cfg.models.items() if (f := folder_of(ref)) is not None}
    base = facts[cfg.base]
    problems = []
    for name, f in facts.items():
        if name != cfg.base and f.spec.get("signal_tokens", {}) != base.spec.get("signal_tokens", {}):
            problems.append(f"models.{name}: its signal tokens ({f.spec.get('signal_tokens')}) differ from the "
                            f"base's ({base.spec.get('signal_tokens')}); merge models with the same output side")
    base_slots = spec_slots(base.spec)
    methods, method_errors = method_plan(cfg, registry, skip=[s for s in cfg.slots if s not in base_slots])
    for slot in cfg.slots:
        where = f"slots.{slot}"
        base_type = base.slot_type(slot)
        if slot not in base_slots or base_type is None:
            problems.append(f"{where}: the base has no slot {slot!r} (slots: {', '.join(base_slots)})")
            continue
        if slot in method_errors:
            problems.append(method_errors[slot])
            continue
        names = list(methods[slot][1])
        base_shapes = _shapes(base.folder, slot)
        for name in names:
            if name not in facts or name == cfg.base:
                continue
            f = facts[name]
            mine = f.slot_type(slot)
            if mine is None:
                problems.append(f"{where}: model {name} ({f.folder}) has no slot {slot!r}")
                continue
            if mine != base_type:
                problems.append(f"{where}: model {name}'s component is {mine!r} but {cfg.base}'s is {base_type!r}; "
                                "merge slots of the same component type")
                continue
            shapes = _shapes(f.folder, slot)
            for key in sorted(set(shapes) & set(base_shapes)):
                if shapes[key] != base_shapes[key]:
                    problems.append(f"{where}: tensor {key} is {shapes[key]} in {name} but {base_shapes[key]} in "
                                    f"{cfg.base}")
        known = [n for n in names if n in facts]
        lacking = [n for n in known if slot not in facts[n].manifest.adapters]
        if cfg.adapters == "combine" and lacking and len(lacking) < len(known):
            problems.append(f"{where}: {lacking} carry no LoRA adapter on {slot} (adapters: combine merges "
                            "adapters); give only models with one, or use adapters: fold")
    return problems


def check_headers(cfg: MergeConfig, registry: Any) -> None:
    """Raise every `header_problems` at once, before any model is loaded."""
    problems = header_problems(cfg, registry)
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise MMHubError(f"the merge cannot run: {len(problems)} problem(s) (found in the folders' files, before "
                         f"loading any weights):\n{listed}")
