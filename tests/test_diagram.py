"""Pictures of assembled models (`mmhub.diagram`, `mmhub assemble --diagram`): the facts drawn and the PNG itself."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmhub.diagram import REGIME_COLOURS, draw_diagram, model_facts
from mmhub.errors import MMHubError


def _facts(name: str) -> dict:
    from mmhub.assembly import build

    return model_facts(build(name))


def _pixels(path: Path, colour: str) -> int:
    rgb = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    want = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(rgb.astype(int) - want).sum(1) <= 3).sum())


@pytest.fixture(scope="module")
def next_gpt() -> dict:
    return _facts("next-gpt:tiny")


def test_facts_follow_the_model(next_gpt: dict) -> None:
    ins = {i["modality"]: i for i in next_gpt["inputs"]}
    assert set(ins) == {"image", "video", "audio"}
    assert {i["encoder"] for i in ins.values()} == {"encoders.image"}  # one ImageBind encoder for all three
    assert ins["image"]["item"] == "image 64x64" and ins["image"]["llm_dim"] == 64
    assert [o["modality"] for o in next_gpt["outputs"]] == ["image", "video", "audio"]
    assert all(o["generator"] == f"generators.{o['modality']}" and o["signal_tokens"] > 0 for o in next_gpt["outputs"])
    flamingo = _facts("flamingo:tiny")
    assert flamingo["injectors"] == ["injectors.xattn"]
    img = next(i for i in flamingo["inputs"] if i["modality"] == "image")
    assert img["encoder_tokens"] != img["tokens"]  # the perceiver resamples what the encoder emits


def test_one_panel_per_stage_coloured_by_what_it_trains(next_gpt: dict, tmp_path: Path) -> None:
    both = draw_diagram(next_gpt, tmp_path / "both.png")
    first = draw_diagram(next_gpt, tmp_path / "pretrain.png", stage="pretrain")
    second = draw_diagram(next_gpt, tmp_path / "instruct.png", stage="instruct")
    assert Image.open(both).height > 1.6 * Image.open(first).height
    # pretrain trains the projectors only; instruct adds LoRA on the backbone: the LoRA colour fills its box
    assert _pixels(first, REGIME_COLOURS["lora"]) < 2000 < _pixels(second, REGIME_COLOURS["lora"])
    assert _pixels(first, REGIME_COLOURS["full"]) > 5000
    with pytest.raises(MMHubError, match="no such stage \\(stages: pretrain, instruct\\)"):
        draw_diagram(next_gpt, tmp_path / "x.png", stage="finetune")


def test_assemble_cli_writes_the_diagram(tmp_path: Path) -> None:
    out = tmp_path / "d.png"
    r = subprocess.run([sys.executable, "-m", "mmhub.cli", "assemble", "easyvqa-tiny", "--diagram", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"diagram written to {out}" in r.stdout and Image.open(out).format == "PNG"


def test_the_caption_names_every_slot_its_tokens_and_what_each_stage_trains(next_gpt: dict) -> None:
    from mmhub.diagram import diagram_caption

    text = diagram_caption(next_gpt)
    for row in next_gpt["components"]:
        assert f"{row['slot']} {row['type']} (" in text, row["slot"]
    img = next(i for i in next_gpt["inputs"] if i["modality"] == "image")
    assert f"{img['item']} -> {img['encoder_tokens']} -> {img['tokens']} tokens -> 64-d" in text
    stages = text.split("Stages: ")[1]
    assert "backbone" not in stages.split(";")[0] and "backbone" in stages.split(";")[1]  # LoRA only in instruct
