"""The held-out material (mmhub/recipes/heldout) and the tasks that score it: easy-vqa-reworded, easy-vqa-followup,
photo-refusal (with its refusal detector)."""

from __future__ import annotations

import collections
import copy
import json
from dataclasses import dataclass
from typing import Any

import pytest
from PIL import Image

import mmhub
from mmhub.data.easy_vqa import COLORS, SHAPES, EasyVQAConfig, EasyVQADataset, read_questions
from mmhub.errors import InputError
from mmhub.evaluation import evaluate, get_task
from mmhub.evaluation.heldout import (
    REWORDED_TYPES,
    followup_conversations,
    photo_list,
    reworded_items,
)
from mmhub.evaluation.refusal import is_refusal

from conftest import TINY_SPEC, need_easy_vqa

# conftest's tiny LLaVA spec without its training stages
SPEC = {**{k: v for k, v in copy.deepcopy(TINY_SPEC).items() if k != "stages"}, "name": "heldout-tiny"}



@pytest.fixture(scope="module")
def test_split() -> EasyVQADataset:
    return EasyVQADataset(EasyVQAConfig(split="test", task="caption"))


@pytest.fixture(scope="module")
def model():
    return mmhub.build(SPEC)


def _expected(facts: tuple[str, str], kind: str, answer_about: dict[str, str]) -> bool:
    shape, color = facts
    return all((shape if k == "shape" else color) == v for k, v in answer_about.items())


def _check_answer(facts: tuple[str, str], item: dict[str, Any]) -> None:
    kind, about, answer = item["type"], item["about"], item["answer"]
    holds = _expected(facts, kind, about)
    if kind in ("yes_no", "yes_no_confirm", "presence"):
        assert answer == ("yes" if holds else "no"), (item, facts)
    elif kind == "yes_no_negated":
        assert answer == ("no" if holds else "yes"), (item, facts)
    else:
        assert holds, (item, facts)  # "What colour is the circle?" is asked of a circle
        assert answer == (facts[0] if kind in ("shape", "which_shape") else facts[1]), (item, facts)


# -- the held-out files ------------------------------------------------------------------------
def test_reworded_set_is_balanced_per_type_and_answer() -> None:
    items = reworded_items()
    assert len(items) >= 500 and len({i["question"].lower() for i in items}) == len(items)
    kinds = collections.Counter(i["type"] for i in items)
    assert set(kinds) == set(REWORDED_TYPES) and max(kinds.values()) - min(kinds.values()) <= 8, kinds
    for kind in ("yes_no", "yes_no_negated", "yes_no_confirm", "presence"):
        answers = collections.Counter(i["answer"] for i in items if i["type"] == kind)
        assert answers["yes"] == answers["no"] and set(answers) == {"yes", "no"}, (kind, answers)
    for kind, values in (("shape", SHAPES), ("which_shape", SHAPES), ("color", COLORS)):
        answers = collections.Counter(i["answer"] for i in items if i["type"] == kind)
        assert set(answers) == set(values) and max(answers.values()) == min(answers.values()), (kind, answers)
    # --limit takes the first lines: they interleave the types
    assert {i["type"] for i in items[:len(REWORDED_TYPES)]} == set(REWORDED_TYPES)


@need_easy_vqa
def test_every_reworded_answer_follows_from_the_test_image(test_split) -> None:
    items = reworded_items()
    for item in items:
        _check_answer(test_split.full_facts(item["image"]), item)
    assert len({i["image"] for i in items}) == len(items)  # one question per image


@need_easy_vqa
def test_no_held_out_question_is_an_easy_vqa_wording(test_split) -> None:
    own = {q.strip().lower() for split in ("train", "test")
           for q, _, _ in read_questions(test_split.root / split / "questions.json")}
    asked = [i["question"] for i in reworded_items()]
    asked += [t["question"] for c in followup_conversations() for t in c["turns"]]
    assert not [q for q in asked if q.strip().lower() in own]


@need_easy_vqa
def test_every_follow_up_answer_follows_from_its_images(test_split) -> None:
    convs = followup_conversations()
    assert len(convs) >= 100 and all(2 <= len(c["turns"]) <= 4 for c in convs)
    assert sum(len(c["images"]) == 2 for c in convs) >= 20
    for c in convs:
        facts = [test_split.full_facts(i) for i in c["images"]]
        assert c["turns"][0].get("image") == 0
        shown = [t["image"] for t in c["turns"] if "image" in t]
        assert shown == list(range(len(c["images"]))), c["id"]  # each image shown once, in order
        for t in c["turns"]:
            if t["type"] == "compare":
                k = 0 if t["compare"] == "shape" else 1
                assert t["answer"] == ("yes" if facts[0][k] == facts[1][k] else "no"), (c["id"], t)
            else:
                _check_answer(facts[t["refers"]], t)


