"""Every system of the zoo table ships as a preset: each `tiny` builds, trains a step on every modality it
accepts and generates; its distinctive component is really in the graph; each `full` spec is well-formed."""

from __future__ import annotations

import json

import pytest
import torch

from mmhub import build
from mmhub.cli import main as cli_main
from mmhub.errors import SpecError
from mmhub.registry import get_registry
from mmhub.spec import load_spec
from mmhub.testing import sample_item
from mmhub.validation import plan_spec

ZOO = ["flamingo", "blip-2", "llava", "minigpt-4", "mplug-owl", "x-llm", "videochat", "instructblip", "pandagpt",
       "pali-x", "video-llama", "video-chatgpt", "shikra", "dlp", "bubogpt", "chatspot", "qwen-vl", "next-gpt",
       "minigpt-5", "llava-1.5", "minigpt-v2", "cogvlm", "dress", "x-instructblip", "codi-2", "vila"]
LETTER = {"image": "I", "video": "V", "audio": "A", "points": "3D"}
REG = get_registry()


def test_all_26_systems_ship_in_both_sizes() -> None:
    assert len(ZOO) == 26
    for name in ZOO:
        assert f"{name}:tiny" in REG.presets and f"{name}:full" in REG.presets, name
    # tiny presets name no weights: their derived status says so (the full ones: tests/test_full_presets.py)
    for name in ZOO:
        assert REG.presets[f"{name}:tiny"].status == "partial: every slot starts randomly initialised (a test-size " \
            "model)", name


def _batch(model, modalities):
    prompt = " ".join(f"<{m}>" for m in modalities) + "\nWhat is shown?"
    media = {m: [sample_item(m, seed=i)] for i, m in enumerate(modalities)}
    conv = [[{"role": "user", "content": prompt}, {"role": "assistant", "content": "Two shapes."}]]
    return prompt, media, model.batch(conv, [media])


def _distinctive(name: str, model, out) -> None:
    proj = {m: p for m, p in model.projectors.items()}
    if name == "blip-2":
        assert proj["image"].name == "qformer" and proj["image"].config.num_queries == 32
        assert model.plan.tokens_per_item("image") == 32 and model.is_encoder_decoder
    elif name == "flamingo":
        from mmhub.backbones.layers import transformer_blocks

        xattn = model.injectors["xattn"]
        assert xattn.name == "gated_xattn" and len(xattn.layers) >= 1
        blocks = transformer_blocks(model.backbone, model.plan.backbone_facts.num_layers)
        assert all(len(blocks[i]._forward_pre_hooks) == 1 for i in xattn.injected_blocks())
        assert proj["image"].name == "perceiver"
        assert model.plan.tokens_per_item("image") == 1  # one marker, rest in xattn
    elif name == "cogvlm":
        experts = model.injectors["experts"]
        assert experts.name == "visual_expert" and len(experts.experts) == 7 * model.plan.backbone_facts.num_layers
    elif name in ("pali-x",):
        assert model.is_encoder_decoder
    elif name == "instructblip" or name == "x-instructblip":
        assert all(p.name == "qformer" and p.config.instruction_aware for p in proj.values())
    elif name == "dlp":
        assert proj["image"].name == "pformer" and out.aux_loss is not None and torch.isfinite(out.aux_loss)
    elif name == "minigpt-v2":
        enc_tokens = model.plan.encoder_facts["image"].tokens_for("image")
        assert proj["image"].name == "token_merge" and model.plan.tokens_per_item("image") == enc_tokens // 4
    elif name == "qwen-vl":
        assert proj["image"].name == "cross_attn_resampler" and model.plan.tokens_per_item("image") == 16
    elif name in ("next-gpt", "codi-2"):
        assert model.encoders["image"] is model.encoders["video"] is model.encoders["audio"]
        assert model.encoders["image"].name == "imagebind"
    elif name == "video-chatgpt":
        enc = model.encoders["video"]
        assert enc.config.temporal == "video_chatgpt"
    elif name == "llava-1.5":
        assert proj["image"].name == "mlp" and proj["image"].config.depth == 2
    elif name == "mplug-owl":
        assert proj["image"].config.cross_attention_every == 1
    elif name == "x-llm":
        assert model.backbone.model.config.model_type == "glm"
    elif name == "bubogpt":
        assert model.backbone.model.config.model_type == "opt"


