"""Leftovers of interrupted saves in a run folder: removed (or put back) when a run starts or resumes.

An atomic save (`mmhub.atomic.atomic_dir`) writes ``.NAME.tmp-*`` beside ``NAME`` and
renames it into place; replacing an existing ``NAME`` moves it to ``.NAME.old-*`` first.
A kill mid-save leaves those behind. `clean_stale` looks in the run folder, its stage folders
and their ``checkpoints/`` and, for each leftover last changed before this process started
(a newer one belongs to a live writer):

* ``.NAME.tmp-*``: an unfinished write, deleted;
* ``.NAME.old-*`` while ``NAME`` exists: the copy that was being replaced, deleted;
* ``.NAME.old-*`` while ``NAME`` is missing: the kill came between the two renames, so it is
  the only complete copy: renamed back to ``NAME``;
* ``.run_spec.json.*`` / ``.run_settings.json.*`` files in the run folder: unfinished writes of
  `mmhub.atomic.write_text_atomic`, deleted.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil  # an accelerate dependency, so always there when training

LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-[A-Za-z0-9_]+$")
TEXT_LEFTOVER = re.compile(r"^\.run_(spec|settings)\.json\.[A-Za-z0-9_]+$")


@dataclass
class Cleaned:
    """What `clean_stale` did: folders deleted, folders renamed back (leftover -> restored name)."""

    removed: list[Path] = field(default_factory=list)
    restored: list[tuple[Path, Path]] = field(default_factory=list)

    def __str__(self) -> str:
        parts = [f"removed {len(self.removed)} leftover(s) of interrupted saves"]
        parts += [f"put back {new.name} from {old.name} (a save was killed while replacing it)"
                  for old, new in self.restored]
        return "; ".join(parts)


def process_start() -> float:
    """When this process started (seconds since the epoch)."""
    return psutil.Process(os.getpid()).create_time()


def clean_stale(run_dir: Path, before: float | None = None) -> Cleaned:
    """Remove (or put back) the leftovers of interrupted saves last changed before `before` (default: this
    process's start) in `run_dir`, its stage folders and their checkpoints (see the module docstring)."""
    run_dir = Path(run_dir)
    cutoff = process_start() if before is None else before
    done = Cleaned()
    if not run_dir.is_dir():
        return done
    folders = [run_dir] + [d for d in run_dir.iterdir() if d.is_dir() and not d.name.startswith(".")]
    folders += [d / "checkpoints" for d in folders[1:] if (d / "checkpoints").is_dir()]
    for entry in sorted(run_dir.iterdir()):
        if TEXT_LEFTOVER.match(entry.name) and entry.is_file() and not entry.is_symlink() and _mtime(entry) < cutoff:
            entry.unlink(missing_ok=True)
            done.removed.append(entry)
    for folder in folders:
        for entry in sorted(folder.iterdir()):
            match = LEFTOVER.match(entry.name)
            if match is None or not entry.is_dir() or entry.is_symlink() or _mtime(entry) >= cutoff:
                continue
            target = folder / match["name"]
            if match["kind"] == "old" and not target.exists():
                os.replace(entry, target)
                done.restored.append((entry, target))
            else:
                shutil.rmtree(entry, ignore_errors=True)
                done.removed.append(entry)
    return done


def _mtime(path: Path) -> float:
    """The newest change time of `path` and (a folder) the files directly in it (a live writer touches them)."""
    try:
        inside = list(path.iterdir()) if path.is_dir() else []
        times = [path.stat().st_mtime] + [f.stat().st_mtime for f in inside]
    except OSError:
        return time.time()  # vanished or unreadable meanwhile: leave it alone
    return max(times)
