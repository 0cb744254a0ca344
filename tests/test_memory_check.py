"""Building refuses, before allocating, a spec whose parameters cannot fit in the memory available."""

from __future__ import annotations

import copy

import pytest

import mmhub.assembly as assembly
from mmhub import build
from mmhub.errors import SpecError
from mmhub.registry import get_registry
from mmhub.validation import plan_source

from conftest import TINY_LLAMA

LLAMA_70B = {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
             "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 4096}


def _spec(config: dict, **backbone) -> dict:
    return {"name": "mem", "backbone": {"type": "hf_causal_lm", "config": config, "tokenizer": "byte", **backbone},
            "template": "chatml"}


def test_the_estimate_is_the_built_backbones_parameter_bytes() -> None:
    for dtype, per in (("float32", 4), ("bfloat16", 2)):
        plan = plan_source(_spec(copy.deepcopy(TINY_LLAMA), dtype=dtype), get_registry())
        estimate = plan.backbone.info.cls.memory_estimate(plan.backbone.config, plan.ctx)
        model = build(_spec(copy.deepcopy(TINY_LLAMA), dtype=dtype))
        assert estimate == per * sum(p.numel() for p in model.backbone.parameters())


def test_a_70b_config_is_refused_with_the_numbers_before_anything_is_allocated(monkeypatch) -> None:
    monkeypatch.setattr(assembly, "available_memory", lambda: 16 * 2**30)
    with pytest.raises(SpecError, match=r"backbone: building this spec needs about 257\.0 GiB .* but this machine has "
                                        r"16\.0 GiB of memory available.*bfloat16"):
        build(_spec(LLAMA_70B))
    with pytest.raises(SpecError, match=r"needs about 128\.5 GiB"):
        build(_spec(LLAMA_70B, dtype="bfloat16"))


def test_a_small_spec_builds_and_the_check_can_be_turned_off(monkeypatch) -> None:
    monkeypatch.setattr(assembly, "available_memory", lambda: 1024)
    with pytest.raises(SpecError, match="1024|0.0 GiB of memory available"):
        build(_spec(copy.deepcopy(TINY_LLAMA)))
    monkeypatch.setenv("MMHUB_SKIP_MEMORY_CHECK", "1")
    assert build(_spec(copy.deepcopy(TINY_LLAMA))).backbone is not None
    monkeypatch.delenv("MMHUB_SKIP_MEMORY_CHECK")
    monkeypatch.setattr(assembly, "available_memory", lambda: None)  # unknown: no check
    assert build(_spec(copy.deepcopy(TINY_LLAMA))).backbone is not None