@pytest.mark.parametrize("name", ZOO)
def test_tiny_preset_builds_trains_and_generates(name: str) -> None:
    info = REG.presets[f"{name}:tiny"]
    model = build(f"{name}:tiny")
    mods = model.modalities
    assert info.io.split(" -> ")[0] == "+".join([LETTER[m] for m in mods] + ["T"]), info.io
    model.requires_grad_(False)
    model.projectors.requires_grad_(True)
    # Flamingo's gates start at 0: the first gradients reach the gates, not the perceiver
    model.injectors.requires_grad_(True)
    for subset in [[m] for m in mods] + ([mods] if len(mods) > 1 else []):
        prompt, media, b = _batch(model, subset)
        out = model(b["input_ids"], b["attention_mask"], b["labels"], b["media"])
        assert torch.isfinite(out.loss), (name, subset)
        signals = len(model.signal_tokens) if model.signal_tokens is not None else 0  # the output side's extra columns
        assert out.logits.shape[-1] == model.plan.backbone_facts.vocab_size + signals
        assert out.num_target_tokens > 0
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads), f"{name}: no gradient reached the trainable parts"
    _distinctive(name, model, out)
    texts = model.generate([prompt], [media], max_new_tokens=3)
    assert len(texts) == 1 and isinstance(texts[0].text, str)


@pytest.mark.parametrize("name", ZOO)
def test_full_preset_is_well_formed_and_asks_only_for_weights(name: str) -> None:
    with pytest.raises(SpecError) as exc:  # no published weights are on this machine
        plan_spec(load_spec(f"{name}:full"), REG, source=f"{name}:full")
    for p in exc.value.problems:
        assert "local Hugging Face cache" in p.message or "does not exist" in p.message, str(p)


def test_presets_cli_lists_status_and_components(capsys) -> None:
    assert cli_main(["presets", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len([r for r in rows if r["name"].endswith(":tiny")]) == 26
    by = {r["name"]: r for r in rows}
    for r in rows:
        assert {"name", "io", "components", "status"} <= set(r)
    assert by["next-gpt:tiny"]["components"]["encoders.video"] == "=image"
    assert by["flamingo:tiny"]["components"]["injectors.xattn"] == "gated_xattn"
    assert by["blip-2:full"]["components"]["backbone"] == "hf_seq2seq_lm"
    # the status is derived from the spec: BLIP-2's full preset starts its Q-Former random
    assert by["blip-2:full"]["status"].startswith("partial: ")
    assert "projectors.image: qformer starts randomly initialised" in by["blip-2:full"]["status"]
    assert all(r["status"] == "complete" or r["status"].startswith("partial: ") for r in rows)


@pytest.mark.parametrize("name", ZOO)
def test_assemble_cli_works_for_every_tiny_preset(name: str, capsys) -> None:
    assert cli_main(["assemble", f"{name}:tiny", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["components"] and data["stages"] and data["total_params"] > 0, data.keys()


def test_components_table_is_current() -> None:
    from pathlib import Path

    from mmhub.cli import components_table

    page = (Path(__file__).resolve().parents[1] / "docs" / "components.md").read_text()
    assert components_table(REG, builtin_only=True) in page, \
        "docs/components.md's table is stale: paste `mmhub plugins --markdown` (built-ins) into it"
    assert "(docs/components.md)" in (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_zoo_table_is_current() -> None:
    from pathlib import Path

    from mmhub.presets.table import zoo_markdown

    page = (Path(__file__).resolve().parents[1] / "docs" / "zoo.md").read_text()
    assert page == zoo_markdown(REG), "docs/zoo.md is stale: run `python -m mmhub.presets.table --write`"
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "(docs/zoo.md)" in readme
