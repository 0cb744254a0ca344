"""Shared fixtures: tiny specs, images, and a registry with throwaway plugins."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from mmhub.registry import get_registry

# `make test` runs two pytest workers on this 2-core CPU: one torch thread each. Two threads per worker
# oversubscribe the cores, and the many tiny ops of these models then spin-wait instead of computing
# (a tiny preset's training step measured ~1.8 s with two threads under load, a fraction of that with one).
torch.set_num_threads(1)

TINY_LLAMA = {"model_type": "llama", "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 512,
              "initializer_range": 0.5}


# A small LLaVA-1.5-shaped spec whose random model's outputs depend on its inputs (copy it before changing it).
TINY_SPEC: dict[str, Any] = {
    "name": "test-tiny",
    "encoders": {"image": {"type": "open_clip", "arch": None, "embed_dim": 32,
                           "vision_cfg": {"image_size": 32, "patch_size": 8, "layers": 2, "width": 32,
                                          "head_width": 16}}},
    "projectors": {"image": {"type": "mlp", "depth": 2}},
    "backbone": {"type": "hf_causal_lm", "config": TINY_LLAMA, "tokenizer": "byte"},
    "template": "chatml",
    "stages": [{"name": "align", "train": {"projectors": "full"}}],
}


@pytest.fixture
def tiny_spec() -> dict[str, Any]:
    """`TINY_SPEC`, a fresh copy per test."""
    return copy.deepcopy(TINY_SPEC)


@pytest.fixture
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(4)]


@pytest.fixture(scope="session")
def registry():
    return get_registry()


def saved_tiny(folder: Path, seed: int, projector: dict[str, Any] | None = None,
               llm: dict[str, Any] | None = None) -> Path:
    """A tiny model (TINY_SPEC with spec `seed`; `projector` settings and `llm` config keys changed) saved to
    `folder`, as a published folder for merges and loads."""
    import mmhub

    spec = copy.deepcopy(TINY_SPEC)
    spec["seed"] = seed
    spec["projectors"]["image"].update(projector or {})
    spec["backbone"]["config"].update(llm or {})
    mmhub.build(spec).save_pretrained(folder)
    return folder


def lora_model(r: int, seed: int) -> Any:
    """A tiny model (TINY_SPEC, spec seed 0: the same base LLM for every `seed`) whose backbone carries a rank-`r`
    LoRA on q/v with non-zero updates drawn from `seed` (peft starts B at zero), in eval mode (LoRA dropout off)."""
    import mmhub
    from mmhub.adapters import inject_adapter
    from mmhub.spec import LoraSpec

    spec = copy.deepcopy(TINY_SPEC)
    spec["seed"] = 0
    model = mmhub.build(spec)
    inject_adapter(model, "backbone", LoraSpec(r=r, alpha=2 * r, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.backbone.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def easy_vqa_here() -> bool:
    """Whether the easy-VQA dataset is on this machine (`make weights` puts it there)."""
    from mmhub import weights
    from mmhub.data.easy_vqa import SOURCE
    from mmhub.errors import WeightsNotFoundError

    try:
        return weights.resolve(SOURCE).is_dir()
    except WeightsNotFoundError:
        return False


# tests that read easy-VQA skip without it, unless real weights are required (`make test` sets the variable)
need_easy_vqa = pytest.mark.skipif(not easy_vqa_here() and not os.environ.get("MMHUB_REQUIRE_REAL_WEIGHTS"),
                                   reason="easy-VQA is not here; `make weights` (mmhub weights fetch) gets it")
