"""`mmhub.load(ref)`: one function that turns anything naming a model into a ready `MMModel`.

``ref`` may be

* ``"default"``: the hub's shipped demo model (`mmhub.demo_model`);
* a folder written by `MMModel.save_pretrained` or ``mmhub train`` (trained weights, checked against the hashes
  recorded in its manifest);
* ``hf:ORG/NAME[@REV]`` or a local transformers folder: a published checkpoint (from the local Hugging Face cache,
  never downloaded), taken apart into mmhub's components by the importer registered for its ``model_type``
  (`mmhub.importers`);
* a spec file (YAML/JSON), a preset (``llava-1.5:tiny``) or a shipped recipe name: assembled with the weights its
  sources name and fresh weights elsewhere (what `mmhub.build` does).

`mmhub.build` only assembles specs; given a saved folder it refuses and points here.
"""

from __future__ import annotations

import os
from pathlib import Path

from mmhub.assembly import build, build_from_plan
from mmhub.checkpoint import SPEC_FILE, read_folder, verify_sources
from mmhub.demo_model import find_default
from mmhub.errors import CheckpointError, MMHubError
from mmhub.folder_weights import apply_weights
from mmhub.manifest import KIND_OF_GROUP, SavedManifest
from mmhub.model import MMModel
from mmhub.registry import Registry, get_registry
from mmhub.spec import spec_from_dict
from mmhub.validation import plan_spec
from mmhub.weights.sandbox import Sandbox

DEFAULT = "default"


def load(ref: str | Path, *, registry: Registry | None = None, verify: bool = True,
         allow_paths: list[str | Path] | None = None, trust_remote_code: bool = False) -> MMModel:
    """The model `ref` names (see the module docstring), in eval mode.

    >>> model = load("default")                       # doctest: +SKIP
    >>> model = load("runs/easyvqa-tiny/instruct/model")  # doctest: +SKIP
    >>> model = load("llava-1.5:tiny")                # doctest: +SKIP
    """
    text = str(ref)
    if text == DEFAULT:
        return load_default()
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / SPEC_FILE).is_file():
            return load_folder(path, registry=registry, verify=verify, allow_paths=allow_paths,
                               trust_remote_code=trust_remote_code)
        if (path / "config.json").is_file():
            return _import_hf_folder(path, text, trust_remote_code)
        raise MMHubError(f"{path} is a folder but not a model: it has neither {SPEC_FILE} (an mmhub model folder, "
                         "written by save_pretrained or `mmhub train`) nor config.json (a transformers folder)")
    if text.startswith("hf:"):
        from mmhub import weights  # resolving through the registered ``hf:`` source keeps one cache lookup

        return _import_hf_folder(weights.resolve(text, registry), text, trust_remote_code)
    if path.is_file():
        return build(path, registry=registry, trust_remote_code=trust_remote_code)
    if os.sep in text or text.startswith((".", "~")) or path.suffix.lower() in (".yaml", ".yml", ".json"):
        raise MMHubError(f"model {text!r}: no such folder or spec file ({path.absolute()}). Give a folder written by "
                         f"save_pretrained or `mmhub train`, a spec file, a preset (`mmhub presets`), an hf:ORG/NAME "
                         f"id in the local Hugging Face cache, or `default`.")
    return build(ref, registry=registry, trust_remote_code=trust_remote_code)


def load_default() -> MMModel:
    """The hub's default model (`mmhub.demo_model.find_default`); its ``default_info`` says which one it is."""
    found = find_default()
    model = load_folder(found.path)
    model.default_info = found
    return model


def load_folder(path: str | Path, registry: Registry | None = None, verify: bool = True,
                allow_nonfinite: bool = False, allow_paths: list[str | Path] | None = None,
                trust_remote_code: bool = False) -> MMModel:
    """Rebuild a model saved by `MMModel.save_pretrained`: the spec, then its weights, checked against the manifest.

    `verify` checks the recorded sha256 of every file and weight source (off: load a folder as it is, with a
    warning); `allow_nonfinite` lets NaN/inf weights load (e.g. to inspect a diverged run). Every file the folder's
    spec names must lie in the folder, mmhub's weight cache, the Hugging Face cache or an installed package
    (`mmhub.weights.sandbox`); `allow_paths` adds folders the caller trusts. `trust_remote_code` lets the weights'
    own Python run (transformers' ``auto_map``): only this argument can allow it, never the folder."""
    path = Path(path)
    spec_data, manifest = read_folder(path, verify=verify)
    registry = registry or get_registry()
    _check_components_installed(path, manifest, registry)
    spec_data = {**spec_data, "trained": list(manifest.trained),
                 "adapters": {k: v.model_dump() for k, v in manifest.adapters.items()}}
    if manifest.init_from is not None:
        spec_data["init_from"] = manifest.init_from.source
    plan = plan_spec(spec_from_dict(spec_data, str(path / SPEC_FILE)), registry, source=str(path / SPEC_FILE),
                     sandbox=Sandbox.for_folder(path, allow_paths), trust_remote_code=trust_remote_code)
    model = build_from_plan(plan)
    if verify:
        verify_sources(plan.ctx.weight_files, manifest)
    apply_weights(model, path, manifest, allow_nonfinite=allow_nonfinite)
    if manifest.imported_from is not None:  # the family it was imported from, for `mmhub export`
        model.imported_from = dict(manifest.imported_from)
    model.eval()
    return model


def _check_components_installed(path: Path, manifest: SavedManifest, registry: Registry) -> None:
    """A component whose plugin is not installed: name the pip distribution to install, not a different component."""
    for slot, origin in manifest.components.items():
        kind = KIND_OF_GROUP.get(slot.split(".")[0])
        if kind is None or origin.type in registry.components.get(kind, {}):
            continue
        package = f"{origin.dist}=={origin.version}" if origin.version else origin.dist
        raise CheckpointError(f"{path}: its {slot} is the {kind} {origin.type!r} from the pip distribution "
                              f"{origin.dist!r} (plugin {origin.plugin!r}), which is not installed here; "
                              f"install it with `pip install {package}` and load again")


def _import_hf_folder(folder: Path, ref: str, trust_remote_code: bool = False) -> MMModel:
    """A transformers folder through the importer registered for its ``model_type`` (`mmhub.importers`)."""
    from mmhub.importers import import_checkpoint  # importers pull in transformers' configs: only when asked

    return import_checkpoint(folder, trust_remote_code=trust_remote_code)


__all__ = ["load", "load_folder", "load_default", "DEFAULT"]
