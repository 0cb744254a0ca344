"""The easy-VQA question grammar and the ``easy_vqa_varied`` dataset: answers come from the image, not the wording."""

from __future__ import annotations

import collections
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mmhub
from mmhub.data import load_dataset
from mmhub.data.easy_vqa import COLORS, SHAPES, SOURCE, facts_from_pixels
from mmhub.data.easy_vqa_grammar import (
    CONSTRUCTIONS,
    Form,
    ImagePool,
    answer,
    conversation,
    paraphrases,
    single_turn,
)
from mmhub.errors import SpecError

# every (shape, colour) pair 5 times: 120 synthetic images
FACTS = {i: (SHAPES[i % 3], COLORS[(i // 3) % 8]) for i in range(120)}
ANSWERS = {"yes_no": ("yes", "no"), "shape": SHAPES, "color": COLORS}
WORD = re.compile(r"[a-z]+")


def singles(n: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    pool = ImagePool(FACTS)
    return [single_turn(pool, rng) for _ in range(n)]


def truth(form: Form, facts: list[tuple[str, str]]) -> str:
    """The test's own reading of a logical form on the images' facts (independent of the grammar's `answer`)."""
    shape, color = facts[form.image]
    if form.kind in ("what_shape", "choose_shape"):
        assert not form.options or shape in form.options
        return shape
    if form.kind in ("what_color", "choose_color"):
        assert not form.options or color in form.options
        return color
    if form.kind in ("same_shape", "same_color"):
        k = 0 if form.kind == "same_shape" else 1
        held = facts[0][k] == facts[1][k]
    else:
        has_s, has_c = shape == form.shape, color == form.color
        held = {"has_shape": has_s, "has_color": has_c, "has_both": has_s and has_c, "and": has_s and has_c,
                "or": has_s or has_c}[form.kind]
    return "yes" if held != form.negated else "no"


def test_grammar_has_many_constructions_per_question_type() -> None:
    per_type = collections.Counter()
    for kind, items in CONSTRUCTIONS.items():
        per_type[Form(kind=kind).question_type] += len(items)
    assert per_type["yes_no"] >= 60 and per_type["shape"] >= 12 and per_type["color"] >= 12, per_type
    negated = sum(1 for kind in ("has_shape", "has_color", "has_both") for c in CONSTRUCTIONS[kind] if c.negated)
    assert negated >= 20
    texts = " ".join(c.direct for items in CONSTRUCTIONS.values() for c in items)
    for needed in ("can you see", "is there any", "spot", "contain", "which {noun}", " or ", " and "):
        assert needed in texts, needed


def test_every_answer_follows_from_the_image_facts() -> None:
    for turn in singles(3000, seed=1):
        facts = [FACTS[turn.image_id]]
        assert turn.answer == truth(turn.form, facts) == answer(turn.form, facts), turn
        assert turn.answer in ANSWERS[turn.form.question_type], turn  # the answer's kind follows the question
        words = set(WORD.findall(turn.question.lower()))
        if turn.form.color is not None:  # the asked colour is in the question
            assert turn.form.color in words or (turn.form.color == "gray" and "grey" in words), turn


def test_confirmation_questions_are_answered_by_the_positive_statement() -> None:
    """"Isn't the shape a circle?" is answered yes for a circle (as in English), unlike "is the shape not a circle?"."""
    confirm = [c for kind in ("has_shape", "has_color", "has_both") for c in CONSTRUCTIONS[kind] if "-confirm/" in c.id]
    assert len(confirm) >= 20 and all(not c.negated for c in confirm)
    asked = [t for t in singles(6000, seed=4) if "-confirm/" in t.construction]
    assert len(asked) >= 300
    for t in asked:
        shape, color = FACTS[t.image_id]
        f = t.form
        positive = ((f.shape is None or f.shape == shape) and (f.color is None or f.color == color))
        assert re.search(r"n't\b|, right\b", t.question.lower()), t.question
        assert t.answer == ("yes" if positive else "no"), t
    assert {t.answer for t in asked} == {"yes", "no"}


def test_answers_are_balanced_and_no_wording_predicts_them() -> None:
    turns = singles(30000, seed=2)
    train, test = turns[:20000], turns[20000:]
    by_type = collections.defaultdict(collections.Counter)
    by_construction = collections.defaultdict(collections.Counter)
    for t in turns:
        by_type[t.form.question_type][t.answer] += 1
        by_construction[t.construction][t.answer] += 1
    for qtype, counts in by_type.items():
        share = np.array([counts[a] for a in ANSWERS[qtype]]) / sum(counts.values())
        assert share.max() < 1.15 / len(ANSWERS[qtype]) and share.min() > 0.85 / len(ANSWERS[qtype]), (qtype, counts)
    for construction, counts in by_construction.items():  # every frame's answers are balanced (4 sigma)
        kind = re.sub(r"-(not|confirm)$", "", construction.split("/")[0])
        n, k = sum(counts.values()), len(ANSWERS[Form(kind).question_type])
        assert n >= 100 and max(counts.values()) / n <= 1 / k + 4 * math.sqrt((1 / k) * (1 - 1 / k) / n), \
            (construction, counts)
    # a reader that knows only the frame: its majority answer (on other questions) is right at chance level
    majority = collections.defaultdict(collections.Counter)
    for t in train:
        majority[t.construction][t.answer] += 1
    for qtype, labels in ANSWERS.items():
        asked = [t for t in test if t.form.question_type == qtype]
        right = sum(majority[t.construction].most_common(1)[0][0] == t.answer for t in asked)
        assert right / len(asked) <= 1 / len(labels) + 0.05, f"{qtype}: the frame predicts {right}/{len(asked)}"
    # a blind reader of the words: naive Bayes on the question's words and word pairs, trained on other questions

    def feats(q: str) -> list[str]:
        w = WORD.findall(q.lower())
        return w + [a + "_" + b for a, b in zip(w, w[1:], strict=False)]

    for qtype, labels in ANSWERS.items():
        counts = {a: collections.Counter() for a in labels}
        prior = collections.Counter()
        for t in train:
            if t.form.question_type == qtype:
                counts[t.answer].update(feats(t.question))
                prior[t.answer] += 1
        vocab = set().union(*counts.values())
        totals = {a: sum(c.values()) + len(vocab) for a, c in counts.items()}
        right = n = 0
        for t in test:
            if t.form.question_type != qtype:
                continue
            f = feats(t.question)
            guess = max(labels, key=lambda a: math.log(prior[a] + 1)
                        + sum(math.log((counts[a][x] + 1) / totals[a]) for x in f))
            right += guess == t.answer
            n += 1
        assert right / n <= 0.6, f"{qtype}: the wording alone predicts {right}/{n} answers"


def test_paraphrases_of_one_question_share_one_answer() -> None:
    rng = np.random.default_rng(3)
    forms = [Form("has_shape", shape="circle"), Form("has_shape", shape="circle", negated=True),
             Form("has_color", color="red", negated=True), Form("or", shape="triangle", color="red"),
             Form("and", shape="circle", color="blue"), Form("what_shape", color="red"), Form("what_color")]
    for form in forms:
        texts = paraphrases(form, rng, n=40)
        assert len(set(texts)) >= 15, (form, texts)  # many wordings ...
        for image_facts in (("circle", "red"), ("triangle", "blue"), ("rectangle", "red")):
            if form.kind.startswith("what_") and image_facts != ("circle", "red"):
                continue  # what-questions name the true colour/shape of the image they were made for
            assert answer(form, [image_facts]) == truth(form, [image_facts])  # ... one answer, from the image


def test_polite_indirect_and_synonym_wordings() -> None:
    text = " ".join(t.question.lower() for t in singles(4000, seed=4))
    for phrase in ("could you tell me", "i'd like to know", "whether", "figure", "object", "thing", "hue",
                   "color", "colour", "disc", "round", "grey", "rectangular", "triangular", "do you spot",
                   "does the picture contain", "is there any", "can you see"):
        assert phrase in text, phrase


def test_conversations_follow_up_on_the_right_image() -> None:
    rng = np.random.default_rng(5)
    pool = ImagePool(FACTS)
    kinds = collections.Counter()
    telling = 0
    for _ in range(600):
        images, turns = conversation(pool, rng, ellipsis=0.4, compare=0.6)
        assert 2 <= len(turns) <= 4 and len(images) in (1, 2)
        facts = [FACTS[i] for i in images]
        kinds[len(images)] += 1
        for t in turns:
            assert t.answer == truth(t.form, facts) == answer(t.form, facts), (images, t)
        if len(images) == 2:
            assert images[0] != images[1]
            assert {t.form.image for t in turns} == {0, 1} or any(t.form.kind.startswith("same_") for t in turns)
            for t in turns:  # a turn about one image: the other image's facts would give another answer
                k = {"what_shape": 0, "choose_shape": 0, "what_color": 1, "choose_color": 1}.get(t.form.kind)
                if k is not None and facts[0][k] != facts[1][k]:
                    telling += 1
                    assert answer(Form(t.form.kind, image=1 - t.form.image), facts) != t.answer, (images, t)
            assert [t.user.count("<image>") for t in turns[:2]] == [1, 1]
    assert kinds[1] > 150 and kinds[2] > 150 and telling > 200


def fake_easy_vqa(root: Path, n: int = 48) -> Path:
    """A tiny easy-VQA-shaped folder (train and test) whose questions decide every image's shape and colour."""
    for split, offset in (("train", 0), ("test", 1000)):
        (root / split / "images").mkdir(parents=True)
        questions = []
        for i in range(n):
            shape, color = SHAPES[i % 3], COLORS[(i // 3) % 8]
            questions += [[f"what is the {color} shape?", shape, offset + i],
                          [f"what color is the {shape}?", color, offset + i]]
            Image.new("RGB", (64, 64), "white").save(root / split / "images" / f"{offset + i}.png")
        (root / split / "questions.json").write_text(json.dumps(questions))
    return root


def test_dataset_samples_are_train_only_deterministic_and_mix_replay(tmp_path: Path) -> None:
    root = fake_easy_vqa(tmp_path / "ev")
    settings = {"type": "easy_vqa_varied", "data_dir": str(root), "samples": 400, "seed": 7,
                "replay_fraction": 0.1}
    ds = load_dataset(settings)
    samples = [ds[i] for i in range(len(ds))]
    assert len(ds) == 400
    assert [s.messages for s in samples] == [load_dataset(settings)[i].messages for i in range(400)]
    other = load_dataset({**settings, "seed": 8})
    assert [s.messages for s in samples] != [other[i].messages for i in range(400)]
    kinds = collections.Counter(s.meta["kind"] for s in samples)
    assert kinds["replay"] == 40 and kinds["conversation"] > 50 and kinds["single"] > 200, kinds
    for s in samples:
        assert not s.problems(), (s.id, s.problems())
        if s.meta["kind"] == "replay":
            assert not s.media and s.messages[0]["role"] == "user"
            continue
        assert all(Path(p).parent.parent.name == "train" for p in s.media["image"])  # never the test split
        users = [m["content"] for m in s.messages if m["role"] == "user"]
        replies = [m["content"] for m in s.messages if m["role"] == "assistant"]
        assert replies == [t["answer"] for t in s.meta["turns"]] and len(users) == len(replies)
        ids = s.meta["image_ids"]
        for t in s.meta["turns"]:
            shape, color = SHAPES[ids[t["image"]] % 3], COLORS[(ids[t["image"]] // 3) % 8]
            if t["question_type"] == "shape":
                assert t["answer"] == shape
            elif t["question_type"] == "color":
                assert t["answer"] == color
    with pytest.raises(SpecError, match="split"):
        load_dataset({**settings, "split": "test"})


def test_conversation_samples_train_every_answer(tmp_path: Path, tiny_spec) -> None:
    """A two-image conversation encodes with one image per placeholder and every answer as a target."""
    from mmhub.splice import IGNORE

    ds = load_dataset({"type": "easy_vqa_varied", "data_dir": str(fake_easy_vqa(tmp_path / "ev")), "samples": 200,
                       "conversations": 1.0, "cross_image": 1.0})
    s = next(ds[i] for i in range(len(ds)) if len(ds[i].meta["turns"]) >= 3)
    assert len(s.media["image"]) == 2 and s.media["image"][0] != s.media["image"][1]
    processor = mmhub.build(tiny_spec).processor
    enc = processor.encode(s.messages, {"image": [Image.open(p).convert("RGB") for p in s.media["image"]]})
    targets = processor.tokenizer.decode([t for t in enc.labels if t != IGNORE])
    at = 0
    for t in s.meta["turns"]:  # the answers are targets, in order; the questions are not
        at = targets.index(t["answer"], at) + len(t["answer"])
        assert t["question"] not in targets


def test_real_train_split_when_present() -> None:
    from mmhub import weights
    from mmhub.errors import WeightsNotFoundError

    try:
        weights.resolve(SOURCE)
    except WeightsNotFoundError:
        pytest.skip(f"easy-VQA is not here; `mmhub weights fetch {SOURCE}` gets it")
    ds = load_dataset({"type": "easy_vqa_varied", "samples": 2000, "seed": 0})
    images, checked = set(), 0
    for i in range(len(ds)):
        s = ds[i]
        images.update(s.meta.get("image_ids", []))
        for p in s.media.get("image", []):
            assert "/train/images/" in p
        if i < 300:  # what-answers agree with an independent reading of the image's pixels
            for t in s.meta["turns"]:
                if t["question_type"] != "yes_no":
                    shape, color = facts_from_pixels(s.media["image"][t["image"]])
                    assert t["answer"] == (shape if t["question_type"] == "shape" else color), (s.id, t)
                    checked += 1
    assert len(images) > 1000 and max(images) < 4000 and checked > 100  # train image ids are 0..3999


def test_elliptical_follow_ups_ask_the_previous_question_of_what_they_point_at() -> None:
    """"And this one?" asks the last question of the image just shown; "What about the first picture?" of the
    first; "And a triangle?" swaps the asked value; "And its colour?" asks the other attribute of the same image;
    "Is this one the same colour as the first?" compares the two."""
    rng = np.random.default_rng(11)
    pool = ImagePool(FACTS)
    seen = collections.Counter()
    for _ in range(1500):
        images, turns = conversation(pool, rng, ellipsis=0.5, compare=0.6)
        facts = [FACTS[i] for i in images]
        for prev, t in zip(turns, turns[1:], strict=False):
            kind = t.construction.split("/")[0]
            seen[kind] += 1
            assert t.answer == truth(t.form, facts), (images, t)
            if kind in ("ellipsis-this", "ellipsis-ref"):
                assert t.form.image == 1 - prev.form.image and t.form.kind == prev.form.kind, (prev, t)
                assert (t.form.shape, t.form.color, t.form.negated) == (prev.form.shape, prev.form.color,
                                                                      prev.form.negated)
            if kind == "ellipsis-this":
                assert t.user.count("<image>") == 1 and t.form.image == 1
            if kind == "ellipsis-value":
                assert t.form.kind == prev.form.kind and t.form.image == prev.form.image
                assert (t.form.shape, t.form.color) != (prev.form.shape, prev.form.color)
            if kind == "ellipsis-attribute":
                assert t.form.image == prev.form.image and t.form.question_type != prev.form.question_type
            if kind.endswith("-this") and kind.startswith("same_"):
                assert t.user.count("<image>") == 1 and turns.index(t) == 1
    for kind in ("ellipsis-this", "ellipsis-ref", "ellipsis-value", "ellipsis-attribute", "same_color-this",
                 "same_shape-this", "same_color", "same_shape"):
        assert seen[kind] > 30, (kind, seen)
    answers = collections.Counter(t.answer for _ in range(400)
                                  for t in conversation(pool, rng, ellipsis=0.5, compare=0.6)[1][1:]
                                  if t.construction.startswith(("same_", "ellipsis-value")))
    assert 0.35 < answers["yes"] / (answers["yes"] + answers["no"]) < 0.65, answers
