"""DRESS's natural-language-feedback (NLF) alignment: critique-and-refinement conversations, the ``nlf`` stage.

DRESS (Chen et al. 2023) trains on multi-turn conversations in which the model's reply is followed by feedback
(a critique of the reply and a suggestion how to refine it) and then the refined reply; the model learns to produce
the refined reply given the feedback (conditional training on the NLF). Here: the ``nlf`` dataset format builds such
conversations (the first reply is context, marked ``train: false``), the processor masks context replies out of the
labels, and a stage with ``objective: nlf`` trains on the refined replies only and refuses samples without feedback.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmhub import MMModel, build
from mmhub.data import Sample
from mmhub.registry import get_registry

REG = get_registry()
IGNORE = -100
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 40)}


def _row(i: int, folder: Path) -> dict:
    name = list(COLOURS)[i % 4]
    wrong = list(COLOURS)[(i + 1) % 4]
    img = Image.new("RGB", (32, 32), COLOURS[name])
    img.putpixel((i % 32, (3 * i) % 32), (i * 7 % 255, 0, 0))
    img.save(folder / f"{i}.png")
    return {"id": f"c{i}", "images": [f"{i}.png"], "prompt": "What colour is it?", "response": f"It is {wrong}.",
            "critique": "The colour named is wrong.", "refinement": "Look at the picture again.",
            "refined": f"It is {name}."}


def _write(folder: Path, n: int) -> Path:
    path = folder / "nlf.jsonl"
    path.write_text("\n".join(json.dumps(_row(i, folder)) for i in range(n)) + "\n")
    return path


def test_nlf_rows_become_critique_then_refinement_conversations(tmp_path: Path) -> None:
    from mmhub.data import load_dataset

    data = load_dataset({"type": "nlf", "path": str(_write(tmp_path, 2))})
    s = data[0]
    assert [m["role"] for m in s.messages] == ["user", "assistant", "user", "assistant"]
    assert s.messages[0]["content"] == "<image>\nWhat colour is it?" and len(s.media["image"]) == 1
    assert s.messages[1] == {"role": "assistant", "content": "It is green.", "train": False}  # its own reply: context
    assert s.messages[2]["content"] == "The colour named is wrong.\nLook at the picture again."  # critique, refinement
    assert s.messages[3]["content"] == "It is red." and s.messages[3].get("train", True) is True


def test_only_the_refined_reply_is_a_target() -> None:
    model = build("dress:tiny")
    tok = model.processor.tokenizer
    conv = [{"role": "user", "content": "What colour is it?"},
            {"role": "assistant", "content": "It is green.", "train": False},
            {"role": "user", "content": "The colour named is wrong."},
            {"role": "assistant", "content": "It is red."}]
    enc = model.processor.encode(conv)
    target = tok.decode([t for t, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != IGNORE])
    assert target.strip().startswith("It is red.") and "green" not in target, target
    assert "It is green." in tok.decode(enc.input_ids)  # still in the context the refined reply is conditioned on
    plain = model.processor.encode([{**m, "train": True} if m["role"] == "assistant" else m for m in conv])
    assert sum(lab != IGNORE for lab in plain.labels) > sum(lab != IGNORE for lab in enc.labels)


def test_dress_presets_run_an_nlf_stage() -> None:
    for size in ("tiny", "full"):
        info = REG.presets[f"dress:{size}"]
        stages = {s["name"]: s for s in info.spec["stages"]}
        assert stages["nlf"].get("objective") == "nlf", size
        assert "is not a stage mmhub runs" not in info.status, info.status


def _refined_logprob(model: MMModel, data: list[Sample]) -> float:
    b = model.batch([s.messages for s in data], [s.media for s in data])
    with torch.no_grad():
        out = model(b["input_ids"], b["attention_mask"], b["labels"], b["media"])
    return float(-out.loss)


def test_nlf_stage_learns_the_refined_reply_and_refuses_samples_without_feedback(tmp_path: Path, capsys) -> None:
    from mmhub.data import load_dataset
    from mmhub.train.run import train

    data = list(load_dataset({"type": "nlf", "path": str(_write(tmp_path, 16))}))
    data.append(Sample("plain-sft", [{"role": "user", "content": "<image>\nWhat colour is it?"},
                                     {"role": "assistant", "content": "It is red."}], data[0].media))
    spec = json.loads(json.dumps(REG.presets["dress:tiny"].spec))
    spec["encoders"]["image"]["vision_cfg"]["image_size"] = 56
    # the preset's nlf stage, with the whole tiny LLM training so that a few steps show it (the preset's LoRA learns
    # the same replies, more slowly)
    spec["stages"] = [{**next(s for s in spec["stages"] if s["name"] == "nlf"), "lr": 5e-3, "batch_size": 8,
                       "max_steps": 10, "log_every": 1, "max_bad_fraction": 0.2, "warmup_ratio": 0.1,
                       "train": {"projectors": "full", "backbone": "full"}}]
    assert spec["stages"][0]["objective"] == "nlf"
    before = build(spec)
    lp0 = _refined_logprob(before, data[:16])
    summary = train(spec, out=tmp_path / "run", datasets={"nlf": data}, progress_bar=False)
    after = MMModel.from_pretrained(tmp_path / "run" / "nlf" / "model")
    lp1 = _refined_logprob(after, data[:16])
    print(f"refined-reply mean log-prob per token: {lp0:.3f} -> {lp1:.3f}")
    assert lp1 - lp0 > 1.0, (lp0, lp1)
    skipped = summary["nlf"]["skipped_by_reason"]  # the plain sample, each time an epoch reaches it
    assert list(skipped) == ["no_feedback_turn"] and skipped["no_feedback_turn"] >= 1, summary["nlf"]
    assert "'plain-sft' has no feedback" in capsys.readouterr().out
    # the loss counts the refined replies' tokens only, never the earlier replies'
    proc = before.processor
    per_sample = [sum(lab != IGNORE for lab in proc.encode(s.messages, s.media, preprocess=False).labels)
                  for s in data[:16]]
    with_earlier = [sum(lab != IGNORE for lab in proc.encode([{**m, "train": True} for m in s.messages], s.media,
                                                             preprocess=False).labels) for s in data[:16]]
    steps = [json.loads(x) for x in (tmp_path / "run" / "nlf" / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in x]
    assert all(st["refined_tokens"] <= 8 * max(per_sample) < 8 * min(with_earlier) for st in steps), steps[0]


@pytest.mark.parametrize("bad", [[{"role": "assistant", "content": "x", "train": "no"}]])
def test_a_train_flag_must_be_a_boolean(bad) -> None:
    from mmhub.errors import InputError

    model = build("dress:tiny")
    with pytest.raises(InputError, match="train"):
        model.processor.encode([{"role": "user", "content": "hi"}, *bad])
