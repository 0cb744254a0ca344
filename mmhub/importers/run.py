"""Running an import: pick the family importer from ``config.json``, build its spec, load its weight map strictly.

`import_checkpoint(folder)` is what ``mmhub.load(folder)``, ``mmhub.load("hf:ORG/NAME")`` and ``mmhub import`` call.
It refuses a checkpoint that asks to run its own code (``auto_map``) unless the caller passed
``trust_remote_code``, an unsupported ``model_type`` (naming the supported families and how to add one), a tensor
whose shape does not fit (name and both shapes), missing or unexpected keys (listed), and checkpoint tensors no part
took (listed): an import either reproduces the checkpoint or says why not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmhub.errors import CheckpointError, MMHubError
from mmhub.importers.base import Checkpoint, Imported, Importer, ImportOptions
from mmhub.registry import Registry, get_registry

HOW_TO_ADD = ("a plugin adds a family with the register_importers hook (docs/importers.md); `mmhub plugins` lists "
              "the importers installed")
SHOWN = 8  # names listed in an error before "... and N more"


class UnsupportedModelError(CheckpointError):
    """The folder's ``model_type`` has no registered importer."""


def importers(registry: Registry | None = None) -> dict[str, type[Importer]]:
    """Family name -> importer class, for every importer the installed plugins registered."""
    registry = registry or get_registry()
    return {name: info.cls for name, info in registry.entries["importer"].items()}


def supported_model_types(registry: Registry | None = None) -> dict[str, str]:
    """transformers ``model_type`` -> the family importer that takes it."""
    return {mt: name for name, cls in importers(registry).items() for mt in cls.model_types}


def find_importer(model_type: str | None, where: str, registry: Registry | None = None,
                  architectures: list[str] | None = None) -> Importer:
    """The importer registered for `model_type` (or, for a folder without one, for one of its `architectures`);
    else an error listing the supported families."""
    table = supported_model_types(registry)
    if model_type in table:
        return importers(registry)[table[model_type]]()
    if not model_type:
        for cls in importers(registry).values():
            if set(architectures or ()) & set(cls.architectures):
                return cls()
    listed = ", ".join(sorted(table)) or "none"
    raise UnsupportedModelError(f"{where}: no importer for model_type {model_type!r}; mmhub imports {listed}. "
                                f"To add one, {HOW_TO_ADD}.")


def _names(items: list[str]) -> str:
    shown = ", ".join(items[:SHOWN])
    return shown + (f" ... and {len(items) - SHOWN} more" if len(items) > SHOWN else "")


def _check_remote_code(ckpt: Checkpoint, options: ImportOptions, importer: Importer) -> None:
    auto_map = ckpt.config.get("auto_map")
    if auto_map and not options.trust_remote_code and importer.runs_checkpoint_code:
        raise CheckpointError(f"{ckpt.folder}: config.json has an auto_map ({_names(sorted(auto_map))}), so this "
                              f"model's own Python would run to build it; mmhub never runs a checkpoint's code "
                              f"unless asked. Read that code, then pass trust_remote_code=True "
                              f"(`--trust-remote-code` on the command line).")


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load `state` into `module` by name: every shape must fit, nothing may be missing or left over (a parameter
    tied to one that was loaded counts as loaded)."""
    own = module.state_dict(keep_vars=True)
    wrong = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
             for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise CheckpointError(f"{what}: {len(wrong)} tensor(s) do not fit: {_names(wrong)}")
    unexpected = sorted(set(state) - set(own))
    loaded_storage = {own[k].data_ptr() for k in state if k in own}
    missing = sorted(k for k in set(own) - set(state) if own[k].data_ptr() not in loaded_storage)
    if missing or unexpected:
        raise CheckpointError(f"{what}: {len(missing)} missing tensor(s) ({_names(missing) or '-'}) and "
                              f"{len(unexpected)} unexpected ({_names(unexpected) or '-'})")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v.to(own[k].dtype))


def apply_imported(model: Any, imported: Imported, where: str) -> None:
    """Load every weight-map entry into its submodule of `model`, then run the importer's `after_load`."""
    for path, state in imported.weights.items():
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise CheckpointError(f"{where}: the importer maps weights to {path!r}, which the built model does "
                                  f"not have") from None
        load_strict(module, state, f"{where} -> {path}")
    if imported.after_load is not None:
        imported.after_load(model)


def import_checkpoint(folder: str | Path, *, template: str | None = None, dtype: str = "float32",
                      trust_remote_code: bool = False, registry: Registry | None = None) -> Any:
    """A local transformers folder -> an `MMModel` built from mmhub components, its weights loaded from the folder
    (eval mode). The family importer is chosen by ``config.json``'s ``model_type``."""
    from mmhub.assembly import build

    options = ImportOptions(template=template, dtype=dtype, trust_remote_code=trust_remote_code)
    ckpt = Checkpoint(folder)
    archs = ckpt.config.get("architectures")
    importer = find_importer(ckpt.model_type, str(ckpt.folder / "config.json"), registry,
                             archs if isinstance(archs, list) else None)
    _check_remote_code(ckpt, options, importer)
    imported = importer.convert(ckpt, options)
    left = ckpt.unused()
    if left:
        raise CheckpointError(f"{ckpt.folder}: the {importer.name} importer left {len(left)} checkpoint tensor(s) "
                              f"unused ({_names(left)}); the model it builds would not compute what the checkpoint "
                              f"does. This checkpoint has parts the importer does not know.")
    try:
        model = build(imported.spec, registry=registry, trust_remote_code=trust_remote_code)
    except MMHubError as exc:
        raise CheckpointError(f"{ckpt.folder}: the {importer.name} importer's spec does not build: {exc}") from None
    apply_imported(model, imported, str(ckpt.folder))
    model.import_notes = [*imported.notes, *(f"ignored {p}: {r}" for p, r in ckpt.ignored.items())]
    model.imported_from = {"folder": str(ckpt.folder), "importer": importer.name, "model_type": ckpt.model_type or ""}
    model.eval()
    return model


__all__ = ["import_checkpoint", "find_importer", "importers", "supported_model_types", "load_strict",
           "apply_imported", "UnsupportedModelError"]
