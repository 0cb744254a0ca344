"""A model folder's files: writing them (atomically, `mmhub.atomic`), reading and verifying its spec and manifest.

A model folder holds ``mmhub_spec.json`` (the spec as a user writes it, every default filled in),
``model.safetensors`` and ``mmhub_manifest.json`` (the `SavedManifest`: versions, hashes of the weight
sources and of each file in the folder, trained slots, adapters, provenance). By default only tensors that
cannot be recovered from the spec's weight sources are written: every tensor of a component built from a
config (random init) or changed by training, and the adapter and trainable parameters of components whose
weights come from a source. A model grown from a shipped model folder (``init_from: mmhub:...``) stores only
what it changed. Folders are written to a temporary sibling and renamed into place, so a crash mid-save never
leaves a half checkpoint under the final name. No pickle is involved anywhere. Turning a folder back into a
model is `mmhub.loading.load_folder`; its weights are filled in by `mmhub.folder_weights.apply_weights`.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from mmhub.atomic import atomic_dir
from mmhub.errors import CheckpointError, WeightsNotFoundError
from mmhub.manifest import (
    LEGACY_KEYS,
    MANIFEST_FILE,
    BaseFolder,
    SavedManifest,
    WeightRecord,
    component_origins,
    now,
    package_versions,
    split_legacy,
)
from mmhub.storage import STORAGE_DTYPES, expand_state, shrink_state
from mmhub.weights import sha256_path
from mmhub.weights.sandbox import no_climbing

SPEC_FILE = "mmhub_spec.json"
PACKAGE_ROOT = Path(__file__).resolve().parent  # where ``mmhub:`` model folders live
WEIGHTS_FILE = "model.safetensors"


def tensors_to_save(model: Any, full: bool) -> dict[str, torch.Tensor]:
    """The state to write: everything with `full`, else what the weight sources cannot restore."""
    state: dict[str, torch.Tensor] = {}
    from mmhub.regimes import slots

    trained = set(model.spec.trained)
    for prefix, mod in slots(model):
        everything = full or not mod.has_weight_source() or prefix in trained
        if everything:
            for k, v in mod.state_dict(keep_vars=True).items():
                state[f"{prefix}.{k}"] = v.detach()
        else:  # weights from a source: only what training added (adapters) or is training now
            for k, p in mod.named_parameters():
                if p.requires_grad or "lora_" in k:
                    state[f"{prefix}.{k}"] = p.detach()
    return state


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses shared storage (tied embeddings): keep one copy, record the aliases."""
    seen: dict[tuple[int, int, tuple[int, ...], tuple[int, ...]], str] = {}
    unique, aliases = {}, {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()))
        if key in seen:
            aliases[k] = seen[key]
        else:
            seen[key] = k
            unique[k] = v.contiguous().cpu()
    return unique, aliases


def user_spec(model: Any) -> dict[str, Any]:
    """The spec as the user would write it, every default and inferred width filled in (no manifest keys)."""
    data = model.plan.resolved_dict()
    for key in LEGACY_KEYS:
        data.pop(key, None)
    return data


TOKENIZER_DIR = "tokenizer"


def bundled_tokenizer(model: Any, spec: dict[str, Any]) -> Any:
    """The tokenizer an imported model's folder carries in ``tokenizer/`` (None for other models), with `spec`'s
    backbone pointed at it: the checkpoint it was imported from may be moved, deleted, or lie outside where a loaded
    folder may read (`mmhub.weights.sandbox`), so `mmhub import FOLDER OUT` gives a folder that loads by itself."""
    from mmhub.weights import split_uri

    backbone = spec.get("backbone")
    name = backbone.get("tokenizer") if isinstance(backbone, dict) else None
    if getattr(model, "imported_from", None) is None or not isinstance(name, str) or split_uri(name)[0] != "file":
        return None
    tokenizer = getattr(model.backbone, "tokenizer", None)
    if not hasattr(tokenizer, "save_pretrained"):
        return None
    backbone["tokenizer"] = TOKENIZER_DIR
    return tokenizer


