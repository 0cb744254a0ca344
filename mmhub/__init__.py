"""mmhub: assemble, train and demo multimodal LLMs from declarative specs, with components as plugins.

Public API::

    import mmhub
    model = mmhub.build("llava-1.5:tiny")          # assemble a spec file, preset, dict or Spec (fresh weights)
    model.generate(["<image>\\nWhat is shown?"], [{"image": [img]}])
    model.save_pretrained("out/")
    model = mmhub.load("out/")                     # a saved folder, "default", a spec, a preset or hf:ORG/NAME

The names below load on first use (PEP 562), so ``import mmhub`` and ``mmhub --help``
do not import torch; ``mmhub.build`` and the rest work as plain attributes.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from mmhub.xformers_probe import silence_xformers_import_warning  # noqa: E402  (standard library only)

# xformers built for another torch logs six lines on every import (diffusers imports it); mmhub says it in one line
silence_xformers_import_warning()

# public name -> the module that defines it; one line per name
_LAZY: dict[str, str] = {
    "load": "mmhub.loading",
    "build": "mmhub.assembly",
    "MMModel": "mmhub.model",
    "Spec": "mmhub.spec",
    "load_spec": "mmhub.spec",
    "plan_spec": "mmhub.validation",
    "get_registry": "mmhub.registry",
    "hookimpl": "mmhub.hookspecs",
    "MMHubError": "mmhub.errors",
    "SpecError": "mmhub.errors",
}
__all__ = list(_LAZY)

if TYPE_CHECKING:  # static analysers see the real names
    from mmhub.assembly import build as build
    from mmhub.errors import MMHubError as MMHubError
    from mmhub.errors import SpecError as SpecError
    from mmhub.hookspecs import hookimpl as hookimpl
    from mmhub.loading import load as load
    from mmhub.model import MMModel as MMModel
    from mmhub.registry import get_registry as get_registry
    from mmhub.spec import Spec as Spec
    from mmhub.spec import load_spec as load_spec
    from mmhub.validation import plan_spec as plan_spec


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mmhub' has no attribute {name!r}; public names: {', '.join(__all__)}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
