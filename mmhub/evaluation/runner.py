"""Finding the model and the task for an evaluation (what ``mmhub eval`` does, as functions)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mmhub.errors import MMHubError, SpecError

def load_model(name: str, registry: Any = None) -> Any:
    """A model from a saved folder, a spec file, a preset (``llava-1.5:tiny``) or ``default`` (the demo model)."""
    if name == "default":  # the hub's demo model (or its documented fallback)
        from mmhub.demo_model import load_default

        return load_default()
    path = Path(name).expanduser()
    from mmhub.assembly import build
    from mmhub.model import MMModel

    if path.is_dir():
        return MMModel.from_pretrained(path, registry=registry)
    if path.is_file():
        return build(path, registry=registry)
    if os.sep in name or name.startswith((".", "~")) or path.suffix.lower() in (".yaml", ".yml", ".json"):
        raise MMHubError(f"model {name!r}: no such folder or spec file ({path.absolute()}). Give a folder written by "
                         f"save_pretrained or `mmhub train`, a spec file, a preset (`mmhub presets`) or `default`.")
    return build(name, registry=registry)


def get_task(name: str, settings: dict[str, Any] | None = None, registry: Any = None) -> Any:
    """An evaluation task instance by registered name (``easy-vqa`` and ``easy_vqa`` both work)."""
    if registry is None:
        from mmhub.registry import get_registry

        registry = get_registry()
    info = registry.eval_task(name)
    try:
        config = info.cls.Config.model_validate(settings or {})
    except ValidationError as exc:
        from mmhub.spec import problems_from_validation

        raise SpecError(problems_from_validation(exc, prefix="task", fields=info.cls.Config.model_fields),
                        f"{info.name} task settings") from None
    return info.cls(config)


def evaluate(model: Any, task: str = "easy_vqa", settings: dict[str, Any] | None = None, registry: Any = None,
             **run: Any) -> dict[str, Any]:
    """Run the registered task `task` on `model` (``run`` holds split, limit, blind, batch_size, ...)."""
    if isinstance(model, str):
        model = load_model(model, registry)
    return get_task(task, settings, registry).run(model, **run)


__all__ = ["load_model", "get_task", "evaluate"]