def build_manifest(model: Any, saved: str, n_tensors: int) -> SavedManifest:
    """What mmhub records beside the spec: versions, source hashes, trained slots, adapters, provenance."""
    return SavedManifest(
        created=now(), packages=package_versions(),
        weights={uri: WeightRecord(path=str(p), sha256=sha256_path(p))
                 for uri, p in model.plan.ctx.weight_files.items()},
        saved=saved, tensors=n_tensors, trained=list(model.spec.trained), adapters=dict(model.spec.adapters),
        components=component_origins(model.plan), imported_from=getattr(model, "imported_from", None))


def layered_base(model: Any, full: bool) -> Path | None:
    """The model folder a save may lean on: the spec's ``init_from`` when it is a shipped one (``mmhub:``).

    Such a folder travels with the package, so a model grown from it (say a demo model taught to draw)
    stores only the tensors it changed or added and names the folder in its spec; loading applies the
    folder first, then these tensors. Other ``init_from`` paths (run folders) can move or vanish, so
    models grown from them are saved self-contained."""
    source = getattr(model.spec, "init_from", None)
    if full or not source or not source.startswith("mmhub:"):
        return None
    folder = package_path(source)
    return folder if (folder / WEIGHTS_FILE).is_file() else None


def save_model(model: Any, path: Path, full: bool = False, storage_dtype: str | None = None) -> Path:
    """Write `model` to `path` atomically (only what neither the weight sources nor a shipped ``init_from``
    folder restores, unless `full`): the user's spec, the weights and the manifest with every file's hash.
    `storage_dtype` (``float16`` / ``bfloat16`` / ``int8``, `mmhub.storage`) stores the float32 tensors smaller: half
    the size (a quarter for int8 matrices), and loading casts them back (outputs then match the saved model's to
    that dtype's precision, not bit for bit)."""
    if storage_dtype is not None and storage_dtype not in STORAGE_DTYPES:
        raise CheckpointError(f"storage_dtype {storage_dtype!r} is not one of {sorted(STORAGE_DTYPES)}; "
                              "omit it to store every tensor as the model holds it")
    state = tensors_to_save(model, full)
    base = layered_base(model, full)
    if base is not None:
        inherited = expand_state(load_file(str(base / WEIGHTS_FILE)))
        state = {k: v for k, v in state.items()
                 if not (k in inherited and inherited[k].shape == v.shape
                         and torch.equal(inherited[k], v.detach().cpu().to(inherited[k].dtype)))}
    state, aliases = _dedupe(state)
    state = shrink_state(state, storage_dtype)
    spec = user_spec(model)
    tokenizer = bundled_tokenizer(model, spec)
    manifest = build_manifest(model, "full" if full else "not-recoverable", len(state) + len(aliases))
    manifest.storage_dtype = storage_dtype
    if base is not None:
        spec["init_from"] = model.spec.init_from
        manifest.init_from = BaseFolder(source=model.spec.init_from, path=str(base),
                                        sha256=sha256_path(base / WEIGHTS_FILE))
    with atomic_dir(path) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "aliases": json.dumps(aliases)})
        (tmp / SPEC_FILE).write_text(json.dumps(spec, indent=2))
        names = [WEIGHTS_FILE, SPEC_FILE]
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
            names += sorted(str(f.relative_to(tmp)) for f in (tmp / TOKENIZER_DIR).rglob("*") if f.is_file())
        manifest.files = {name: sha256_path(tmp / name) for name in names}
        (tmp / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2))
    return path


