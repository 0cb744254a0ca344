"""Finding the task for an evaluation and running it (what ``mmhub eval`` does, as functions)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from mmhub.errors import SpecError


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
        from mmhub.loading import load  # evaluation sits below the loader; a name is the caller's shortcut

        model = load(model, registry=registry)
    return get_task(task, settings, registry).run(model, **run)


__all__ = ["get_task", "evaluate"]
