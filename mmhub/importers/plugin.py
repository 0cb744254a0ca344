"""The built-in family importers, registered through the same ``register_importers`` hook a plugin uses."""

from __future__ import annotations

from mmhub.hookspecs import hookimpl
from mmhub.importers.llava import LlavaImporter

BUILTIN = [LlavaImporter]


@hookimpl
def register_importers(register):
    for cls in BUILTIN:
        register(cls)