def _check_folder(path: Path) -> None:
    if not path.exists():
        leftovers = sorted(path.parent.glob(f".{path.name}.old-*")) if path.parent.exists() else []
        if leftovers:
            raise CheckpointError(f"{path} is missing but {leftovers[0]} holds an interrupted save's previous copy; "
                                  f"rename it back to {path.name} to use it.")
        raise CheckpointError(f"model folder {path} does not exist; pass a folder written by save_pretrained.")
    for name in (SPEC_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise CheckpointError(f"{path} is not an mmhub model folder: {name} is missing "
                                  f"(expected {SPEC_FILE} and {WEIGHTS_FILE}, written by save_pretrained).")


def read_manifest(path: Path) -> tuple[dict[str, Any], SavedManifest]:
    """A model folder's spec and manifest as stored, unchecked (folders without a manifest: from the spec file)."""
    _check_folder(path)
    _inside(path)
    data = _read_json(path / SPEC_FILE)
    if (path / MANIFEST_FILE).is_file():
        try:
            manifest = SavedManifest.model_validate(_read_json(path / MANIFEST_FILE))
        except ValidationError as exc:
            raise CheckpointError(f"{path / MANIFEST_FILE} is damaged ({exc.error_count()} problem(s), first: "
                                  f"{exc.errors()[0]['msg']} at {exc.errors()[0]['loc']}); save the model again"
                                  ) from None
    else:  # saved before the manifest existed: its fields sit in the spec file
        data, manifest = split_legacy(data)
    return data, manifest


def _inside(path: Path) -> None:
    """The folder's own files must be the folder's: a symlink pointing elsewhere is refused."""
    root = path.resolve()
    for name in (SPEC_FILE, WEIGHTS_FILE, MANIFEST_FILE):
        real = (path / name).resolve()
        if (path / name).exists() and not real.is_relative_to(root):
            raise CheckpointError(f"{path / name} is a link to {real}, outside the model folder; a model folder holds "
                                  "its own files. Copy the file into the folder if you trust it.")


def read_folder(path: Path, verify: bool = True) -> tuple[dict[str, Any], SavedManifest]:
    """A model folder's spec (as the user wrote it) and its manifest; with `verify`, every recorded file hash and
    the shipped base folder's hash must match."""
    data, manifest = read_manifest(path)
    if not verify:
        warnings.warn(f"{path}: loading without checking the recorded hashes (verify=False); a changed or damaged "
                      "file loads as it is", stacklevel=3)
    elif not manifest.files:
        warnings.warn(f"{path} records no file hashes (saved before mmhub recorded them, or its manifest was "
                      "removed): a changed or corrupted file would load silently. Save it again with "
                      "save_pretrained to record them.", stacklevel=3)
    if verify:
        for name, want in manifest.files.items():
            got = sha256_path(path / name) if (path / name).is_file() else "(missing)"
            if got != want:
                raise CheckpointError(f"{path / name} changed since the model was saved: sha256 {got[:12]}... != "
                                      f"recorded {want[:12]}...; restore the folder, or pass verify=False to load it "
                                      "as it is")
        _check_base(path, manifest)
    return data, manifest


MAX_JSON_BYTES = 4 << 20  # a saved spec or manifest is a few KB; anything near this is not one


def _read_json(file: Path) -> dict[str, Any]:
    """A JSON object from a folder file; anything else (too big, not UTF-8, not JSON, not an object, nested
    beyond reason) is a CheckpointError naming the file."""
    damaged = "the folder is damaged, save the model again"
    if not file.is_file() or file.stat().st_size > MAX_JSON_BYTES:
        raise CheckpointError(f"{file} is not a regular file under {MAX_JSON_BYTES >> 20} MB; {damaged}.")
    try:
        data = json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{file} is not UTF-8 text (byte {exc.start}); {damaged}.") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file} is not valid JSON (line {exc.lineno}): {exc.msg}; {damaged}.") from None
    except RecursionError:
        raise CheckpointError(f"{file} nests deeper than Python can read; {damaged}.") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} holds a JSON {type(data).__name__}, not an object; {damaged}.")
    return data


