"""Writes that never leave a half-written file or folder under the final name: a temporary sibling, then a rename.

`atomic_dir` yields a temporary folder beside the final one and swaps it in with one rename when the block
succeeds (fsyncing every file first); on any error the temporary folder is removed and the old one is untouched.
`write_text_atomic` does the same for one text file. Model folders, training runs, exports and recipe outputs are
all written through these.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    """The process's umask, read without changing it (``os.umask`` would, briefly, for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _usual_mode(path: Path, mask: int) -> None:
    """Give a file or folder made through `tempfile` (owner-only) the mode a plain ``open``/``mkdir`` gives."""
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; on success it replaces `final` in one rename (with the permissions
    a plain ``mkdir`` and ``open`` would give, not the owner-only ones of a temporary folder)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        mask = _umask()
        _usual_mode(tmp, mask)
        for f in tmp.rglob("*"):
            _usual_mode(f, mask)
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file through a temporary sibling and a rename."""
    write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write a file through a temporary sibling and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    _usual_mode(Path(tmp), _umask())
    os.replace(tmp, path)
