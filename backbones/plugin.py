"""Registers mmhub's built-in backbones (through the same hook a third-party plugin uses)."""

from mmhub.backbones.hf_causal_lm import HFCausalLM
from mmhub.hookspecs import hookimpl


@hookimpl
def register_backbones(register):
    register(HFCausalLM)
