"""mmhub.evaluation: answer normalisation and scoring, the easy-VQA task (blind included), ``mmhub eval``."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import mmhub
from mmhub.cli import main
from mmhub.data import load_dataset
from mmhub.evaluation import evaluate, exact_match, get_task, normalize_answer, score
from mmhub.evaluation.easy_vqa import BLANK_RGB

from conftest import TINY_SPEC, need_easy_vqa

ROOT = Path(__file__).resolve().parents[1]
# conftest's tiny LLaVA spec without its training stages
SPEC = {**{k: v for k, v in copy.deepcopy(TINY_SPEC).items() if k != "stages"}, "name": "eval-tiny"}
KEYS = {"task", "split", "n", "correct", "accuracy", "per_type", "blind", "seconds"}


@pytest.fixture(scope="module")
def model():
    return mmhub.build(SPEC)


# -- scoring -----------------------------------------------------------------------------------
@pytest.mark.parametrize("text, one_word, expected", [
    ("  The Circle. ", False, "circle"),
    ("Yes, it is!", True, "yes"),
    ("Yes, it is!", False, "yes it is"),
    ("a red one", True, "red"),
    ("An apple", False, "apple"),
    ("It's blue", False, "it s blue"),
    ("...", True, ""),
    ("", False, ""),
])
def test_normalize_answer(text: str, one_word: bool, expected: str) -> None:
    assert normalize_answer(text, one_word=one_word) == expected


@pytest.mark.parametrize("prediction, answer, ok", [
    ("Circle.", "circle", True),
    ("yes, there is one", "yes", False),  # strict: the whole reply (the lenient first-word score says yes)
    ("The triangle", "triangle", True),
    ("RED", "red", True),
    ("no", "yes", False),
    ("", "yes", False),
    ("the answer is red", "red", False),
    ("grey", "gray", False),  # no synonyms
    ("new york city", "New York", False),  # several-word answers compare whole
    ("the new-york", "new york", True),
])
def test_exact_match(prediction: str, answer: str, ok: bool) -> None:
    assert exact_match(prediction, answer) is ok


def test_score_overall_and_per_type() -> None:
    triples = [("circle", "circle", "shape"), ("Square", "rectangle", "shape"), ("Red.", "red", "color"),
               ("yes", "no", "yes_no"), ("No, it is not.", "no", "yes_no"), ("no", "no", "yes_no")]
    out = score(triples)
    # strict: "No, it is not." says more than "no"; the lenient first-word score counts it
    assert out["n"] == 6 and out["correct"] == 3 and out["accuracy"] == pytest.approx(3 / 6)
    assert out["correct_lenient"] == 4 and out["accuracy_lenient"] == pytest.approx(4 / 6)
    assert out["per_type"] == {
        "color": {"n": 1, "correct": 1, "accuracy": 1.0, "correct_lenient": 1, "accuracy_lenient": 1.0},
        "shape": {"n": 2, "correct": 1, "accuracy": 0.5, "correct_lenient": 1, "accuracy_lenient": 0.5},
        "yes_no": {"n": 3, "correct": 1, "accuracy": pytest.approx(1 / 3), "correct_lenient": 2,
                   "accuracy_lenient": pytest.approx(2 / 3)}}
    assert score([])["accuracy"] == 0.0 and score([])["n"] == 0


# -- the easy-VQA task ---------------------------------------------------------------------------
@need_easy_vqa
def test_easy_vqa_task_on_a_tiny_model(model) -> None:
    rows = []
    out = evaluate(model, "easy-vqa", split="test", limit=8, batch_size=3, max_new_tokens=3, on_result=rows.append)
    assert KEYS <= set(out) and out["task"] == "easy_vqa" and out["split"] == "test" and out["n"] == 8
    assert 0.0 <= out["accuracy"] <= 1.0 and out["blind"] is False
    assert sum(v["n"] for v in out["per_type"].values()) == 8 and set(out["per_type"]) <= {"shape", "color", "yes_no"}
    assert len(rows) == 8 and all(isinstance(r["prediction"], str) for r in rows)
    assert sum(r["correct"] for r in rows) == out["correct"]
    questions = load_dataset({"type": "easy_vqa", "split": "test"}).questions[:8]
    assert [r["answer"] for r in rows] == [a for _, a, _ in questions]
    assert rows[0]["answer"] == "triangle" and rows[0]["question"] == "what is the red shape?"


@need_easy_vqa
def test_the_balanced_task_asks_the_balanced_yes_no_questions(model) -> None:
    rows: list[dict] = []
    out = evaluate(model, "easy_vqa_balanced", limit=12, batch_size=6, max_new_tokens=1, on_result=rows.append)
    assert out["task"] == "easy_vqa_balanced" and out["n"] == 12
    balanced = load_dataset({"type": "easy_vqa", "split": "test", "yes_no": "balanced"}).questions[:12]
    own = load_dataset({"type": "easy_vqa", "split": "test"}).questions[:12]
    assert [(r["question"], r["answer"]) for r in rows] == [(q, a) for q, a, _ in balanced]
    assert [r["question"] for r in rows] != [q for q, _, _ in own]  # its yes/no questions are not the split's


@need_easy_vqa
def test_blind_feeds_blank_images_to_the_encoder(model) -> None:
    seen: list[torch.Tensor] = []
    handle = model.encoders["image"].register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    try:
        get_task("easy_vqa").run(model, split="test", limit=4, blind=True, batch_size=2, max_new_tokens=1)
        blind = torch.cat(seen)
        seen.clear()
        get_task("easy_vqa").run(model, split="test", limit=4, blind=False, batch_size=2, max_new_tokens=1)
        seeing = torch.cat(seen)
    finally:
        handle.remove()
    grey = model.processor.preprocess["image"](Image.new("RGB", (64, 64), BLANK_RGB))
    assert blind.shape[0] == 4 and seeing.shape[0] == 4
    assert all(torch.allclose(x, grey) for x in blind)
    assert not any(torch.allclose(x, grey) for x in seeing)


# -- the CLI -------------------------------------------------------------------------------------
@need_easy_vqa
def test_cli_eval_in_process(model, tmp_path: Path, capsys) -> None:
    folder = model.save_pretrained(tmp_path / "saved")
    code = main(["eval", str(folder), "--task", "easy-vqa", "--limit", "8", "--batch-size", "4",
                 "--max-new-tokens", "2", "--blind"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(lines) == 9
    last = json.loads(lines[-1])
    assert KEYS <= set(last) and last["n"] == 8 and last["blind"] is True and last["model"] == str(folder)
    assert 0.0 <= last["accuracy"] <= 1.0 and all("prediction" in json.loads(x) for x in lines[:-1])


@need_easy_vqa
def test_cli_eval_subprocess_with_a_spec_file(tmp_path: Path) -> None:
    spec = tmp_path / "tiny.json"
    spec.write_text(json.dumps(SPEC))
    proc = subprocess.run([sys.executable, "-m", "mmhub.cli", "eval", str(spec), "--task", "easy_vqa", "--limit", "2",
                           "--max-new-tokens", "2"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last["n"] == 2 and last["split"] == "test" and last["task"] == "easy_vqa"


def test_cli_eval_errors(tmp_path: Path, capsys) -> None:
    assert main(["eval", str(tmp_path / "no-such-model"), "--task", "easy-vqa"]) == 2
    err = capsys.readouterr().err
    assert "no such folder or spec file" in err and "no-such-model" in err
    assert main(["eval", str(tmp_path), "--task", "easy-vq"]) == 2
    err = capsys.readouterr().err
    assert "no eval task named 'easy-vq'" in err and "Did you mean 'easy_vqa'" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["eval", str(empty), "--task", "easy-vqa"]) == 2
    assert "error:" in capsys.readouterr().err

def test_default_model_is_found_or_the_error_says_how_to_train_one(tmp_path: Path, monkeypatch, capsys) -> None:
    import mmhub.demo_model as demo

    found = demo.find_default()
    assert (found.path / "mmhub_spec.json").is_file() and found.name in dict(demo.CHOICES)
    monkeypatch.setattr(demo, "HERE", tmp_path)
    assert main(["eval", "default", "--task", "easy-vqa"]) == 2
    err = capsys.readouterr().err
    assert "no trained default model" in err and "mmhub train easyvqa-tiny" in err


@need_easy_vqa
@pytest.mark.parametrize("name, floor",
                         [("easyvqa-tiny", 0.90), ("easyvqa-smollm2", 0.97), ("easyvqa-smollm2-draw", 0.97),
                          ("easyvqa-smollm2-varied", 0.97), ("easyvqa-smollm2-followup", 0.97)])
def test_shipped_models_score_on_a_fixed_subset(name: str, floor: float) -> None:
    """Each trained model committed in mmhub/demo_model, on the first 400 test questions (all three kinds)."""
    import mmhub.demo_model as demo
    from mmhub.model import MMModel

    path = demo.HERE / name
    if not (path / "mmhub_spec.json").is_file():
        pytest.skip(f"{name} is not shipped in this checkout yet")
    result = evaluate(MMModel.from_pretrained(path), "easy_vqa", limit=400, batch_size=50)
    assert set(result["per_type"]) == {"color", "shape", "yes_no"}
    assert result["accuracy"] >= floor, result


@pytest.mark.slow
def test_the_default_drawing_model_draws_the_asked_colour_and_shape() -> None:
    """The first shipped model that draws (the default), on the fixed prompt set (24 captions x 2 wordings);
    measured at shipping: easyvqa-smollm2-followup (the easyvqa-draw-outline generator) drawn 100%, colour 100%,
    shape 100%; easyvqa-smollm2-varied and -draw (the easyvqa-draw generator) shape 70.8%
    (mmhub/demo_model/README.md). One model only: each run takes minutes on a CPU."""
    import mmhub.demo_model as demo
    from mmhub.model import MMModel

    floors = {"easyvqa-smollm2-followup": 0.9, "easyvqa-smollm2-varied": 0.65, "easyvqa-smollm2-draw": 0.65}
    drawing = [n for n in floors if (demo.HERE / n / "mmhub_spec.json").is_file()]
    if not drawing:
        pytest.skip("no drawing model is shipped in this checkout")
    path = demo.HERE / drawing[0]
    result = evaluate(MMModel.from_pretrained(path), "easy_vqa_draw")
    assert result["n"] == 48 and result["drawn"] == 1.0, result
    assert result["color_match"] >= 0.98 and result["shape_recognised"] >= floors[drawing[0]], result


# floors a little under the values measured at shipping (mmhub/demo_model/README.md, "easyvqa-smollm2-followup":
# reworded 98.0% on these 252, follow-ups 94.2% on these 56 conversations, photos refused 100%)
DEFAULT_FLOORS = {"easy_vqa_reworded": 0.96, "easy_vqa_followup": 0.92, "photo_refusal": 0.95}


@need_easy_vqa
@pytest.mark.slow
@pytest.mark.parametrize("task, limit",
                         [("easy_vqa_reworded", 252), ("easy_vqa_followup", 56), ("photo_refusal", None)])
def test_the_default_model_understands_reworded_questions_follow_ups_and_refuses_photos(task: str, limit) -> None:
    """The shipped default (easyvqa-smollm2-followup) on the held-out sets (mmhub/recipes/heldout/, never trained on):
    strict accuracy on reworded questions and follow-up turns, refusal rate on held-out photos; no false refusals."""
    pytest.importorskip("skimage")
    import mmhub.demo_model as demo
    from mmhub.model import MMModel

    path = demo.HERE / "easyvqa-smollm2-followup"
    if not (path / "mmhub_spec.json").is_file():
        pytest.skip("easyvqa-smollm2-followup is not shipped in this checkout")
    result = evaluate(MMModel.from_pretrained(path), task, limit=limit, batch_size=32)
    if task == "photo_refusal":
        assert result["refusal_rate"] >= DEFAULT_FLOORS[task] and result["false_refusal_rate"] <= 0.01, result
    else:
        assert result["accuracy"] >= DEFAULT_FLOORS[task] and result["refusal_rate"] <= 0.01, result


def test_plugins_lists_datasets_and_eval_tasks(capsys) -> None:
    assert main(["plugins", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    names = {d["name"]: d for d in out["datasets"]}
    assert {"llava_json", "sharegpt", "captions", "preference", "webdataset", "easy_vqa"} <= set(names)
    assert names["easy_vqa"]["settings"] == ["balanced_yes_no", "caption_prompt", "data_dir", "draw_reply", "limit",
                                             "negated", "question_types", "seed", "split", "task", "yes_no"]
    assert names["webdataset"]["streaming"] is True and names["easy_vqa"]["plugin"] == "mmhub.datasets"
    assert [t["name"] for t in out["eval_tasks"]] == ["easy_vqa", "easy_vqa_balanced", "easy_vqa_draw",
                                                       "easy_vqa_followup", "easy_vqa_reworded", "photo_refusal"]
    assert main(["plugins"]) == 0
    text = capsys.readouterr().out
    assert "datasets (" in text and "eval tasks (6)" in text and "easy_vqa" in text
    assert "merge methods (7): dare_linear, dare_ties, linear, regmean, slerp, task_arithmetic, ties" in text
    assert "importers (" in text and "llava_next" in text


def test_the_reference_answer_never_reaches_the_model() -> None:
    from mmhub.evaluation.easy_vqa import _prompt

    msgs = [{"role": "user", "content": "<image>\nwhat is the red shape?"},
            {"role": "assistant", "content": "triangle"}]
    assert _prompt(msgs) == msgs[:1]
    assert all("triangle" not in m["content"] for m in _prompt(msgs))