def test_photo_split_is_disjoint_and_loads() -> None:
    from mmhub.data.photos import load_photo

    photos = photo_list()
    held = {p["source"] for p in photos["held_out"]} | {a for p in photos["held_out"] for a in p.get("aliases", [])}
    train = {p["source"] for p in photos["train_negatives"]}
    assert len(photos["held_out"]) >= 10 and len(photos["train_negatives"]) >= 10 and not held & train
    assert "skimage:cat" in held  # the same photo as chelsea, held out with it
    for p in photos["held_out"][:3] + photos["train_negatives"][:2]:
        image = load_photo(p["source"])
        assert isinstance(image, Image.Image) and image.mode == "RGB" and min(image.size) >= 64
    with pytest.raises(InputError, match="skimage.data has no image 'no_such_photo'"):
        load_photo("skimage:no_such_photo")
    with pytest.raises(InputError, match="write skimage:NAME, sklearn:FILE or matplotlib:FILE"):
        load_photo("flickr:astronaut")


# -- the refusal detector ----------------------------------------------------------------------
@pytest.mark.parametrize("reply", [
    "I can only answer questions about simple coloured shapes.",
    "Sorry, I can only talk about simple colored shapes.",
    "I cannot tell what this picture shows.",
    "I can't tell.",
    "I’m unable to answer that about this image.",
    "This is not a simple shape picture, so I cannot answer.",
    "This picture does not show a simple coloured shape.",
    "I don't know.",
])
def test_refusals_are_detected(reply: str) -> None:
    assert is_refusal(reply)


@pytest.mark.parametrize("reply", [
    "no", "yes", "red", "circle", "There is no red shape.", "I can see a red circle.", "I can't see a circle.",
    "The image shows a triangle.", "a traditional Islamic art piece with a crescent moon and a black triangle",
    "", "It is not a circle, it is a triangle.",
])
def test_answers_are_not_refusals(reply: str) -> None:
    assert not is_refusal(reply)


# -- the tasks, with a model whose replies are crafted ------------------------------------------
@dataclass
class _Reply:
    text: str


class Scripted:
    """A model that answers through `reply(messages, images)`, recording what it was asked."""

    modalities = ("image",)

    def __init__(self, reply):
        self.reply, self.seen = reply, []

    def generate(self, prompts, media, max_new_tokens=8, do_sample=False, **_):
        out = []
        for messages, m in zip(prompts, media, strict=True):
            images = list(m.get("image", []))
            self.seen.append((messages, images))
            out.append(_Reply(self.reply(messages, images)))
        return out


_PIXELS: dict[bytes, int] = {}


def _image_id(image: Image.Image) -> int:
    """The easy-VQA test image id of `image` (by its pixels)."""
    if not _PIXELS:
        data = EasyVQADataset(EasyVQAConfig(split="test", task="caption"))
        ids = {i["image"] for i in reworded_items()} | {i for c in followup_conversations() for i in c["images"]}
        _PIXELS.update({Image.open(data.image_path(i)).convert("RGB").tobytes(): i for i in ids})
    return _PIXELS[image.convert("RGB").tobytes()]


def _oracle(messages, images) -> str:
    """The expected answer, found from the question, the images shown and (follow-ups) the turn's position."""
    question = messages[-1]["content"].split("\n")[-1]
    ids = [_image_id(im) for im in images]
    for item in reworded_items():
        if item["question"] == question and ids == [item["image"]]:
            return item["answer"].capitalize() + "."
    position = sum(m["role"] == "user" for m in messages) - 1
    for c in followup_conversations():
        turns = c["turns"]
        if position < len(turns) and turns[position]["question"] == question and c["images"][:len(ids)] == ids:
            return turns[position]["answer"]
    raise AssertionError(question)


@need_easy_vqa
def test_reworded_scores_strictly_and_per_type() -> None:
    perfect = evaluate(Scripted(_oracle), "easy-vqa-reworded", limit=21, batch_size=8)
    assert perfect["task"] == "easy_vqa_reworded" and perfect["n"] == 21 and perfect["accuracy"] == 1.0
    assert set(perfect["per_type"]) == set(REWORDED_TYPES) and all(v["n"] == 3 for v in perfect["per_type"].values())
    rows: list[dict[str, Any]] = []
    wordy = evaluate(Scripted(lambda m, i: _oracle(m, i) + " It is."), "easy-vqa-reworded", limit=14,
                     on_result=rows.append)
    assert wordy["accuracy"] == 0.0 and wordy["accuracy_lenient"] == 1.0  # strict: the whole reply
    assert len(rows) == 14 and {"image", "question", "answer", "prediction", "type", "correct"} <= set(rows[0])
    always_yes = evaluate(Scripted(lambda m, i: "yes"), "easy-vqa-reworded", limit=56)
    for kind in ("yes_no", "yes_no_negated", "yes_no_confirm", "presence"):
        assert always_yes["per_type"][kind]["accuracy"] == 0.5, always_yes["per_type"]
    assert always_yes["per_type"]["color"]["accuracy"] == 0.0


