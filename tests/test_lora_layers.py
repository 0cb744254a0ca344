"""LoRA on chosen layers only (``lora: {layers: [...]}``): the same modules as peft's ``layers_to_transform``, kept
through save and load, and clear errors for layers that are not there."""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError

import mmhub
from mmhub.adapters import inject_adapter, named_lora_layers
from mmhub.errors import MMHubError
from mmhub.regimes import layer_index, trainable_count
from mmhub.spec import LoraRegime, LoraSpec

from conftest import TINY_SPEC


def _model():
    spec = copy.deepcopy(TINY_SPEC)
    spec["seed"] = 0
    return mmhub.build(spec)


def test_layer_index_is_the_first_number_in_the_path() -> None:
    assert layer_index("model.layers.3.self_attn.q_proj") == 3
    assert layer_index("blocks.12.0.conv_pw") == 12
    assert layer_index("lm_head") is None
    assert layer_index("model.layers3.q_proj") is None


def test_layers_adapt_the_modules_peft_layers_to_transform_adapts() -> None:
    from peft import LoraConfig, inject_adapter_in_model

    model = _model()
    n_layers = model.backbone.model.config.num_hidden_layers
    assert n_layers >= 2
    keep = [n_layers - 1]
    lora = LoraSpec(r=4, target_modules=["q_proj", "v_proj", "down_proj"], layers=keep)
    want = trainable_count(model.backbone, LoraRegime(lora=lora))
    every = trainable_count(model.backbone, LoraRegime(lora=lora.model_copy(update={"layers": None})))
    assert 0 < want < every and want * n_layers == every

    fresh = _model().backbone.model
    peft_cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=keep,
                          layers_pattern="layers")
    injected = inject_adapter_in_model(peft_cfg, fresh)
    peft_names = {n for n, m in injected.named_modules() if hasattr(m, "lora_A")}

    inject_adapter(model, "backbone", lora)
    ours = set(named_lora_layers(model, "backbone"))
    assert ours == peft_names and {layer_index(n) for n in ours} == set(keep)
    assert sum(p.numel() for n, p in model.backbone.named_parameters() if "lora_" in n) == want


def test_an_adapter_on_some_layers_survives_save_and_load(tmp_path, images) -> None:
    model = _model()
    inject_adapter(model, "backbone", LoraSpec(r=2, alpha=4, target_modules="all-linear", layers=[0]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.backbone.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.save_pretrained(tmp_path / "m")
    back = mmhub.load(tmp_path / "m")
    assert back.spec.adapters["backbone"].layers == [0]
    assert set(named_lora_layers(back, "backbone")) == set(named_lora_layers(model, "backbone"))
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        want = model.eval().backbone.model(input_ids=ids).logits
        got = back.eval().backbone.model(input_ids=ids).logits
    assert torch.allclose(want, got, atol=1e-6)
    plain = _model().eval()
    with torch.no_grad():
        assert not torch.allclose(plain.backbone.model(input_ids=ids).logits, got, atol=1e-4)


def test_a_layer_that_is_not_there_is_named_with_the_layers_there_are() -> None:
    model = _model()
    n_layers = model.backbone.model.config.num_hidden_layers
    with pytest.raises(MMHubError) as err:
        inject_adapter(model, "backbone", LoraSpec(r=2, layers=[0, n_layers + 5]))
    msg = str(err.value)
    assert f"layers [{n_layers + 5}]" in msg and f"layers 0..{n_layers - 1}" in msg and "backbone" in msg
    assert not named_lora_layers(model, "backbone")  # nothing injected


@pytest.mark.parametrize(("layers", "says"), [([], "empty"), ([-1, 2], "negative")])
def test_bad_layer_lists_are_spec_errors(layers, says) -> None:
    with pytest.raises(ValidationError, match=says):
        LoraSpec(layers=layers)


def test_plans_show_the_layers() -> None:
    from mmhub.regimes import lora_label

    assert lora_label(LoraSpec(r=8)) == "lora(r=8)"
    assert lora_label(LoraSpec(r=16, layers=[*range(15)])) == "lora(r=16, layers=0-14)"
    assert lora_label(LoraSpec(r=4, layers=[7, 0, 1, 2, 5])) == "lora(r=4, layers=0-2,5,7)"
