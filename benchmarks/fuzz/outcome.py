"""Running one fuzz case and saying how it ended: success, a clean refusal, or a failure that must never happen.

Failures: a traceback (any exception that is not an `MMHubError`), a hang (past the case's time limit), a read of a
file outside what the case may read (a watched "canary" path was opened, seen through a Python audit hook, symlinks
resolved), code execution (the case's marker file appeared), or a silent change (a damaged model folder loaded with
verification on, giving different weights).
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

OK, REFUSED = "ok", "refused"
TRACEBACK, HANG, READ_OUTSIDE, CODE_RAN, SILENT_CHANGE = (
    "traceback", "hang", "read_outside", "code_ran", "silent_change")
FAILURES = (TRACEBACK, HANG, READ_OUTSIDE, CODE_RAN, SILENT_CHANGE)


class CaseTimeout(BaseException):
    """Raised inside a case that ran past its limit (a BaseException, so no `except Exception` swallows it)."""


@dataclass
class Outcome:
    """How one case ended, and a line saying why."""

    family: str
    case: str
    result: str
    detail: str = ""
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return self.result in FAILURES


@dataclass
class Watch:
    """Paths no case may open (canaries) and the marker file planted code would write."""

    canaries: set[str] = field(default_factory=set)
    marker: Path | None = None
    opened: list[str] = field(default_factory=list)
    active: bool = False

    def hook(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.active or event != "open" or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        path = os.fsdecode(args[0])
        real = os.path.realpath(path)
        if path in self.canaries or real in self.canaries:
            self.opened.append(real)


_WATCH = Watch()
_HOOKED = False


def watch() -> Watch:
    """The process-wide watch (the audit hook is installed once: audit hooks cannot be removed)."""
    global _HOOKED
    if not _HOOKED:
        sys.addaudithook(_WATCH.hook)
        _HOOKED = True
    return _WATCH


def _alarm(signum: int, frame: Any) -> None:
    raise CaseTimeout()


def run_case(family: str, case: str, fn: Callable[[], Any], timeout_s: float = 30.0,
             changed: Callable[[Any], bool] | None = None) -> Outcome:
    """Run `fn` and classify it; `changed(result)` says whether a successful load differs from the original."""
    from mmhub.errors import MMHubError

    w = watch()
    w.opened.clear()
    from mmhub.weights import _HASH_CACHE

    _HASH_CACHE.clear()  # a cached hash would hide a read the case makes
    if w.marker is not None and w.marker.exists():
        w.marker.unlink()
    start = time.perf_counter()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    w.active = True
    try:
        value = fn()
        result, detail = OK, ""
        if changed is not None and changed(value):
            result, detail = SILENT_CHANGE, "loaded with verification on, and its weights differ from the saved ones"
    except CaseTimeout:
        result, detail = HANG, f"no answer within {timeout_s:.0f} s"
    except MMHubError as exc:
        result, detail = REFUSED, str(exc).splitlines()[0][:300]
    except (Exception, SystemExit, MemoryError) as exc:  # every other ending is a failure
        frames = traceback.extract_tb(exc.__traceback__)
        where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
        result, detail = TRACEBACK, f"{type(exc).__name__} at {where}: {str(exc)[:200]}"
    finally:
        w.active = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    if w.opened:
        result, detail = READ_OUTSIDE, f"opened {sorted(set(w.opened))[:3]}"
    if w.marker is not None and w.marker.exists():
        result, detail = CODE_RAN, f"planted code wrote {w.marker}"
    outcome = Outcome(family, case, result, detail, round(time.perf_counter() - start, 3))
    if os.environ.get("MMHUB_FUZZ_VERBOSE"):
        print(f"{outcome.seconds:7.2f}s {result:<13} {family} {case}: {detail[:160]}", file=sys.stderr, flush=True)
    return outcome
