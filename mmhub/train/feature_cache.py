"""On-disk cache of a frozen encoder's outputs, so later epochs and stages skip the encoder.

Entries are keyed by the media item's content hash and the encoder's identity: a
hash of its type, settings and every tensor of its state (so an encoder trained
in an earlier stage, or different weights, never reuses stale features). Each
item is one small safetensors file under
``$MMHUB_HOME/features/<encoder-id>/<ab>/<item-hash>.safetensors``, written
atomically (temp file + rename), read back without pickle. Items that are not
files or bytes (PIL images, arrays) are hashed by their pixel bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from mmhub.weights import mmhub_home


def item_key(item: Any) -> str:
    """Content hash of one raw media item (file path, bytes, PIL image, array, tensor)."""
    h = hashlib.sha256()
    if isinstance(item, (str, Path)):
        h.update(Path(item).read_bytes())
    elif isinstance(item, (bytes, bytearray)):
        h.update(item)
    elif isinstance(item, Image.Image):
        h.update(f"{item.mode}{item.size}".encode())
        h.update(item.tobytes())
    elif isinstance(item, torch.Tensor):
        h.update(str((tuple(item.shape), str(item.dtype))).encode())
        h.update(item.detach().cpu().contiguous().numpy().tobytes())
    elif isinstance(item, tuple):  # (array, sample_rate)
        for part in item:
            h.update(item_key(part).encode() if not isinstance(part, (int, float)) else str(part).encode())
    else:
        arr = np.ascontiguousarray(np.asarray(item))
        h.update(str((arr.shape, str(arr.dtype))).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def encoder_identity(encoder: torch.nn.Module, modality: str) -> str:
    """Hash of the encoder's type, settings and state: equal only for encoders that compute the same features."""
    h = hashlib.sha256()
    h.update(f"{type(encoder).__module__}.{type(encoder).__qualname__}:{modality}".encode())
    config = getattr(encoder, "config", None)
    if config is not None and hasattr(config, "model_dump_json"):
        h.update(config.model_dump_json().encode())
    for name, t in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:24]


class FeatureCache:
    """get-or-compute encoder features per item, stored under a folder named by the encoder's identity."""

    def __init__(self, encoder: torch.nn.Module, modality: str, root: Path | None = None,
                 dtype: torch.dtype = torch.float16):
        self.modality = modality
        self.identity = encoder_identity(encoder, modality)
        self.folder = (root or mmhub_home() / "features") / self.identity
        self.folder.mkdir(parents=True, exist_ok=True)
        self.dtype = dtype
        self.hits = self.misses = 0
        meta = self.folder / "encoder.json"
        if not meta.exists():
            _write_atomic(meta, json.dumps({"type": type(encoder).__name__, "modality": modality}).encode())

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        return self._path(key).is_file()

    def get(self, keys: Sequence[str], compute: Callable[[list[int]], torch.Tensor]) -> torch.Tensor:
        """Features (N, T, D) for `keys`; `compute(indices)` runs the encoder on the missing items only."""
        found: dict[int, torch.Tensor] = {}
        missing = []
        for i, key in enumerate(keys):
            path = self._path(key)
            if path.is_file():
                try:
                    found[i] = load_file(str(path))["features"]
                    continue
                except Exception:  # a damaged entry is recomputed and rewritten
                    pass
            missing.append(i)
        self.hits += len(found)
        self.misses += len(missing)
        if missing:
            fresh = compute(missing).detach()
            for j, i in enumerate(missing):
                feats = fresh[j].to(self.dtype).contiguous().cpu()
                path = self._path(keys[i])
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
                os.close(fd)
                save_file({"features": feats}, tmp)
                os.replace(tmp, path)
                found[i] = feats
        return torch.stack([found[i] for i in range(len(keys))]).float()


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)
