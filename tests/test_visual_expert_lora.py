"""CogVLM's visual experts under LoRA: the backbone's (text) adapter stays off the media positions, where the experts
compute; the experts get an adapter of their own only when a stage gives the injector one; merging changes nothing.

Every position of the probe sequence is declared media (or text), so each output depends on the weights of one
path only: a text adapter must leave the all-media outputs exactly as they were, an expert adapter the all-text ones.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from mmhub import build
from mmhub.adapters import merge_adapters
from mmhub.interfaces import InjectionContext
from mmhub.spec import StageSpec
from mmhub.train.trainable import apply_stage

from conftest import TINY_LLAMA

LORA = {"lora": {"r": 4, "alpha": 8, "target_modules": "all-linear"}}


def _model(tiny_spec: dict, train: dict[str, Any]) -> Any:
    spec = copy.deepcopy(tiny_spec)
    spec["injectors"] = {"experts": {"type": "visual_expert"}}
    torch.manual_seed(0)
    model = build(spec).eval()
    apply_stage(model, StageSpec(name="s", train=train))
    return model


def _logits(model: Any, media: bool) -> torch.Tensor:
    """Backbone logits for fixed embeddings whose positions are all media (True) or all text (False)."""
    embeds = torch.randn(2, 7, TINY_LLAMA["hidden_size"], generator=torch.Generator().manual_seed(1))
    inj = model.injectors["experts"]
    inj.context = InjectionContext({}, {}, {}, torch.full((2, 7), media))
    try:
        with torch.no_grad():
            return model.backbone.model(inputs_embeds=embeds).logits
    finally:
        inj.context = None


def _wake(module: torch.nn.Module) -> int:
    """Make every LoRA B matrix non-zero (peft starts them at zero, a no-op); returns how many there are."""
    g = torch.Generator().manual_seed(2)
    bs = [p for n, p in module.named_parameters() if "lora_B" in n]
    with torch.no_grad():
        for p in bs:
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return len(bs)


def test_text_lora_leaves_media_positions_to_the_experts(tiny_spec: dict) -> None:
    model = _model(tiny_spec, {"injectors": "full", "backbone": LORA})
    media0, text0 = _logits(model, True), _logits(model, False)
    assert _wake(model.backbone) == 7 * TINY_LLAMA["num_hidden_layers"]
    assert not any("lora_" in n for n, _ in model.injectors.named_parameters())  # the experts got no adapter
    text1 = _logits(model, False)
    assert (text1 - text0).abs().max() > 1e-2  # the adapter is live on the text path
    torch.testing.assert_close(_logits(model, True), media0, rtol=0, atol=1e-6)  # and absent on the media path
    # merging the text adapter into the LM's weights leaves both paths as they were with the adapter
    merge_adapters(model)
    torch.testing.assert_close(_logits(model, False), text1, rtol=1e-4, atol=1e-4)  # float32 merge rounding
    torch.testing.assert_close(_logits(model, True), media0, rtol=0, atol=1e-6)


def test_expert_lora_changes_media_positions_only(tiny_spec: dict) -> None:
    model = _model(tiny_spec, {"injectors": LORA})
    media0, text0 = _logits(model, True), _logits(model, False)
    assert _wake(model.injectors) == 7 * TINY_LLAMA["num_hidden_layers"]
    assert not any("lora_" in n for n, _ in model.backbone.named_parameters())
    media1 = _logits(model, True)
    assert (media1 - media0).abs().max() > 1e-2  # the experts' own adapter acts where the experts compute
    torch.testing.assert_close(_logits(model, False), text0, rtol=0, atol=1e-6)
    merge_adapters(model)
    torch.testing.assert_close(_logits(model, True), media1, rtol=1e-4, atol=1e-4)  # float32 merge rounding
