"""Shared fixtures: tiny specs, images, and a registry with throwaway plugins."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
from PIL import Image

from mmhub.registry import get_registry

TINY_LLAMA = {"model_type": "llama", "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 512,
              "initializer_range": 0.5}


@pytest.fixture
def tiny_spec() -> dict[str, Any]:
    """A small LLaVA-1.5-shaped spec whose random model's outputs depend on its inputs."""
    return copy.deepcopy({
        "name": "test-tiny",
        "encoders": {"image": {"type": "open_clip", "arch": None, "embed_dim": 32,
                               "vision_cfg": {"image_size": 32, "patch_size": 8, "layers": 2, "width": 32, "head_width": 16}}},
        "projectors": {"image": {"type": "mlp", "depth": 2}},
        "backbone": {"type": "hf_causal_lm", "config": TINY_LLAMA, "tokenizer": "byte"},
        "template": "chatml",
        "stages": [{"name": "align", "train": {"projectors": "full"}}],
    })


@pytest.fixture
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(4)]


@pytest.fixture(scope="session")
def registry():
    return get_registry()
