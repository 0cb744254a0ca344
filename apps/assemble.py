"""The Assemble tab's logic: a form of registered components -> a spec (YAML) -> validated -> built.

The dropdowns list what the registry holds, so a plugin's components appear here as
soon as its package is installed. Each component starts from the settings its class
declares as a small working example (`example_settings`), which the user edits as
YAML. Validation and building never raise into the UI: they return text that lists
every problem with its place and fix.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import yaml

from mmhub.errors import MMHubError, SpecError

NONE = "(none)"
MODALITIES = ("image", "video", "audio", "points")


def names(kind: str, modality: str | None = None, registry: Any = None) -> list[str]:
    """Registered component names of a kind (encoders: those that read `modality`)."""
    from mmhub.registry import get_registry

    table = (registry or get_registry()).components.get(kind, {})
    return sorted(n for n, info in table.items()
                  if modality is None or kind != "encoder" or modality in info.cls.modalities_in)


def example_yaml(kind: str, name: str, registry: Any = None) -> str:
    """The component's example settings as YAML (empty for none)."""
    from mmhub.registry import get_registry

    if not name or name == NONE:
        return ""
    info = (registry or get_registry()).components.get(kind, {}).get(name)
    if info is None:
        return ""
    settings = dict(info.cls.example_settings)
    return yaml.safe_dump(settings, sort_keys=False) if settings else ""


def _settings(text: str, where: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text or "") or {}
    except yaml.YAMLError as exc:
        raise MMHubError(f"{where} settings are not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise MMHubError(f"{where} settings must be a mapping of setting: value, got {type(data).__name__}")
    data.pop("type", None)
    return data


def form_to_yaml(name: str, modality: str, encoder: str, encoder_settings: str, projector: str,
                 projector_settings: str, backbone: str, backbone_settings: str, template: str,
                 output_projector: str = NONE, output_settings: str = "", generator: str = NONE,
                 generator_settings: str = "") -> str:
    """The form's choices as a spec in YAML (settings text that is not YAML is an MMHubError)."""
    spec: dict[str, Any] = {"name": (name or "my-model").strip()}
    if encoder and encoder != NONE:
        spec["encoders"] = {modality: {"type": encoder, **_settings(encoder_settings, "encoder")}}
        spec["projectors"] = {modality: {"type": projector, **_settings(projector_settings, "projector")}}
    spec["backbone"] = {"type": backbone, **_settings(backbone_settings, "backbone")}
    if output_projector and output_projector != NONE:
        spec["output_projectors"] = {
            modality: {"type": output_projector, **_settings(output_settings, "output projector")}}
    if generator and generator != NONE:
        spec["generators"] = {modality: {"type": generator, **_settings(generator_settings, "generator")}}
    if template:
        spec["template"] = template
    return yaml.safe_dump(spec, sort_keys=False)


def preset_yaml(key: str, registry: Any = None) -> str:
    """A shipped preset's spec as YAML."""
    from mmhub.registry import get_registry

    reg = registry or get_registry()
    if key not in {p.key for p in reg.presets.values()}:
        raise MMHubError(f"no preset {key!r}; choose one of the listed presets")
    preset = next(p for p in reg.presets.values() if p.key == key)
    return yaml.safe_dump(preset.spec, sort_keys=False)


def _load(text: str) -> Any:
    from mmhub.spec import parse_text, spec_from_dict

    return spec_from_dict(parse_text(text, "the spec box"), "the spec box")


def validate(text: str, registry: Any = None) -> tuple[bool, str]:
    """(ok, markdown): one line on success, else every problem with its place and fix."""
    from mmhub.validation import plan_spec

    try:
        spec = _load(text)
        plan = plan_spec(spec, registry=registry, source="the spec box")
    except SpecError as exc:
        lines = [f"**Invalid spec: {len(exc.problems)} problem(s)**"] + [f"- `{p.path or 'spec'}`: {_fix(p)}"
                                                                       for p in exc.problems]
        return False, "\n".join(lines)
    except MMHubError as exc:
        return False, f"**Invalid spec**: {exc}"
    mods = ", ".join(f"{m}: {plan.encoders[m].info.name} -> {plan.projectors[m].info.name} "
                     f"({plan.tokens_per_item(m)} tokens per item)" for m in plan.encoders) or "text only"
    bf = plan.backbone_facts
    return True, (f"**Valid**: {spec.name}: {mods}; backbone {plan.backbone.info.name} (hidden {bf.hidden_size}, "
                  f"context {bf.context_length}); template {plan.template.name}")


def _fix(p: Any) -> str:
    return f"{p.message} (fix: {p.fix})" if p.fix else p.message


def build(text: str, registry: Any = None) -> tuple[list[list[Any]], str]:
    """Build the spec: (parameter table rows, markdown summary), or ([], the error)."""
    rows, summary, _ = build_and_draw(text, registry, draw=False)
    return rows, summary


def build_and_draw(text: str, registry: Any = None, draw: bool = True,
                   folder: str | None = None) -> tuple[list[list[Any]], str, str | None]:
    """Build the spec: (parameter table rows, markdown summary, the model's diagram as a PNG path), or
    ([], the error, None). The diagram (`mmhub.diagram`) has a panel per stage with what it trains coloured."""
    from mmhub.assembly import build as build_model

    ok, message = validate(text, registry)
    if not ok:
        return [], message, None
    try:
        model = build_model(_load(text), registry=registry)
    except MMHubError as exc:
        return [], f"**Build failed**: {exc}", None
    except Exception as exc:  # a component's own error while building: shown, never raised into the server
        return [], f"**Build failed** ({type(exc).__name__}): {exc}", None
    rows = [[r["slot"], r["type"], r["params"], r["trainable"]] for r in model.parameter_table()]
    total = sum(r[2] for r in rows)
    summary = f"**Built** {model.spec.name}: {total:,} parameters in {len(rows)} components."
    if not draw:
        return rows, summary, None
    from mmhub.diagram import diagram_caption, draw_diagram, model_facts

    out = Path(folder or tempfile.mkdtemp(prefix="mmhub-diagram-")) / f"{model.spec.name}.png"
    try:
        facts = model_facts(model)
        draw_diagram(facts, out)
    except Exception as exc:  # the picture is an extra: the build stands without it
        return rows, summary + f" (no diagram: {type(exc).__name__}: {exc})", None
    return rows, summary + f"\n\nDiagram: {diagram_caption(facts)}", str(out)


def save(text: str, folder: str | None = None) -> str:
    """Write the spec text to a .yaml file for download (after checking it parses); returns the path."""
    from mmhub.spec import parse_text

    data = parse_text(text, "the spec box")
    name = str(data.get("name") or "spec") if isinstance(data, dict) else "spec"
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in name) or "spec"
    out = Path(folder or tempfile.mkdtemp(prefix="mmhub-spec-")) / f"{safe}.yaml"
    out.write_text(text)
    return str(out)
