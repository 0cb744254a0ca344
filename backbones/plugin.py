"""Registers mmhub's built-in backbones and injectors (through the same hooks a third-party plugin uses)."""

from mmhub.backbones.gated_xattn import GatedCrossAttention
from mmhub.backbones.hf_causal_lm import HFCausalLM
from mmhub.backbones.hf_seq2seq_lm import HFSeq2SeqLM
from mmhub.backbones.mllama_xattn import MllamaCrossAttention
from mmhub.backbones.visual_expert import VisualExperts
from mmhub.hookspecs import hookimpl


@hookimpl
def register_backbones(register):
    register(HFCausalLM)
    register(HFSeq2SeqLM)


@hookimpl
def register_injectors(register):
    register(GatedCrossAttention)
    register(VisualExperts)
    register(MllamaCrossAttention)
