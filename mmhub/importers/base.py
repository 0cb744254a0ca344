"""The importer contract: how a published transformers checkpoint becomes mmhub components plus a weight map.

A family importer (one per transformers ``model_type`` family: LLaVA, BLIP-2, IDEFICS, ...) is an `Importer`
subclass registered through the ``register_importers`` hook. Given a `Checkpoint` (a local transformers folder:
its ``config.json``, side files and safetensors tensors) it returns an `Imported`: an mmhub spec built from mmhub
components and, per submodule of the model that spec builds, the state dict to load into it. The framework
(`mmhub.importers.run`) builds the spec, loads every entry strictly and refuses a checkpoint tensor that no entry
took and the importer did not explicitly `Checkpoint.ignore` — nothing is silently dropped.

Tensors are read through ``safetensors`` only (never pickles); reads are recorded so the unused ones can be named.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import safe_open

from mmhub.errors import CheckpointError, ExportError

JSON_LIMIT = 16 * 1024 * 1024  # bytes: a side file larger than this is not a config
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ImportOptions:
    """What the caller chooses about an import: the chat template (when the folder's cannot be used), the backbone's
    dtype, and whether the checkpoint's own Python (transformers ``auto_map``) may run."""

    template: str | None = None
    dtype: str = "float32"
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise CheckpointError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")


class Checkpoint:
    """A local transformers folder: ``config.json``, its JSON side files and its safetensors tensors (read lazily;
    every read is recorded, so `unused` names what an importer left behind)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).expanduser().resolve()
        if not (self.folder / "config.json").is_file():
            raise CheckpointError(f"{self.folder} is not a transformers model folder (no config.json)")
        config = self.json("config.json")
        if not isinstance(config, dict):
            raise CheckpointError(f"{self.folder / 'config.json'} is not a JSON object")
        self.config: dict[str, Any] = config
        self._handles: dict[str, Any] | None = None
        self._used: set[str] = set()
        self.ignored: dict[str, str] = {}

    @property
    def model_type(self) -> str | None:
        value = self.config.get("model_type")
        return value if isinstance(value, str) else None

    def json(self, name: str) -> Any:
        """The folder's JSON file `name` parsed, or None when it is absent (bounded in size; a broken one is an
        error naming the file)."""
        path = self.folder / name
        if not path.is_file():
            return None
        size = path.stat().st_size
        if size > JSON_LIMIT:
            raise CheckpointError(f"{path} is {size} bytes, over the {JSON_LIMIT}-byte limit for a JSON side file")
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise CheckpointError(f"{path} cannot be read as JSON ({exc})") from None

    def hf_config(self) -> Any:
        """The folder's transformers config (``AutoConfig``, local files only, never the model's own code)."""
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(str(self.folder), local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{self.folder / 'config.json'}: transformers cannot read it ({exc})") from None

    def tokenizer(self) -> Any:
        """The folder's tokenizer (``AutoTokenizer``, local files only)."""
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{self.folder}: no usable tokenizer ({exc})") from None

    def _tensors(self) -> dict[str, Any]:
        if self._handles is None:
            index = self.folder / "model.safetensors.index.json"
            if index.is_file():
                weight_map = (self.json("model.safetensors.index.json") or {}).get("weight_map", {})
                files = sorted({self.folder / f for f in weight_map.values()})
            elif (self.folder / "model.safetensors").is_file():
                files = [self.folder / "model.safetensors"]
            else:
                files = sorted(self.folder.glob("*.safetensors"))
            if not files:
                pickles = sorted(p.name for p in self.folder.glob("*.bin")) + sorted(
                    p.name for p in self.folder.glob("*.pt*"))
                hint = f" (it has {', '.join(pickles[:3])}: pickles, which mmhub never loads)" if pickles else ""
                raise CheckpointError(f"{self.folder} has no *.safetensors weights{hint}; re-save it with "
                                      f"`save_pretrained(folder, safe_serialization=True)`")
            handles: dict[str, Any] = {}
            for f in files:
                if not f.is_file():
                    raise CheckpointError(f"{self.folder}: the index names {f.name}, which is missing")
                try:
                    handle = safe_open(str(f), framework="pt")
                except Exception as exc:  # safetensors raises its own error types for damaged headers
                    raise CheckpointError(f"{f} is not a readable safetensors file ({exc})") from None
                for k in handle.keys():
                    handles[k] = handle
            self._handles = handles
        return self._handles

    def keys(self) -> list[str]:
        """Every tensor name of the checkpoint."""
        return sorted(self._tensors())

    def has(self, prefix: str) -> bool:
        """Whether any tensor name starts with `prefix` (or is exactly it)."""
        return any(k.startswith(prefix) for k in self._tensors())

    def first_prefix(self, *prefixes: str, what: str = "tensors") -> str:
        """The first of `prefixes` under which the checkpoint has tensors (key layouts change between releases)."""
        for prefix in prefixes:
            if self.has(prefix):
                return prefix
        raise CheckpointError(f"{self.folder}: no {what} (looked for tensors under {', '.join(prefixes)})")

    def tensor(self, key: str) -> torch.Tensor:
        """One tensor by its full name (recorded as used)."""
        handles = self._tensors()
        if key not in handles:
            raise CheckpointError(f"{self.folder}: no tensor {key!r} in the checkpoint")
        self._used.add(key)
        return handles[key].get_tensor(key)

    def take(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every tensor under `prefix`, with the prefix removed (recorded as used)."""
        keys = [k for k in self._tensors() if k.startswith(prefix)]
        if not keys:
            raise CheckpointError(f"{self.folder}: no tensors under {prefix!r}")
        return {k[len(prefix):]: self.tensor(k) for k in keys}

    def ignore(self, prefix: str, reason: str) -> None:
        """Tensors under `prefix` that the import drops on purpose (`reason` is reported with the import)."""
        keys = [k for k in self._tensors() if k.startswith(prefix)]
        self._used.update(keys)
        if keys:
            self.ignored[prefix] = f"{len(keys)} tensor(s): {reason}"

    def unused(self) -> list[str]:
        """Tensor names no importer step took or ignored."""
        return sorted(set(self._tensors()) - self._used)


@dataclass
class Imported:
    """An importer's result: the mmhub spec and, per model submodule path (``projectors.image``,
    ``backbone.model``, ...), the state dict it receives; `after_load` runs once the weights are in."""

    spec: dict[str, Any]
    weights: dict[str, dict[str, torch.Tensor]]
    notes: list[str] = field(default_factory=list)
    after_load: Callable[[Any], None] | None = None


class Importer:
    """Base class of a family importer: set `name`, `model_types` and `description`, implement `convert`;
    implement `export` where the mmhub model can be written back as the family's transformers folder."""

    name: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""
    # config.json ``architectures`` values it takes when the folder states no model_type (remote-code folders)
    architectures: ClassVar[tuple[str, ...]] = ()
    # False for a converter that reads only config.json and tensors of a remote-code (auto_map) folder and never
    # imports its Python: such an import runs no checkpoint code, so it needs no trust_remote_code
    runs_checkpoint_code: ClassVar[bool] = True

    def convert(self, ckpt: Checkpoint, options: ImportOptions) -> Imported:
        """The checkpoint as an mmhub spec plus its weight map."""
        raise NotImplementedError(f"{type(self).__name__} does not implement convert()")

    def export(self, model: Any, out: Path) -> Path:
        """Write `model` as this family's transformers folder at `out`; by default the family has no export."""
        raise ExportError(f"the {self.name} importer cannot export: mmhub writes {self.name} models back only where "
                          f"the importer implements export()")

    @classmethod
    def can_export(cls) -> bool:
        return cls.export is not Importer.export


__all__ = ["Checkpoint", "Imported", "Importer", "ImportOptions", "DTYPES"]
