"""The built-in merge methods, registered through the same ``register_merge_methods`` hook a plugin uses."""

from __future__ import annotations

from mmhub.hookspecs import hookimpl

BUILTIN = ("Linear", "Slerp", "TaskArithmetic", "Ties", "DareLinear", "DareTies", "RegMean")
NAMES = ("linear", "slerp", "task_arithmetic", "ties", "dare_linear", "dare_ties", "regmean")


@hookimpl
def register_merge_methods(register):
    for cls, name in zip(BUILTIN, NAMES, strict=True):
        register(f"mmhub.merge.methods:{cls}", name=name)
