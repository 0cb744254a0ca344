"""`benchmarks.merge_parts`: which tensors a part names, and the updates it adds (a specialist's folded backbone minus
the base's)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` is a top-level folder, not installed
from benchmarks.merge_parts import backbone_updates, part_filter  # noqa: E402
from mmhub import build  # noqa: E402

NAMES = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight",
         "model.layers.12.self_attn.o_proj.weight", "model.embed_tokens.weight", "model.norm.weight"]


def test_parts_select_tensors_by_name_and_layer_range() -> None:
    def picked(part: str) -> list[str]:
        return [n for n in NAMES if part_filter(part)(n)]

    assert picked("all") == NAMES and picked("none") == []
    assert picked("self_attn") == [NAMES[0], NAMES[2]] and picked("mlp") == [NAMES[1]]
    assert picked("layers:0-1") == NAMES[:2]  # layer 12 is not in 0-1 (no prefix match on "1")
    assert picked("layers:10-29") == [NAMES[2]]


def test_updates_are_the_specialist_backbone_minus_the_base(tiny_spec: dict) -> None:
    base, other = build(tiny_spec), build(tiny_spec)
    with torch.no_grad():
        for p in other.backbone.parameters():
            p.add_(0.25)
    d = backbone_updates(base, other)
    assert d and all(torch.allclose(v, torch.full_like(v, 0.25)) for v in d.values())
