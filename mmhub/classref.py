"""A class named by reference (``"package.module:Class"``), imported the first time it is needed.

Plugins register components by reference so that discovering them costs no imports: the registry
knows each entry's name and kind at once, and the module holding the class (with the torch,
transformers or timm code it pulls in) loads only when a spec, a listing or a build uses it.
A reference that is malformed is refused when it is registered; one whose module or class cannot
be loaded raises `PluginError` on first use, naming the plugin, the reference and the cause.
"""

from __future__ import annotations

import importlib
import re
import threading
from typing import Any

from mmhub.errors import PluginError

_REF = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


class ClassRef:
    """``module:Class`` plus the class once imported; `load` imports it once (thread-safe) and caches it."""

    def __init__(self, ref: str, plugin: str) -> None:
        if not isinstance(ref, str) or not _REF.match(ref.strip()):
            raise PluginError(f"plugin {plugin!r} registered {ref!r}, which is not a class reference: write it as "
                              f"'package.module:ClassName' (for example 'mmhub.projectors.mlp:MLPProjector').")
        self.ref = ref.strip()
        self.plugin = plugin
        self._cls: type | None = None
        self._lock = threading.Lock()

    @property
    def module(self) -> str:
        return self.ref.split(":")[0]

    @property
    def loaded(self) -> bool:
        """Whether the class has been imported already."""
        return self._cls is not None

    def load(self, check: Any = None) -> type:
        """The class, importing its module on the first call; `check(cls)` (raising `PluginError`) runs once."""
        if self._cls is not None:
            return self._cls
        with self._lock:
            if self._cls is None:
                module, _, qualname = self.ref.partition(":")
                try:
                    obj: Any = importlib.import_module(module)
                    for part in qualname.split("."):
                        obj = getattr(obj, part)
                except (Exception, SystemExit) as exc:  # noqa: BLE001 - a broken plugin must not end mmhub
                    raise PluginError(f"plugin {self.plugin!r} registered {self.ref!r}, which could not be loaded: "
                                      f"{type(exc).__name__}: {exc}. Fix the reference in the plugin, or install "
                                      f"what module {module!r} needs.") from exc
                if not isinstance(obj, type):
                    raise PluginError(f"plugin {self.plugin!r} registered {self.ref!r}, which is a "
                                      f"{type(obj).__name__}, not a class; point the reference at the class.")
                if check is not None:
                    check(obj)
                self._cls = obj
        return self._cls

    def __repr__(self) -> str:
        return f"ClassRef({self.ref!r})"

    def __copy__(self) -> ClassRef:
        return self

    def __deepcopy__(self, memo: dict) -> ClassRef:
        """One reference per registered entry: a copied model (a DPO reference, a merged export) shares it (its lock
        cannot be copied, and a second import state would be wrong)."""
        return self
