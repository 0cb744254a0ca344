"""Error types of mmhub: every error names the problem, where it is, and the fix.

A `Problem` is one finding (spec path + message + fix); `SpecError` carries all
problems found in a spec at once, so `mmhub validate` can report every one of them.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


class MMHubError(Exception):
    """Base class for all errors raised by mmhub."""


def close_matches(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Return up to `n` candidates that look like `name` (for "did you mean" hints)."""
    return difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.5)


class UnknownComponentError(MMHubError, KeyError):
    """A registry lookup for a name that is not registered."""

    def __init__(self, kind: str, name: str, registered: Sequence[str], failed: Sequence[Any] = ()):
        """`failed`: the plugins that did not load (objects with ``name``, ``dist``, ``error``); it may be in one."""
        self.kind, self.name, self.registered = kind, name, list(registered)
        hint = close_matches(name, registered)
        parts = [f"no {kind} named {name!r} is registered."]
        if hint:
            parts.append(f"Did you mean {', '.join(repr(h) for h in hint)}?")
        plural = f"{kind[:-1]}ies" if kind.endswith("y") else f"{kind}s"
        parts.append(f"Registered {plural}: {', '.join(sorted(set(registered))) or '(none)'}.")
        if failed:
            listed = "; ".join(f"{f.name} ({f.dist}): {_short(f.error)}" for f in failed)
            parts.append(f"{len(failed)} plugin problem(s), and {name!r} may be in one of them: {listed}. "
                         f"Fix the plugin (or reinstall it) and check with `mmhub plugins`.")
        else:
            parts.append("Install the plugin that provides it, or run `mmhub plugins` to see what loaded.")
        super().__init__(" ".join(parts))

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return self.args[0]


def _short(text: str, limit: int = 300) -> str:
    """`text` cut to `limit` characters (a plugin's traceback text can be long)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


class DuplicateComponentError(MMHubError):
    """A name is already registered for that kind (discovery lists the refused entry under ``failed``)."""


class PluginError(MMHubError):
    """A plugin is malformed (for example, it implements a hook that does not exist)."""


@dataclass(frozen=True)
class Problem:
    """One finding about a spec: where (dotted path), what, and how to fix it."""

    path: str
    message: str
    fix: str = ""

    def __str__(self) -> str:
        text = f"{self.path}: {self.message}" if self.path else self.message
        return f"{text} (fix: {self.fix})" if self.fix else text


class SpecError(MMHubError):
    """A spec is invalid; `problems` holds every problem found, not just the first."""

    def __init__(self, problems: Sequence[Problem], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = [f"{len(self.problems)} problem(s){where}:"]
        lines += [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


class WeightsNotFoundError(MMHubError, FileNotFoundError):
    """A weight source could not be resolved to files on this machine."""


class InputError(MMHubError, ValueError):
    """Inputs given to a model do not match what it expects (counts, shapes, modalities)."""


class CheckpointError(MMHubError):
    """A saved model folder is missing, incomplete or inconsistent with its spec."""


class ExportError(MMHubError):
    """A model cannot be written in (or read from) another library's format; the message names the component and why."""
