"""Registers the presets shipped as YAML files beside this module (one file per system and size).

Each file holds ``preset: {name, size, io, description}`` and ``spec: {...}``.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from mmhub.hookspecs import hookimpl

HERE = Path(__file__).parent


@hookimpl
def register_presets(register):
    for path in sorted(HERE.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        meta = doc["preset"]
        register(meta["name"], meta["size"], doc["spec"], io=meta.get("io", ""), description=meta.get("description", ""))
