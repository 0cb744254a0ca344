"""Registers mmhub's built-in input projectors (through the same hook a third-party plugin uses)."""

from mmhub.hookspecs import hookimpl
from mmhub.projectors.linear import LinearProjector
from mmhub.projectors.mlp import MLPProjector


@hookimpl
def register_projectors(register):
    register(LinearProjector)
    register(MLPProjector)
