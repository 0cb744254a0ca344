"""easy-VQA (MIT, Victor Zhou): 64x64 images of one coloured shape, with questions about it.

The files come from the registry package ``easy-vqa==1.0`` through the weight source
``pypi:easy-vqa==1.0/easy_vqa/data`` (``mmhub weights fetch`` unpacks the wheel into mmhub's
cache; never ``pip install`` it: its wheel installs a top-level package named ``test``).
``data_dir`` may point at another copy of that folder (``train/questions.json``,
``train/images/ID.png``, same for ``test``).

Settings: ``split`` (``train``: 38,575 questions over 4,000 images; ``test``: 9,673 over 1,000),
``task``, ``limit`` (first N samples), ``caption_prompt``, ``data_dir``.

* ``task: qa``: one sample per question, in file order: ``user: "<image>\\n{question}"``,
  ``assistant: answer``; ``meta`` = ``{answer, question, question_type, image_id}`` where
  ``question_type`` is ``yes_no`` (answer yes/no), ``shape`` (answer circle/rectangle/triangle)
  or ``color`` (answer one of the 8 colours).
* ``balanced_yes_no: N`` (``task: qa`` only): N extra yes/no questions per image, appended after
  the split's own, drawn from the split's own yes/no question wordings ("is there a {color}
  shape?", "does the image not contain a {shape}?", ...) with the asked value true half the time.
  The split's questions are lopsided (about 83 % of its yes/no answers follow from the question
  alone), so a model can score well on them without looking; on the balanced ones it cannot.
  Deterministic (seeded by ``seed``); ``meta.synthetic`` marks them.
* ``yes_no: balanced`` (``task: qa`` only): each of the split's own yes/no questions is replaced, in place, by one
  about the same image drawn as ``balanced_yes_no`` draws them (seeded by ``seed``): the same images and question
  types in the same order, with answers that only looking gives (the ``easy_vqa_balanced`` eval task).
* ``question_types: [shape, color]`` (``task: qa`` only): keep only the questions of those types (after
  ``balanced_yes_no``), e.g. to train a specialist for one skill (`benchmarks/merge_skills.py`).
* ``negated: false`` (``task: qa`` only): drop the yes/no questions about absence ("is there not a circle?"), whose
  answer inverts what looking finds: on balanced questions a model that looks but reads no negation gains little,
  so a first stage without them lets looking pay before negation is learnt.
* ``task: draw`` (generation requests, for models with an image generator): one sample per
  image, by image id: ``user: "draw a red triangle"`` (one of `DRAW_PROMPTS`' wordings, chosen
  by ``seed`` and the image id), ``assistant: "Here is a red triangle. <img_out>"`` with the
  caption as the sample's output (``outputs = {"image": ["a red triangle"]}``), so
  decoding-side alignment trains towards the generator's features of the caption.
* ``task: caption``: one sample per image, by image id: ``user: "<image>"`` (plus
  ``"\\n" + caption_prompt`` when set), ``assistant: "a {color} {shape}"`` (e.g. "a red triangle").
  Colour and shape come from the image's questions and answers: shape/colour answers ("what is
  the red shape?" -> triangle gives both), affirmed yes/no questions ("is there a red shape?" ->
  yes, "is there not a circle?" -> no), and elimination (every shape but one denied). About 11 %
  of the images are left open by their questions; for those the missing fact is read from the
  image itself: the shape is drawn in one exact palette colour (colour = the palette colour with
  most pixels) and its mask tells the shape (rectangles fill their bounding box; triangles are
  lopsided about the box's centre, circles are not). Where the questions do decide, this reading agrees
  with them on every image (3,578 train and 888 test images; the test split is checked by a test),
  so every image gets a full caption.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import Field

from mmhub.data.base import Dataset, DatasetConfig, SampleError
from mmhub.data.sample import Sample
from mmhub.errors import InputError

SOURCE = "pypi:easy-vqa==1.0/easy_vqa/data"
SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "yellow", "teal", "brown", "black", "gray")
YES_NO = ("yes", "no")
QUESTION_TYPES = ("shape", "color", "yes_no")
# the generator's exact RGB values (checked against the answers on every image)
PALETTE = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
           "teal": (0, 128, 128), "brown": (165, 42, 42), "black": (0, 0, 0), "gray": (128, 128, 128)}
_WORD = re.compile(r"[a-z]+")


def question_type(answer: str) -> str:
    """``yes_no``, ``shape`` or ``color``, from the answer alone."""
    a = answer.strip().lower()
    if a in YES_NO:
        return "yes_no"
    if a in SHAPES:
        return "shape"
    if a in COLORS:
        return "color"
    raise ValueError(f"{answer!r} is not an easy-VQA answer (shapes {SHAPES}, colours {COLORS}, yes/no)")


def facts_from_questions(questions: list[list]) -> dict[int, tuple[str | None, str | None]]:
    """image id -> (shape, colour) as far as its questions and answers decide them (None where they do not)."""
    pos: dict[int, tuple[set, set]] = defaultdict(lambda: (set(), set()))
    neg: dict[int, tuple[set, set]] = defaultdict(lambda: (set(), set()))
    for q, a, image in questions:
        words = _WORD.findall(q)
        shapes = {w for w in words if w in SHAPES}
        colors = {w for w in words if w in COLORS}
        if a in SHAPES:  # "what is the red shape?" -> triangle
            pos[image][0].add(a)
            pos[image][1].update(colors)
        elif a in COLORS:  # "what color is the triangle?" -> red
            pos[image][1].add(a)
            pos[image][0].update(shapes)
        else:  # yes/no; "not"/"no" in the question flips it ("is there not a circle?", "is no red shape present?")
            negated = "not" in words or "no" in words
            target = pos if (a == "yes") != negated else neg
            target[image][0].update(shapes)
            target[image][1].update(colors)
    out = {}
    for image in pos.keys() | neg.keys():
        facts = []
        for k, universe in ((0, SHAPES), (1, COLORS)):
            known = pos[image][k]
            left = set(universe) - neg[image][k]
            value = next(iter(known)) if len(known) == 1 else (next(iter(left)) if len(left) == 1 else None)
            facts.append(value)
        out[image] = (facts[0], facts[1])
    return out


def facts_from_pixels(path: str | Path) -> tuple[str, str]:
    """(shape, colour) read from an easy-VQA image (see the module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise SampleError(f"easy-VQA image {p} does not exist", "missing_file", str(p))
    try:
        rgb = np.asarray(Image.open(p).convert("RGB"), dtype=np.int16)
    except OSError as exc:
        raise SampleError(f"easy-VQA image {p} is not a readable image ({exc})", "unreadable_media", str(p)) from None
    flat = rgb.reshape(-1, 3)
    pal = np.array(list(PALETTE.values()), dtype=np.int16)
    hits = (flat[:, None, :] == pal[None]).all(-1)  # (pixels, colours)
    counts = hits.sum(0)
    k = int(counts.argmax())
    if counts[k] == 0:
        raise SampleError(f"easy-VQA image {p} holds no palette colour", "unreadable_media", str(p))
    ys, xs = np.nonzero(hits[:, k].reshape(rgb.shape[:2]))
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    cy, cx = (ys.max() + ys.min()) / 2, (xs.max() + xs.min()) / 2
    lopsided = max(abs(int((ys < cy).sum()) - int((ys > cy).sum())), abs(int((xs < cx).sum()) - int((xs > cx).sum())))
    if counts[k] >= 0.97 * box:
        shape = "rectangle"
    elif lopsided / counts[k] > 0.25:
        shape = "triangle"
    else:
        shape = "circle"
    return shape, list(PALETTE)[k]


def is_negated(question: str) -> bool:
    """Whether a yes/no question asks about absence ("is there not a circle?", "does the image not contain ..."):
    its answer is the opposite of what looking for the named value finds."""
    words = _WORD.findall(question.lower())
    return "not" in words or "no" in words


def yes_no_templates(questions: list[list]) -> list[tuple[str, str, bool]]:
    """The split's yes/no wordings as ``(template, slot, negated)``; the template holds ``{color}`` or ``{shape}``."""
    found = set()
    for q, a, _ in questions:
        if a not in YES_NO:
            continue
        words = _WORD.findall(q)
        colors = [w for w in words if w in COLORS]
        shapes = [w for w in words if w in SHAPES]
        if len(colors) + len(shapes) != 1:
            continue
        slot, word = ("color", colors[0]) if colors else ("shape", shapes[0])
        template = re.sub(rf"\b{word}\b", "{" + slot + "}", q, count=1)
        found.add((template, slot, is_negated(q)))
    return sorted(found)


def balanced_yes_no(facts: dict[int, tuple[str, str]], templates: list[tuple[str, str, bool]], per_image: int,
                    seed: int = 0) -> list[list]:
    """``[[question, answer, image_id], ...]``: `per_image` questions per image, the asked value true half the time."""
    if not templates:
        raise InputError("the split has no yes/no questions to take wordings from; set balanced_yes_no: 0")
    rng = np.random.default_rng(seed)
    return [balanced_question(facts[image_id], templates, rng) + [image_id]
            for image_id in sorted(facts) for _ in range(per_image)]


def balanced_question(fact: tuple[str, str], templates: list[tuple[str, str, bool]],
                      rng: np.random.Generator) -> list[str]:
    """``[question, answer]`` about an image whose (shape, colour) is `fact`: one of `templates`, the asked value true
    half the time, so neither the wording nor the value tells the answer."""
    shape, color = fact
    template, slot, negated = templates[rng.integers(len(templates))]
    truth, universe = (color, COLORS) if slot == "color" else (shape, SHAPES)
    value = truth if rng.random() < 0.5 else rng.choice([v for v in universe if v != truth])
    return [template.format(**{slot: value}), "yes" if (value == truth) != negated else "no"]


def with_balanced_yes_no(questions: list[list], facts: Callable[[int], tuple[str, str]], seed: int = 0) -> list[list]:
    """`questions` with each yes/no question replaced by a balanced one (`balanced_question`) about the same image, in
    the same place: the same images and question types in the same order, but yes/no answers that only looking
    gives (about 83% of the split's own follow from the wording)."""
    templates = yes_no_templates(questions)
    if not templates:
        raise InputError("the split has no yes/no questions to take wordings from; set yes_no: split")
    rng = np.random.default_rng(seed)
    return [balanced_question(facts(q[2]), templates, rng) + [q[2]] if q[1] in YES_NO else q for q in questions]


def read_questions(path: Path) -> list[list]:
    """The split's ``[[question, answer, image_id], ...]`` (one json.load; about 30 ms for the train split)."""
    if not path.is_file():
        raise InputError(f"easy-VQA questions file {path} does not exist")
    with open(path, "rb") as fh:
        data = json.load(fh)
    if not isinstance(data, list) or (data and not (isinstance(data[0], list) and len(data[0]) == 3)):
        raise InputError(f"{path} is not an easy-VQA questions file (a list of [question, answer, image_id])")
    return data


DRAW_PROMPTS = ("draw {c}", "Draw {c}.", "Can you draw {c}?", "Please draw {c}.", "Show me a picture of {c}.",
                "Make an image of {c}.", "Generate a picture of {c}.", "I would like a drawing of {c}.")


def draw_prompt(caption: str, k: int) -> str:
    """The k-th wording (mod the number of wordings) of a request to draw `caption` ("a red circle")."""
    return DRAW_PROMPTS[k % len(DRAW_PROMPTS)].format(c=caption)


class EasyVQAConfig(DatasetConfig):
    split: Literal["train", "test"] = "train"
    task: Literal["qa", "caption", "draw"] = "qa"
    limit: int | None = None
    caption_prompt: str = ""
    balanced_yes_no: int = Field(0, ge=0)  # extra yes/no questions per image, half of them true (task qa)
    question_types: list[Literal["shape", "color", "yes_no"]] | None = Field(None, min_length=1)  # task qa: only these
    # task qa: "balanced" replaces each of the split's yes/no questions by a balanced one about the same image
    yes_no: Literal["split", "balanced"] = "split"
    # task qa: False drops the yes/no questions that ask about absence ("is there not a ..."), e.g. for a first
    # stage that learns to look before it learns negation
    negated: bool = True
    # task draw: the assistant's reply; {caption} and {marker} (the <img_out> group marker) are filled in. A model
    # whose backbone stays frozen while it learns to draw cannot learn new text before the signal tokens: use
    # "{marker}" first for those
    draw_reply: str = "Here is {caption}. {marker}"
    seed: int = 0
    data_dir: str = SOURCE  # a weight-source URI or a folder


class EasyVQADataset(Dataset):
    """easy-VQA (MIT): shape/colour/yes-no questions on 64x64 images, as QA or caption samples."""

    name = "easy_vqa"
    Config = EasyVQAConfig
    modalities = ("image",)

    def __init__(self, config: EasyVQAConfig | None = None, base_dir: Path | None = None, registry=None):
        super().__init__(config, base_dir)
        c = self.config
        from mmhub import weights

        scheme, rest = weights.split_uri(c.data_dir)
        self.root = self.resolve(rest) if scheme == "file" else Path(weights.resolve(c.data_dir, registry))
        self.folder = self.root / c.split
        self.questions = read_questions(self.folder / "questions.json")
        self.facts = facts_from_questions(self.questions)
        self.original = len(self.questions)
        if c.task == "qa":
            if c.yes_no == "balanced":
                self.questions = with_balanced_yes_no(self.questions, self.full_facts, c.seed)
            if c.balanced_yes_no:
                full = {i: self.full_facts(i) for i in self.facts}
                self.questions = self.questions + balanced_yes_no(full, yes_no_templates(self.questions),
                                                                  c.balanced_yes_no, c.seed)
            if c.question_types is not None:
                self.questions = [q for q in self.questions if question_type(q[1]) in c.question_types]
            if not c.negated:
                self.questions = [q for q in self.questions if q[1] not in YES_NO or not is_negated(q[0])]
            self.size = len(self.questions)
        else:
            self.image_ids = sorted(self.facts)
            self.size = len(self.image_ids)
        if c.limit is not None:
            self.size = min(self.size, c.limit)

    @property
    def source(self) -> str:
        return f"easy_vqa dataset ({self.config.split}, {self.config.task}) in {self.root}"

    def image_path(self, image_id: int) -> str:
        return str(self.folder / "images" / f"{image_id}.png")

    def __len__(self) -> int:
        return self.size

    def full_facts(self, image_id: int) -> tuple[str, str]:
        """(shape, colour) of an image: from its questions, the rest read from its pixels."""
        shape, color = self.facts[image_id]
        if shape is None or color is None:
            seen_shape, seen_color = facts_from_pixels(self.image_path(image_id))
            shape, color = shape or seen_shape, color or seen_color
        return shape, color

    def caption(self, image_id: int) -> str:
        shape, color = self.full_facts(image_id)
        return f"a {color} {shape}"

    def __getitem__(self, index: int) -> Sample:
        if index < 0:
            index += self.size
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.source} ({self.size} samples)")
        split = self.config.split
        if self.config.task == "qa":
            q, a, image_id = self.questions[index]
            return Sample(id=f"easy_vqa/{split}/{index}",
                          messages=[{"role": "user", "content": f"<image>\n{q}"}, {"role": "assistant", "content": a}],
                          media={"image": [self.image_path(image_id)]},
                          meta={"answer": a, "question": q, "question_type": question_type(a), "image_id": image_id,
                                "synthetic": index >= self.original})
        image_id = self.image_ids[index]
        if self.config.task == "draw":
            from mmhub.signals import group_marker

            caption = self.caption(image_id)
            request = draw_prompt(caption, (image_id * 7919 + self.config.seed) % len(DRAW_PROMPTS))
            return Sample(id=f"easy_vqa/{split}/draw/{image_id}",
                          messages=[{"role": "user", "content": request},
                                    {"role": "assistant", "content": self.config.draw_reply.format(
                                        caption=caption, marker=group_marker("image"))}],
                          outputs={"image": [caption]}, meta={"image_id": image_id, "caption": caption})
        prompt = "<image>" + (f"\n{self.config.caption_prompt}" if self.config.caption_prompt else "")
        return Sample(id=f"easy_vqa/{split}/image/{image_id}",
                      messages=[{"role": "user", "content": prompt},
                                {"role": "assistant", "content": self.caption(image_id)}],
                      media={"image": [self.image_path(image_id)]}, meta={"image_id": image_id})
