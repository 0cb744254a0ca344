"""What mmhub writes beside a saved model, apart from what the user wrote: the `SavedManifest`.

A model folder holds the user's spec (``mmhub_spec.json``: components, template, stages, exactly the fields a
person writes) and this manifest (``mmhub_manifest.json``): package versions, the hashes of the weight sources the
spec names and of every file in the folder, the slots training changed, the LoRA adapters the model carries, the
shipped folder it was grown from (``init_from``) and which pip distribution provided each component. Folders
saved before the manifest existed kept these fields inside the spec file (under ``resolved``, ``trained`` and
``adapters``); `split_legacy` reads those into the same objects.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata as md
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mmhub.spec import LoraSpec

MANIFEST_FILE = "mmhub_manifest.json"
FORMAT = 1
PACKAGES = ("mmhub", "torch", "transformers", "timm", "open_clip_torch", "peft", "safetensors", "pluggy", "diffusers")
LEGACY_KEYS = ("resolved", "trained", "adapters")  # saved-spec keys that belong to the manifest
KIND_OF_GROUP = {"backbone": "backbone", "encoders": "encoder", "projectors": "projector", "injectors": "injector",
                 "output_projectors": "output_projector", "generators": "generator"}  # slot prefix -> component kind


class WeightRecord(BaseModel):
    """A weight source the spec names, where it resolved to when saved, and its hash."""

    model_config = ConfigDict(extra="ignore")
    path: str
    sha256: str


class BaseFolder(BaseModel):
    """The shipped model folder a save is layered on (its weights load first), with its weights' hash."""

    model_config = ConfigDict(extra="ignore")
    source: str
    path: str
    sha256: str


class ComponentOrigin(BaseModel):
    """Which component type filled a slot, and the plugin and pip distribution (with version) that provided it."""

    model_config = ConfigDict(extra="ignore")
    type: str
    plugin: str
    dist: str = ""
    version: str = ""


class SavedManifest(BaseModel):
    """Everything mmhub records about a saved model that the user did not write."""

    model_config = ConfigDict(extra="ignore")
    format: int = FORMAT
    created: str = ""
    packages: dict[str, str] = Field(default_factory=dict)
    weights: dict[str, WeightRecord] = Field(default_factory=dict, description="weight-source URI -> path and sha256")
    files: dict[str, str] = Field(default_factory=dict, description="file in the folder -> sha256 when saved")
    saved: Literal["full", "not-recoverable"] = "not-recoverable"
    tensors: int = 0
    trained: list[str] = Field(default_factory=list, description="slots whose own weights training changed")
    adapters: dict[str, LoraSpec] = Field(default_factory=dict, description="LoRA adapters the model carries, by slot")
    init_from: BaseFolder | None = None
    components: dict[str, ComponentOrigin] = Field(default_factory=dict, description="slot -> provenance")
    storage_dtype: Literal["float16", "bfloat16", "int8"] | None = Field(
        None, description="float32 tensors were stored in this dtype (smaller folder; loading casts them back)")
    imported_from: dict[str, str] | None = Field(None, description="the transformers folder, importer and model_type "
                                                 "an imported model came from (`mmhub export` picks the family by it)")
    legacy: bool = Field(False, exclude=True, description="read from a folder saved before the manifest existed")


def package_versions() -> dict[str, str]:
    """Installed versions of the packages a saved model's numbers depend on."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def component_origins(plan: Any) -> dict[str, ComponentOrigin]:
    """slot -> the type, plugin and distribution of every component in a validated plan."""
    plugins = plan.ctx.registry.plugins
    loaded = {p.name: p for p in (plugins.loaded if plugins else [])}
    out = {}
    for slot, info in plan_slots(plan):
        origin = loaded.get(info.plugin)
        out[slot] = ComponentOrigin(type=info.name, plugin=info.plugin, dist=getattr(origin, "dist", ""),
                                    version=getattr(origin, "version", ""))
    return out


def plan_slots(plan: Any) -> list[tuple[str, Any]]:
    """(slot, ComponentInfo) for every component of a plan, in spec order (shared encoders once)."""
    pairs = [("backbone", plan.backbone.info)]
    for group in ("encoders", "projectors", "injectors", "output_projectors", "generators"):
        for key, slot_plan in getattr(plan, group).items():
            if group == "encoders" and key in plan.shared:
                continue
            pairs.append((f"{group}.{key}", slot_plan.info))
    return pairs


def split_legacy(data: dict[str, Any]) -> tuple[dict[str, Any], SavedManifest]:
    """A spec file saved before the manifest existed -> (the user's spec, the manifest its extra keys hold)."""
    spec = {k: v for k, v in data.items() if k not in LEGACY_KEYS}
    resolved = data.get("resolved") or {}
    base = resolved.get("init_from")
    manifest = SavedManifest(
        created=str(resolved.get("created", "")), packages=resolved.get("packages") or {},
        weights=resolved.get("weights") or {}, saved=resolved.get("saved", "not-recoverable"),
        tensors=int(resolved.get("tensors") or 0), trained=list(data.get("trained") or []),
        adapters=data.get("adapters") or {}, legacy=True,
        init_from=BaseFolder(source=data["init_from"], **base) if base and data.get("init_from") else None)
    return spec, manifest
