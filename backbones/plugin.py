"""Registers mmhub's built-in backbones and injectors (through the same hooks a third-party plugin uses).

Each is registered by reference (``module:Class``) under its name, so discovering the plugin imports none of
their modules (transformers' model code for the injectors); a module loads when a spec uses it.
"""

from mmhub.hookspecs import hookimpl

BACKBONES = (
    ("hf_causal_lm", "mmhub.backbones.hf_causal_lm:HFCausalLM"),
    ("hf_seq2seq_lm", "mmhub.backbones.hf_seq2seq_lm:HFSeq2SeqLM"),
)
INJECTORS = (
    ("gated_xattn", "mmhub.backbones.gated_xattn:GatedCrossAttention"),
    ("visual_expert", "mmhub.backbones.visual_expert:VisualExperts"),
    ("mllama_xattn", "mmhub.backbones.mllama_xattn:MllamaCrossAttention"),
)


@hookimpl
def register_backbones(register):
    for name, ref in BACKBONES:
        register(ref, name=name)


@hookimpl
def register_injectors(register):
    for name, ref in INJECTORS:
        register(ref, name=name)