def _check_base(path: Path, manifest: SavedManifest) -> None:
    """The shipped folder a layered save leans on must be there, unchanged."""
    base = manifest.init_from
    if base is None:
        return
    folder = package_path(base.source)
    if not (folder / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{path} is saved on top of {base.source} ({folder}), which is missing; "
                              "restore that model folder (it ships with mmhub) or load a self-contained save")
    got = sha256_path(folder / WEIGHTS_FILE)
    if got != base.sha256:
        raise CheckpointError(f"{path} is saved on top of {base.source}, whose weights changed since "
                              f"(sha256 {got[:12]}... != recorded {base.sha256[:12]}...); restore that folder "
                              "or pass verify=False")


def verify_sources(weight_files: dict[str, Path], manifest: SavedManifest) -> None:
    """Every weight source the model was built from must hash as it did when the model was saved."""
    for uri, p in weight_files.items():
        record = manifest.weights.get(uri)
        if record and sha256_path(p) != record.sha256:
            raise CheckpointError(f"weights {uri} ({p}) changed since this model was saved: sha256 "
                                  f"{sha256_path(p)[:12]}... != recorded {record.sha256[:12]}...; restore the original "
                                  f"file or pass verify=False to accept the difference.")


def package_path(path: str) -> Path:
    """``mmhub:REL`` -> REL inside the installed mmhub package (never above it); anything else -> the path, ``~``
    expanded."""
    if path.startswith("mmhub:"):
        no_climbing(path, path[len("mmhub:"):])
        return PACKAGE_ROOT / path[len("mmhub:"):]
    return Path(path).expanduser()


MAX_BASE_DEPTH = 8  # layered saves on layered saves: deeper chains (or a folder naming itself) are refused


def init_from_model(model: Any, source: str, sandbox: Any = None, _depth: int = 0) -> None:
    """Load a saved model's weights (and its LoRA adapters) into the matching slots of `model` (spec ``init_from``).

    Every tensor of the source must find a parameter of the same shape (the new spec may add slots,
    not drop or reshape them); slots the source lacks keep their fresh weights. A source saved on top of a shipped
    folder (its manifest's ``init_from``) brings that folder's weights first, then its own."""
    from mmhub.adapters import inject_adapter  # adapters pull in peft; only init_from needs them

    try:
        folder = package_path(source)
        if sandbox is not None and not source.startswith("mmhub:"):  # mmhub: paths stay in the package already
            sandbox.check(f"init_from: {source}", folder)
        _check_folder(folder)
    except (CheckpointError, WeightsNotFoundError) as exc:
        raise CheckpointError(f"init_from: {exc}") from None
    _, manifest = read_manifest(folder)
    if manifest.init_from is not None:  # a layered save: its base folder's weights first, then its own
        if _depth >= MAX_BASE_DEPTH:
            raise CheckpointError(f"init_from {folder}: more than {MAX_BASE_DEPTH} folders saved on top of each other "
                                  f"(or one naming itself as its base); save the model self-contained (full=True)")
        init_from_model(model, manifest.init_from.source, sandbox, _depth + 1)
    for slot, lora in manifest.adapters.items():
        inject_adapter(model, slot, lora)
    state = expand_state(load_file(str(folder / WEIGHTS_FILE)))
    own = model.state_dict()
    unknown = [k for k in state if k not in own]
    if unknown:
        raise CheckpointError(f"init_from {folder}: {len(unknown)} of its tensors have no place in this spec's model, "
                              f"e.g. {unknown[:3]}; the spec must keep the source model's components "
                              f"(it may add new ones)")
    wrong = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if v.shape != own[k].shape]
    if wrong:
        raise CheckpointError(f"init_from {folder}: {len(wrong)} tensor(s) differ in shape (source vs this spec), e.g. "
                              f"{wrong[:3]}; keep the source model's component settings")
    model.load_state_dict(state, strict=False)
    for slot in manifest.trained:
        if slot not in model.spec.trained:
            model.spec.trained.append(slot)
