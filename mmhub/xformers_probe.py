"""Whether xformers' kernels can run here, found out quietly and said once.

xformers wheels carry C++/CUDA extensions built against one torch release (0.0.35: torch 2.10.0+cu128). Beside
another torch, ``import xformers`` still works but the extensions do not load, and xformers logs a six-line
``WARNING[XFORMERS]`` on every process that imports it (diffusers imports it as soon as it is installed).

* `silence_xformers_import_warning` (installed by ``import mmhub``; standard library only) drops exactly that
  warning from the ``xformers`` logger;
* `xformers_status` imports xformers (once), reads whether its extensions loaded and which torch they were built
  for, and logs one line that says so: on CUDA machines a warning naming the fix (``make install XFORMERS=1``
  installs the torch the wheel was built for), elsewhere an info line.

mmhub's attention counts xformers as a backend only when `XformersStatus.usable` (see `mmhub.attention`).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from functools import lru_cache

log = logging.getLogger("mmhub.attention")
FIX = "make install XFORMERS=1"  # the Makefile's pairing of xformers with the torch release its wheel was built for
_WARNING_PREFIX = "WARNING[XFORMERS]"


class _DropXformersLoadWarning(logging.Filter):
    """Drops xformers' extension-load warning (`xformers_status` reports the same fact in one line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_WARNING_PREFIX)


_FILTER = _DropXformersLoadWarning()


def silence_xformers_import_warning() -> None:
    """Install the filter on the ``xformers`` logger (idempotent; imports nothing)."""
    logger = logging.getLogger("xformers")
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)


@dataclass(frozen=True)
class XformersStatus:
    """What this process's xformers can do: installed, its version, whether its C++/CUDA extensions loaded, the
    torch they were built for and the torch running; `reason` says why the kernels are missing (empty if not)."""

    installed: bool
    version: str | None
    kernels: bool
    built_for: str | None
    torch: str
    reason: str

    @property
    def usable(self) -> bool:
        """True when xformers imports with its extensions loaded (its kernels still need CUDA tensors)."""
        return self.installed and self.kernels

    def line(self) -> str:
        """One line for the log: what loaded, or why not and the fix."""
        if not self.installed:
            return f"attention: xformers is not installed; SDPA runs instead ({self.reason})"
        if self.kernels:
            return (f"attention: xformers {self.version} loaded its C++/CUDA kernels (built for torch "
                    f"{self.built_for or 'this torch'}); they run for CUDA tensors")
        built = f"built for torch {self.built_for}" if self.built_for else "built for another torch"
        return (f"attention: xformers {self.version} is installed but its C++/CUDA kernels did not load ({built}; "
                f"this is torch {self.torch}): SDPA runs instead. `{FIX}` installs the torch it was built for")


@lru_cache(maxsize=1)
def xformers_status() -> XformersStatus:
    """Import xformers once (quietly) and report what it can do; logs `XformersStatus.line` once."""
    import torch

    silence_xformers_import_warning()
    if importlib.util.find_spec("xformers") is None:
        status = XformersStatus(False, None, False, None, torch.__version__, "no xformers package here")
    else:
        try:
            import xformers
            import xformers.ops  # noqa: F401
        except Exception as exc:  # a build that fails outright at import
            status = XformersStatus(True, None, False, None, torch.__version__,
                                    f"import xformers failed: {type(exc).__name__}: {exc}".splitlines()[0])
        else:
            status = _loaded_status(xformers, torch.__version__)
    cuda = torch.cuda.is_available()
    (log.warning if cuda and status.installed and not status.kernels else log.info)(status.line())
    return status


def _loaded_status(xformers: object, torch_version: str) -> XformersStatus:
    """The status of an imported xformers, from its own record of the extension load."""
    cpp = getattr(xformers, "_cpp_lib", None)
    error = getattr(cpp, "_cpp_library_load_exception", None)
    info = getattr(cpp, "_build_metadata", None) or getattr(error, "build_info", None)
    built_for = getattr(info, "torch_version", None) if info is not None else None
    kernels = bool(getattr(xformers, "_has_cpp_library", False))
    reason = "" if kernels else (str(error).splitlines()[0] if error is not None else "no C++/CUDA extensions")
    return XformersStatus(True, getattr(xformers, "__version__", None), kernels, built_for, torch_version, reason)