@need_easy_vqa
def test_reworded_shows_the_test_image_and_never_the_answer(test_split) -> None:
    model = Scripted(lambda m, i: "no")
    get_task("easy_vqa_reworded").run(model, limit=3)
    items = reworded_items()[:3]
    for (messages, images), item in zip(model.seen, items, strict=True):
        assert messages == [{"role": "user", "content": "<image>\n" + item["question"]}]
        assert len(images) == 1
        assert images[0].convert("RGB").tobytes() == Image.open(test_split.image_path(item["image"])).convert(
            "RGB").tobytes()
    blind = Scripted(lambda m, i: "no")
    out = get_task("easy_vqa_reworded").run(blind, limit=2, blind=True)
    assert out["blind"] is True and len({im.getpixel((0, 0)) for _, ims in blind.seen for im in ims}) == 1
    with pytest.raises(InputError, match="test"):
        get_task("easy_vqa_reworded").run(model, split="train")


@need_easy_vqa
def test_followup_feeds_the_expected_answers_as_history() -> None:
    model = Scripted(_oracle)
    out = evaluate(model, "easy-vqa-followup", limit=30, batch_size=16)
    convs = followup_conversations()[:30]
    assert out["n_conversations"] == 30 and out["n"] == sum(len(c["turns"]) for c in convs)
    assert out["accuracy"] == 1.0 and out["conversations_correct"] == 1.0
    assert set(out["per_turn"]) >= {"1", "2", "3"} and out["per_turn"]["1"]["n"] == 30
    # the third turn of the first conversation: both earlier turns with their expected answers, one image
    asked = {json.dumps(m): imgs for m, imgs in model.seen}
    c = convs[0]
    history = [{"role": "user", "content": "<image>\n" + c["turns"][0]["question"]},
               {"role": "assistant", "content": c["turns"][0]["answer"]},
               {"role": "user", "content": c["turns"][1]["question"]},
               {"role": "assistant", "content": c["turns"][1]["answer"]},
               {"role": "user", "content": c["turns"][2]["question"]}]
    assert len(asked[json.dumps(history)]) == 1
    # a two-image conversation: the second image arrives with its turn
    two = next(c for c in followup_conversations() if len(c["images"]) == 2)
    model2 = Scripted(lambda m, i: "no")
    get_task("easy_vqa_followup").run(model2, limit=followup_conversations().index(two) + 1)
    last = [(m, imgs) for m, imgs in model2.seen if m[-1]["content"].endswith(two["turns"][-1]["question"])][-1]
    assert len(last[1]) == 2 and sum(x["content"].count("<image>") for x in last[0]) == 2
    wrong = evaluate(Scripted(lambda m, i: "maybe"), "easy-vqa-followup", limit=5)
    assert wrong["accuracy"] == 0.0 and wrong["conversations_correct"] == 0.0


@need_easy_vqa
def test_photo_refusal_rates_on_crafted_replies() -> None:
    def honest(messages, images):
        # refuse on anything larger than easy-VQA's 64 x 64 scenes
        return "I can only answer questions about simple coloured shapes." if images[0].size != (64, 64) else "red"

    rows: list[dict[str, Any]] = []
    out = evaluate(Scripted(honest), "photo-refusal", limit=3, on_result=rows.append)
    assert out["task"] == "photo_refusal" and out["refusal_rate"] == 1.0 and out["false_refusal_rate"] == 0.0
    questions = photo_list()["questions"]
    assert out["n"] == 3 * len(questions) and out["n_easy_vqa"] > 0 and out["accuracy"] == out["refusal_rate"]
    assert {r["source"] for r in rows} >= {"photo", "easy_vqa"}
    always = evaluate(Scripted(lambda m, i: "I cannot tell."), "photo-refusal", limit=2)
    assert always["refusal_rate"] == 1.0 and always["false_refusal_rate"] == 1.0
    never = evaluate(Scripted(lambda m, i: "a black triangle"), "photo-refusal", limit=2)
    assert never["refusal_rate"] == 0.0 and never["false_refusal_rate"] == 0.0
    with pytest.raises(InputError, match="blind"):
        get_task("photo_refusal").run(Scripted(honest), blind=True)


# -- the tasks on a tiny model built from a config ----------------------------------------------
@need_easy_vqa
def test_the_three_tasks_run_on_a_tiny_model(model) -> None:
    reworded = evaluate(model, "easy-vqa-reworded", limit=7, batch_size=4, max_new_tokens=2)
    assert reworded["n"] == 7 and 0.0 <= reworded["accuracy"] <= 1.0 and len(reworded["per_type"]) == 7
    followup = evaluate(model, "easy-vqa-followup", limit=3, batch_size=4, max_new_tokens=2)
    assert followup["n_conversations"] == 3 and 0.0 <= followup["accuracy"] <= 1.0
    refusal = evaluate(model, "photo-refusal", limit=1, batch_size=8, max_new_tokens=2,)
    assert refusal["n"] == len(photo_list()["questions"]) and 0.0 <= refusal["refusal_rate"] <= 1.0
