"""Registers the presets shipped as YAML files beside this module: one file per zoo system, both sizes.

Each file holds ``preset: {name, io, description, missing?}`` and one spec per size
(``tiny:`` built from configs with random weights, seconds on a CPU; ``full:`` the
published component sizes with weight references that build where the weights
are local). ``missing`` says what the system has that mmhub cannot express yet
(its status is then ``partial``): a mapping ``{slot or topic: reason}`` (e.g. a published part a slot stands in
for), added to the gaps `mmhub.presets.status` derives from the spec.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from mmhub.hookspecs import hookimpl

HERE = Path(__file__).parent
SIZES = ("tiny", "full")


@hookimpl
def register_presets(register):
    for path in sorted(HERE.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        meta = doc["preset"]
        missing = meta.get("missing") or ""
        if isinstance(missing, dict):
            missing = "; ".join(f"{slot}: {reason}" for slot, reason in missing.items())
        for size in SIZES:
            if size in doc:
                register(meta["name"], size, doc[size], io=meta.get("io", ""), description=meta.get("description", ""),
                         missing=missing if size == "full" else "")  # what the published system has
