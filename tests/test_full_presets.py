"""Every ``NAME:full`` preset against a fake local Hugging Face cache (tests/helpers/fake_hub.py).

With the published configs and tokenizers in ``HF_HUB_CACHE``, each full preset validates completely: widths meet,
token counts, templates and context budgets hold at the published numbers (pinned below). Presets made of
transformers towers and LLMs also build (and run a forward pass) from shrunk stand-ins with weights. A preset's
status is derived from its spec: the tests pin known partial ones with their reasons and a complete one.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers.fake_hub import build_fake_hub
from safetensors import safe_open

from mmhub import build
from mmhub.errors import SpecError
from mmhub.presets.status import derive_status
from mmhub.registry import PresetInfo, get_registry
from mmhub.spec import load_spec
from mmhub.testing import sample_item
from mmhub.validation import plan_spec

REG = get_registry()
# preset -> (tokens per item of each modality, backbone context length, backbone width): the published numbers
EXPECTED = {
    "blip-2": ({"image": 32}, 512, 2048),
    "bubogpt": ({"image": 32, "audio": 32}, 2048, 2560),
    "chatspot": ({"image": 256}, 2048, 4096),
    "codi-2": ({"image": 256, "video": 256, "audio": 228}, 4096, 4096),
    "cogvlm": ({"image": 256}, 4096, 4096),
    "dlp": ({"image": 32}, 2048, 4096),
    "dress": ({"image": 256}, 4096, 5120),
    "flamingo": ({"image": 1, "video": 1}, 2048, 4096),
    "instructblip": ({"image": 32, "video": 4 * 32}, 2048, 4096),  # video: 4 frames read one by one
    "llava": ({"image": 256}, 2048, 4096),
    "llava-1.5": ({"image": 576}, 4096, 4096),
    "minigpt-4": ({"image": 32}, 2048, 5120),
    "minigpt-5": ({"image": 32}, 2048, 4096),
    "minigpt-v2": ({"image": 256}, 4096, 4096),
    "mplug-owl": ({"image": 64}, 2048, 4096),
    "next-gpt": ({"image": 256, "video": 256, "audio": 228}, 2048, 4096),
    "pali-x": ({"image": 729}, 1024, 4096),
    "pandagpt": ({"image": 1}, 2048, 5120),
    "qwen-vl": ({"image": 256}, 8192, 4096),
    "shikra": ({"image": 256}, 2048, 4096),
    "video-chatgpt": ({"video": 356}, 2048, 4096),
    "video-llama": ({"image": 32, "video": 32, "audio": 8}, 2048, 4096),
    "videochat": ({"video": 32}, 2048, 4096),
    "vila": ({"image": 576}, 4096, 4096),
    "x-instructblip": ({"image": 32, "video": 4 * 32, "audio": 32, "points": 32}, 2048, 4096),
    "x-llm": ({"image": 32, "video": 8 * 32, "audio": 32}, 2048, 4096),
}
REMOTE_CODE = ("qwen-vl", "x-llm")  # their LLMs ship their own modeling code
# made of transformers towers and LLMs (mplug-owl: plus a 768-wide Q-Former): cheap to build from shrunk stand-ins
BUILDS = ("llava", "llava-1.5", "shikra", "chatspot", "vila", "pali-x", "video-chatgpt", "mplug-owl")


def _use(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(root / "hub"))
    monkeypatch.setenv("HOME", str(root / "home"))  # file:~/models/... sources


@pytest.fixture(scope="session")
def fake_hub(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fake_hub")
    build_fake_hub(root)
    return root


@pytest.fixture(scope="session")
def shrunk_hub(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fake_hub_shrunk")
    build_fake_hub(root, shrink=True)
    return root


def test_the_table_covers_every_full_preset() -> None:
    assert set(EXPECTED) == {k.split(":")[0] for k in REG.presets if k.endswith(":full")}
    assert len(EXPECTED) == 26


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_full_preset_validates_against_the_published_configs(name: str, fake_hub: Path, monkeypatch) -> None:
    _use(monkeypatch, fake_hub)
    monkeypatch.setenv("MMHUB_SKIP_MEMORY_CHECK", "1")  # published sizes: checked for structure, not for this machine
    try:
        plan = plan_spec(load_spec(f"{name}:full"), REG, source=f"{name}:full", trust_remote_code=name in REMOTE_CODE)
    except SpecError as exc:
        pytest.fail(f"{name}:full does not validate against the fake cache:\n" + "\n".join(map(str, exc.problems)))
    tokens, context, width = EXPECTED[name]
    assert {m: plan.tokens_per_item(m) for m in plan.encoders} == tokens
    assert (plan.backbone_facts.context_length, plan.backbone_facts.hidden_size) == (context, width)
    assert plan.template is not None


@pytest.mark.parametrize("name", REMOTE_CODE)
def test_remote_code_presets_need_the_callers_flag(name: str, fake_hub: Path, monkeypatch) -> None:
    _use(monkeypatch, fake_hub)
    with pytest.raises(SpecError) as exc:
        plan_spec(load_spec(f"{name}:full"), REG, source=f"{name}:full")
    assert any("trust_remote_code" in p.message or "remote code" in p.message for p in exc.value.problems), \
        "\n".join(map(str, exc.value.problems))


def test_full_preset_fails_without_the_cache(tmp_path: Path, monkeypatch) -> None:
    """The same check is not vacuous: with an empty cache the weights are named as missing."""
    _use(monkeypatch, tmp_path)
    with pytest.raises(SpecError) as exc:
        plan_spec(load_spec("llava-1.5:full"), REG, source="llava-1.5:full")
    paths = {p.path for p in exc.value.problems}
    assert {"encoders.image", "backbone"} <= paths, paths


def _embedding(folder: Path) -> torch.Tensor:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        key = next(k for k in f.keys() if k.endswith(("embed_tokens.weight", "shared.weight")))
        return f.get_tensor(key)


@pytest.mark.parametrize("name", BUILDS)
def test_full_preset_builds_from_shrunk_stand_ins(name: str, shrunk_hub: Path, monkeypatch) -> None:
    _use(monkeypatch, shrunk_hub)
    model = build(f"{name}:full")
    mod = model.modalities[0]
    media = {mod: [sample_item(mod, seed=0)]}
    conv = [[{"role": "user", "content": f"<{mod}>\nWhat is shown?"}, {"role": "assistant", "content": "Shapes."}]]
    b = model.batch(conv, [media])
    with torch.no_grad():
        out = model(b["input_ids"], b["attention_mask"], b["labels"], b["media"])
    assert torch.isfinite(out.loss), name
    # the LLM's weights are the snapshot's, not a random init
    source = REG.presets[f"{name}:full"].spec["backbone"]["source"]
    folder = Path(os.path.expanduser(source[len("file:"):])) if source.startswith("file:") else None
    if folder is None:
        repo = source[len("hf:"):]
        cache = shrunk_hub / "hub" / f"models--{repo.replace('/', '--')}"
        folder = cache / "snapshots" / (cache / "refs" / "main").read_text()
    loaded = model.backbone.model.get_input_embeddings().weight
    assert torch.equal(loaded.float(), _embedding(folder).to(loaded.dtype).float()), name


# ---- derived status ---------------------------------------------------------------------------------------------
def test_blip2_full_is_partial_because_its_qformer_starts_random() -> None:
    status = REG.presets["blip-2:full"].status
    assert status.startswith("partial: ")
    assert "projectors.image: qformer starts randomly initialised (stages 'qformer_pretrain', 'pretrain' train " \
           "it, no published " \
           "weights)" in status
    assert "encoders.image" not in status and "backbone" not in status  # EVA-CLIP and Flan-T5 load published weights


def test_declared_and_derived_gaps_both_show() -> None:
    flamingo = REG.presets["flamingo:full"].status
    assert "injectors.xattn: gated_xattn starts randomly initialised" in flamingo
    assert "ImageNet-classification NFNet-F6" in flamingo  # declared: a published part stands in for Flamingo's
    spec = {"encoders": {"points": {"type": "pointnet", "pretrained": "file:~/models/pointnet.safetensors"}},
            "backbone": {"type": "hf_causal_lm", "source": "hf:lmsys/vicuna-7b-v1.5"}}
    assert derive_status(PresetInfo("t", "full", spec, "test"), REG) == \
        "partial: encoders.points: pointnet reads file:~/models/pointnet.safetensors, which no parity-tested " \
        "importer or converter produces from published weights"
    # ImageBind-huge's and ULIP-2's files are what mmhub.importers.convert_imagebind / convert_ulip_pointbert write
    assert "encoders.image" not in REG.presets["pandagpt:full"].status
    assert "reads file" not in REG.presets["x-instructblip:full"].status


def test_status_is_complete_only_when_every_slot_loads_published_weights() -> None:
    spec = {"encoders": {"image": {"type": "hf_vision", "source": "hf:openai/clip-vit-large-patch14"},
                         "video": {"type": "video", "frames": {"type": "hf_vision", "source": "hf:openai/clip-x"}},
                         "audio": {"type": "whisper", "source": "hf:openai/whisper-large-v2"}},
            "backbone": {"type": "hf_causal_lm", "source": "hf:lmsys/vicuna-7b-v1.5"}}
    assert derive_status(PresetInfo("t", "full", spec, "test"), REG) == "complete"
    spec["backbone"] = {"type": "hf_causal_lm", "config": {"model_type": "llama"}}
    assert derive_status(PresetInfo("t", "full", spec, "test"), REG) == \
        "partial: backbone: hf_causal_lm starts randomly initialised (no stage trains it, no published weights)"
    spec["backbone"] = {"type": "hf_causal_lm", "source": "hf:lmsys/vicuna-7b-v1.5",
                        "rope_scaling": {"type": "dynamic", "factor": 2.0}}  # a setting with a type, not a slot
    assert derive_status(PresetInfo("t", "full", spec, "test"), REG) == "complete"
    spec["encoders"]["video"]["frames"] = {"type": "open_clip", "arch": "ViT-B-32"}
    assert derive_status(PresetInfo("t", "full", spec, "test", missing="stages: no feedback stage"), REG) == \
        "partial: encoders.video.frames: open_clip starts randomly initialised (no stage trains it, no published " \
        "weights); stages: no feedback stage"


def test_published_models_in_the_zoo_table_load_through_an_importer_or_converter() -> None:
    from mmhub.presets.table import converter_exists, importer_for, published_models

    published = published_models()
    found = {name: importer_for(REG, p["model_type"]) for name, p in published.items() if "model_type" in p}
    assert found == {"blip-2": "blip_2", "instructblip": "instructblip", "llava-1.5": "llava", "cogvlm": "cogvlm",
                     "qwen-vl": "qwen_vl", "mplug-owl": "mplug_owl"}
    converters = {name: p["converter"] for name, p in published.items() if "converter" in p}
    assert set(converters) == {"minigpt-4", "video-llama"}
    assert all(converter_exists(ref) for ref in converters.values()), converters
    assert not converter_exists("mmhub.importers.minigpt4:no_such_function")


def test_mmhub_validate_passes_a_full_preset_with_the_cache(fake_hub: Path, monkeypatch, capsys) -> None:
    from mmhub.cli import main as cli_main

    _use(monkeypatch, fake_hub)
    assert cli_main(["validate", "qwen-vl:full", "--trust-remote-code"]) == 0
    out = capsys.readouterr().out
    assert "OK qwen-vl-full" in out and "256 tokens/item" in out and "context 8192" in out, out
