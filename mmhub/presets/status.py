"""A preset's status, derived from its spec and the registry rather than written by hand.

``complete`` only when every slot loads published weights: its component class declares
``published_weights = True`` (a standard tower / LLM / pipeline that reads a published checkpoint, or a part whose
published layout a parity-tested importer fills) and the slot names its weights (``source`` or ``pretrained``).
A wrapper whose settings nest another component (the video encoder's ``frames: {type: ...}``) is judged by the
nested settings, unless its class declares ``has_own_weights = True`` (parameters of its own).
Otherwise ``partial: <slot>: <what is missing>; ...``: one entry per slot that starts random or reads a file
nothing published produces, then what the preset declares missing (``missing``: published parts a slot stands
in for, stages mmhub lacks). A tiny preset (no slot names weights) reads ``partial: every slot starts randomly
initialised (a test-size model)``.
"""

from __future__ import annotations

from typing import Any

from mmhub.registry import PresetInfo, Registry

SLOT_KINDS = (("encoders", "encoder"), ("projectors", "projector"), ("injectors", "injector"),
              ("output_projectors", "output_projector"), ("generators", "generator"))
WEIGHT_KEYS = ("source", "pretrained")


def _weights_named(settings: dict[str, Any]) -> str | None:
    return next((str(settings[k]) for k in WEIGHT_KEYS if settings.get(k)), None)


def _trained_by(spec: dict[str, Any], group: str) -> list[str]:
    """Names of the stages that train the `group` part (``projectors``, ``backbone``, ...)."""
    return [str(s.get("name")) for s in spec.get("stages") or []
            if (s.get("train") or {}).get(group, "frozen") != "frozen"]


def _slot_gap(reg: Registry, kind: str, path: str, settings: dict[str, Any], trained: list[str]) -> list[str]:
    """What keeps slot `path` from loading published weights ([] when it does)."""
    name = settings.get("type")
    try:
        cls = reg.get(kind, str(name)).cls  # type: ignore[arg-type]
    except Exception:  # an unknown type is validation's business; here it simply loads nothing known
        return [f"{path}: {name!r} is not a registered {kind}"]
    nested = [(f"{path}.{k}", v) for k, v in settings.items()
              if isinstance(v, dict) and str(v.get("type")) in reg.names(kind)]  # not rope_scaling: {type: ...}
    gaps = [g for p, v in nested for g in _slot_gap(reg, kind, p, v, trained)]
    if not getattr(cls, "has_own_weights", not nested):
        return gaps
    weights = _weights_named(settings)
    if weights is None:
        names = ", ".join(repr(t) for t in trained)
        by = (f"stage {names} trains it" if len(trained) == 1 else f"stages {names} train it") if trained \
            else "no stage trains it"
        return [*gaps, f"{path}: {name} starts randomly initialised ({by}, no published weights)"]
    if not getattr(cls, "published_weights", False):
        return [*gaps, f"{path}: {name} reads {weights}, which no parity-tested importer or converter produces "
                       f"from published weights"]
    return gaps


def slot_gaps(spec: dict[str, Any], reg: Registry) -> list[str]:
    """Every slot of `spec` that does not load published weights, as ``slot: reason``."""
    gaps: list[str] = []
    for group, kind in SLOT_KINDS:
        trained = _trained_by(spec, group)
        for key, settings in (spec.get(group) or {}).items():
            if isinstance(settings, dict):  # a string is a shared encoder (``video: image``)
                gaps += _slot_gap(reg, kind, f"{group}.{key}", settings, trained)
    if isinstance(spec.get("backbone"), dict):
        gaps += _slot_gap(reg, "backbone", "backbone", spec["backbone"], _trained_by(spec, "backbone"))
    return gaps


def derive_status(preset: PresetInfo, reg: Registry) -> str:
    """``complete``, or ``partial: <slot>: <what is missing>; ...`` (see the module docstring)."""
    gaps = slot_gaps(preset.spec, reg)
    slots = sum(isinstance(s, dict) for g, _ in SLOT_KINDS for s in (preset.spec.get(g) or {}).values()) + 1
    if gaps and len(gaps) >= slots and all("randomly initialised" in g for g in gaps):
        gaps = ["every slot starts randomly initialised (a test-size model)"]
    declared = [m.strip() for m in preset.missing.split(";") if m.strip()] if preset.missing else []
    reasons = gaps + declared
    return "partial: " + "; ".join(reasons) if reasons else "complete"


def statuses(reg: Registry) -> dict[str, str]:
    """``name:size`` -> derived status, for every registered preset."""
    return {key: derive_status(p, reg) for key, p in sorted(reg.presets.items())}
