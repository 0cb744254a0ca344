"""Building refuses, before allocating, a spec whose parameters cannot fit in the memory available."""

from __future__ import annotations

import copy

import pytest

import mmhub.memory_check as memory_check
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
        buffers = sum(b.numel() * b.element_size() for b in model.backbone.buffers())  # rotary frequencies
        assert estimate == per * sum(p.numel() for p in model.backbone.parameters()) + buffers


def test_a_70b_config_is_refused_with_the_numbers_before_anything_is_allocated(monkeypatch) -> None:
    monkeypatch.setattr(memory_check, "available_memory", lambda: 16 * 2**30)
    with pytest.raises(SpecError, match=r"backbone: building this spec needs about 257\.0 GiB .* but this machine has "
                                        r"16\.0 GiB of memory available.*bfloat16"):
        build(_spec(LLAMA_70B))
    with pytest.raises(SpecError, match=r"needs about 128\.5 GiB"):
        build(_spec(LLAMA_70B, dtype="bfloat16"))


def test_a_small_spec_builds_and_the_check_can_be_turned_off(monkeypatch) -> None:
    monkeypatch.setattr(memory_check, "available_memory", lambda: 1024)
    with pytest.raises(SpecError, match="1024|0.0 GiB of memory available"):
        build(_spec(copy.deepcopy(TINY_LLAMA)))
    monkeypatch.setenv("MMHUB_SKIP_MEMORY_CHECK", "1")
    assert build(_spec(copy.deepcopy(TINY_LLAMA))).backbone is not None
    monkeypatch.delenv("MMHUB_SKIP_MEMORY_CHECK")
    monkeypatch.setattr(memory_check, "available_memory", lambda: None)  # unknown: no check
    assert build(_spec(copy.deepcopy(TINY_LLAMA))).backbone is not None


def test_validation_refuses_an_encoder_too_big_to_fit_with_the_numbers(monkeypatch, tiny_spec) -> None:
    """Any component is sized (built on the meta device), not only transformers backbones, and the refusal comes
    from validation (`mmhub validate`), before a build is attempted."""
    from mmhub.component import Component

    monkeypatch.setattr(memory_check, "available_memory", lambda: 2 * 2**30)
    spec = copy.deepcopy(tiny_spec)
    # 24 blocks of 12 * 4096^2 weights: 4.8 G parameters, 18 GiB in float32
    spec["encoders"]["image"]["vision_cfg"].update({"width": 4096, "layers": 24, "head_width": 64})
    plan = plan_source(copy.deepcopy(tiny_spec), get_registry())
    enc = plan.encoders["image"]
    assert enc.info.cls.memory_estimate.__func__ is Component.memory_estimate.__func__  # the generic estimate
    with pytest.raises(SpecError, match=r"encoders\.image: building this spec needs about 18\.0 GiB .*open_clip: "
                                        r"18\.0 GiB.* 2\.0 GiB of memory available"):
        plan_source(spec, get_registry())


def test_an_estimate_that_needs_weight_files_is_unknown_and_reads_nothing(tmp_path) -> None:
    """The meta-device probe refuses a constructor's weight file: no estimate (None), and the file is never read."""
    from mmhub.component import BuildContext
    from projectors.mlp import MLPProjector

    asked: list[str] = []

    class Reads(MLPProjector):
        """An MLP projector that reads a weight file while constructing."""

        def __init__(self, config, ctx) -> None:
            ctx.weights("hf:org/model")
            super().__init__(config, ctx)

    config = MLPProjector.Config(in_dim=8, out_dim=16)
    ctx = BuildContext(resolve=lambda uri: asked.append(uri) or tmp_path)
    assert MLPProjector.memory_estimate(config, ctx) == 4 * (8 * 16 + 16 + 16 * 16 + 16)
    assert Reads.memory_estimate(config, ctx) is None
    assert asked == [] and ctx.weight_files == {}
