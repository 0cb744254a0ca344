"""A compositional question grammar over easy-VQA images: many wordings per question, one answer from the image.

Every question is a logical `Form` (what is asked: the shape, the colour, whether a proposition holds) realised
by one of many `Construction`\\ s (sentence frames), with synonyms (shape/figure/object/thing/item;
colour/color/hue/shade; circle/round shape/disc, rectangle/rectangular shape/box, triangle/triangular
shape/three-sided shape; gray/grey), polite and indirect wrappers ("could you tell me whether ...", "I'd like
to know what colour ..."), casing and punctuation. The answer is computed from the image's facts by `answer`,
never from the wording, and stays canonical: ``yes``/``no``, one of the 3 shapes, one of the 8 colours.

Conventions:

* A yes/no answer says whether the asked proposition holds. Negated questions ask a negated proposition:
  "is there no circle?" and "does the picture lack a circle?" are answered ``yes`` when there is no circle.
  Negative questions asking for confirmation ("isn't the shape a circle?", "doesn't the picture show a red
  disc?", tag questions "the figure is round, isn't it?") put forward the positive statement the asker expects,
  as in ordinary English: they are answered ``yes`` when it is a circle (constructions ``KIND-confirm/N``).
* ``and``: both the colour and the shape hold; ``or``: at least one holds (the frames say "or both" /
  "either ... or" so the question is a yes/no one, not a choice).
* Choice questions ("is it a disc or a triangle?") are answered with the canonical shape or colour, which is
  always among the options.
* What-questions may name the image's true colour or shape ("which figure is red?" -> ``circle``), never a
  false one.
* Indirect questions are answered as the question they embed: "do you know what colour the disc is?" -> ``red``,
  "could you tell me whether there is a box?" -> ``yes``/``no``.
* No count questions ("how many ...?"): their answers would leave the canonical set; presence covers them.

Balance (`single_turn`): the answer is drawn first (uniform over yes/no, the shapes or the colours), then an
image and the asked values that make it true, so no construction's wording predicts its answer. Conversations
(`conversation`) ask 2-4 turns about one image or about two (the second shown in turn 2; later turns say
"the first picture" / "the second picture", or compare the two), the second image differing from the first in
whatever the turns could confuse.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

import numpy as np

from mmhub.data.easy_vqa import COLORS, SHAPES
from mmhub.data.easy_vqa_frames import (
    BARE_SHARE,
    CAPITAL_SHARE,
    COLOR_NOUNS,
    COLOR_WORDS,
    COMPARE_THIS,
    CONFIRM_FRAMES,
    ELLIPSIS_ATTRIBUTE,
    ELLIPSIS_REF,
    ELLIPSIS_THIS,
    ELLIPSIS_VALUE,
    EMBED_SHARE,
    EMBEDDING_WRAPPERS,
    FIRST_REFS,
    FOLLOW_UPS,
    FRAMES,
    IMAGE_WORDS,
    INTROS,
    NOUNS,
    OTHER_REFS,
    PREFIX_SHARE,
    PREFIXES,
    SECOND_REFS,
    SHAPE_ADJECTIVES,
    SHAPE_WORDS,
)

Facts = tuple[str, str]  # (shape, colour) of one image

QUESTION_TYPE = {"has_shape": "yes_no", "has_color": "yes_no", "has_both": "yes_no", "and": "yes_no",
                 "or": "yes_no", "same_shape": "yes_no", "same_color": "yes_no", "what_shape": "shape",
                 "choose_shape": "shape", "what_color": "color", "choose_color": "color"}


@dataclass(frozen=True)
class Form:
    """What a question asks, independent of its wording (``image``: which image of the conversation, 0 or 1)."""

    kind: str
    shape: str | None = None
    color: str | None = None
    negated: bool = False
    options: tuple[str, ...] = ()
    image: int = 0

    @property
    def question_type(self) -> str:
        """``yes_no``, ``shape`` or ``color``: the kind of answer the question takes."""
        return QUESTION_TYPE[self.kind]


def answer(form: Form, facts: Sequence[Facts]) -> str:
    """The canonical answer of `form` on the conversation's images' `facts` (``[(shape, colour), ...]``)."""
    shape, color = facts[form.image]
    if form.question_type == "shape":
        return shape
    if form.question_type == "color":
        return color
    if form.kind in ("same_shape", "same_color"):
        k = 0 if form.kind == "same_shape" else 1
        held = facts[0][k] == facts[1][k]
    else:
        has_shape, has_color = shape == form.shape, color == form.color
        held = {"has_shape": has_shape, "has_color": has_color, "has_both": has_shape and has_color,
                "and": has_shape and has_color, "or": has_shape or has_color}[form.kind]
    return "yes" if held != form.negated else "no"


@dataclass(frozen=True)
class Construction:
    """One sentence frame of a `Form` kind: the direct question and, where English has one, its embedded form."""

    id: str
    kind: str
    direct: str
    embedded: str | None
    negated: bool = False

    @property
    def names_shape(self) -> bool:
        """Whether the frame says the asked shape (in any of its slots)."""
        return any(self.needs(s) for s in ("a_shape", "shape", "shapes", "shape_adj"))

    def needs(self, slot: str) -> bool:
        key = "{" + slot + "}"
        return key in self.direct or (self.embedded is not None and key in self.embedded)


def _constructions() -> dict[str, list[Construction]]:
    out: dict[str, list[Construction]] = {}
    for (kind, negated), frames in FRAMES.items():
        for k, (direct, embedded) in enumerate(frames):
            cid = f"{kind}{'-not' if negated else ''}/{k}"
            out.setdefault(kind, []).append(Construction(cid, kind, direct, embedded, negated))
    for kind, frames in CONFIRM_FRAMES.items():
        for k, direct in enumerate(frames):
            out[kind].append(Construction(f"{kind}-confirm/{k}", kind, direct, None, False))
    return out


CONSTRUCTIONS: dict[str, list[Construction]] = _constructions()
SINGLE_IMAGE_KINDS = {"yes_no": ("has_shape", "has_color", "has_both", "and", "or"),
                      "shape": ("what_shape", "choose_shape"), "color": ("what_color", "choose_color")}



def _pick(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _sentence(text: str, capital: bool) -> str:
    return text[0].upper() + text[1:] if capital else text


def _lower_first(text: str) -> str:
    return text if text.startswith(("I ", "I'")) else text[0].lower() + text[1:]


def usable(construction: Construction, form: Form) -> bool:
    """Whether `form` gives every slot `construction` needs (a what-question names only the values it is given)."""
    return ((not construction.names_shape or form.shape is not None)
            and (not construction.needs("color") or form.color is not None)
            and (not construction.needs("opts") or bool(form.options)))


def realize(construction: Construction, form: Form, rng: np.random.Generator, img: str | None = None) -> str:
    """One wording of `form` in `construction`'s frame: synonyms, wrapper, casing and punctuation drawn from `rng`."""
    imgw = _pick(rng, IMAGE_WORDS)
    literal = re.sub(r"\{[^}]*\}", "", construction.direct)  # "what shape does the shape have?" reads badly
    noun, nouns = _pick(rng, NOUNS[1:] if "shape" in literal else NOUNS)
    slots = {"img": img if img is not None else f"{_pick(rng, ('the', 'the', 'this'))} {imgw}", "imgw": imgw,
             "imgs": imgw + "s", "noun": noun, "a_noun": _a(noun), "nouns": nouns, "cnoun": _pick(rng, COLOR_NOUNS),
             "coloured": _pick(rng, ("coloured", "colored"))}
    if form.shape is not None:
        shape, shapes = _pick(rng, SHAPE_WORDS[form.shape])
        slots |= {"shape": shape, "shapes": shapes, "a_shape": _a(shape),
                  "shape_adj": _pick(rng, SHAPE_ADJECTIVES[form.shape])}
    if form.color is not None:
        slots["color"] = _pick(rng, COLOR_WORDS[form.color])
    if form.options:
        if form.question_type == "shape":
            words = [_a(_pick(rng, SHAPE_WORDS[o])[0]) for o in form.options]
        else:
            words = [_pick(rng, COLOR_WORDS[o]) for o in form.options]
        slots["opts"] = ", ".join(words[:-1]) + " or " + words[-1]
    if construction.embedded is not None and rng.random() < EMBED_SHARE:
        text = _pick(rng, EMBEDDING_WRAPPERS).format(q=construction.embedded.format(**slots))
    else:
        text = construction.direct.format(**slots)
        if rng.random() < PREFIX_SHARE:
            prefix = _pick(rng, PREFIXES).format(img=slots["img"])
            text = prefix + _sentence(text, prefix.endswith(". "))
    text = _sentence(text, rng.random() < CAPITAL_SHARE)
    return text.rstrip("?.") if rng.random() < BARE_SHARE else text


def fit_form(construction: Construction, facts: Facts, want: str, rng: np.random.Generator, image: int = 0) -> Form:
    """A single-image `Form` for `construction` whose answer on `facts` is `want` (yes/no, or the true value)."""
    shape, color = facts
    kind = construction.kind
    if kind in ("what_shape", "what_color"):
        return Form(kind, shape=shape if construction.names_shape else None,
                    color=color if construction.needs("color") else None, image=image)
    if kind in ("choose_shape", "choose_color"):
        truth, universe = (shape, SHAPES) if kind == "choose_shape" else (color, COLORS)
        others = [v for v in universe if v != truth]
        picked = [truth, *rng.choice(others, size=int(rng.integers(1, 3)), replace=False).tolist()]
        options = tuple(rng.permutation(picked).tolist())
        return Form(kind, shape=shape if construction.names_shape else None, options=options, image=image)
    held = (want == "yes") != construction.negated  # whether the un-negated proposition must hold
    other_shape = str(_pick(rng, [s for s in SHAPES if s != shape]))
    other_color = str(_pick(rng, [c for c in COLORS if c != color]))
    if kind == "has_shape":
        return Form(kind, shape=shape if held else other_shape, negated=construction.negated, image=image)
    if kind == "has_color":
        return Form(kind, color=color if held else other_color, negated=construction.negated, image=image)
    if kind in ("has_both", "and"):
        pairs = [(shape, color)] if held else [(shape, other_color), (other_shape, color), (other_shape, other_color)]
    else:  # or
        pairs = [(shape, other_color), (other_shape, color), (shape, color)] if held else [(other_shape, other_color)]
    s, c = _pick(rng, pairs)
    return Form(kind, shape=s, color=c, negated=construction.negated, image=image)


@dataclass
class Turn:
    """One question and its answer: ``user`` is the message (with ``<image>`` where an image is shown)."""

    question: str
    answer: str
    form: Form
    construction: str
    image_id: int
    user: str = ""


@dataclass
class ImagePool:
    """The images to ask about: id -> (shape, colour), indexed by answer and by (shape, colour) pair."""

    facts: Mapping[int, Facts]
    ids: list[int] = field(init=False)
    by_answer: dict[tuple[str, str], list[int]] = field(init=False)
    by_pair: dict[Facts, list[int]] = field(init=False)

    def __post_init__(self) -> None:
        self.ids = sorted(self.facts)
        if not self.ids:
            raise ValueError("ImagePool: no images; give at least one image id -> (shape, colour)")
        self.by_answer, self.by_pair = {}, {}
        for i in self.ids:
            shape, color = self.facts[i]
            if shape not in SHAPES or color not in COLORS:
                raise ValueError(f"ImagePool: image {i} has facts {(shape, color)}; shapes are {SHAPES}, "
                                 f"colours {COLORS}")
            self.by_answer.setdefault(("shape", shape), []).append(i)
            self.by_answer.setdefault(("color", color), []).append(i)
            self.by_pair.setdefault((shape, color), []).append(i)

    def image_with(self, rng: np.random.Generator, *, same: Facts | None = None,
                   keep: tuple[bool, bool] = (False, False), avoid: int | None = None) -> int:
        """An image whose shape / colour equal `same`'s where `keep` says so and differ from it elsewhere."""
        if same is None:
            return _pick(rng, self.ids)
        pairs = [p for p in self.by_pair if all((p[k] == same[k]) == keep[k] for k in (0, 1))]
        choices = [i for p in pairs for i in self.by_pair[p] if i != avoid]
        if not choices:  # a pool too small for the constraint: any other image
            choices = [i for i in self.ids if i != avoid] or self.ids
        return _pick(rng, choices)


def _question(pool: ImagePool, rng: np.random.Generator, qtype: str, images: Sequence[int], image: int = 0,
              img: str | None = None) -> Turn:
    """A question of `qtype` about ``images[image]`` (`img`: how the text refers to it, when it must say which)."""
    facts = [pool.facts[i] for i in images]
    construction = _pick(rng, [c for k in SINGLE_IMAGE_KINDS[qtype] for c in CONSTRUCTIONS[k]])
    want = _pick(rng, ("yes", "no")) if qtype == "yes_no" else ""
    form = fit_form(construction, facts[image], want, rng, image)
    if img is not None and "{img}" not in construction.direct:
        text = f"In {img}, " + _lower_first(realize(construction, form, rng))
    else:
        text = realize(construction, form, rng, img)
    return Turn(text, answer(form, facts), form, construction.id, images[image])


def single_turn(pool: ImagePool, rng: np.random.Generator, qtype: str | None = None) -> Turn:
    """One question about one image, its answer drawn first (balanced per answer), then the image and wording."""
    qtype = qtype or _pick(rng, ("yes_no", "yes_no", "shape", "color"))
    if qtype == "yes_no":
        image_id = _pick(rng, pool.ids)
    else:
        universe = SHAPES if qtype == "shape" else COLORS
        present = [v for v in universe if (qtype, v) in pool.by_answer]
        image_id = _pick(rng, pool.by_answer[qtype, _pick(rng, present)])
    turn = _question(pool, rng, qtype, [image_id])
    turn.user = "<image>\n" + turn.question
    return turn


def _qtype(rng: np.random.Generator) -> str:
    return _pick(rng, ("yes_no", "yes_no", "shape", "color"))


def _follow_up(text: str, rng: np.random.Generator) -> str:
    prefix = _pick(rng, FOLLOW_UPS)
    return prefix + _lower_first(text) if prefix else text


def _say(frames: Sequence[str], rng: np.random.Generator, **slots: str) -> tuple[int, str]:
    """One of `frames` (its index and text), filled, capitalised at random."""
    k = int(rng.integers(len(frames)))
    slots = {"imgw": _pick(rng, IMAGE_WORDS), "cnoun": _pick(rng, COLOR_NOUNS), "noun": _pick(rng, NOUNS)[0],
             "coloured": _pick(rng, ("coloured", "colored"))} | slots
    return k, _sentence(frames[k].format(**slots), rng.random() < CAPITAL_SHARE)


def _on_other_image(form: Form, facts: Sequence[Facts]) -> Form | None:
    """`form` asked about the other image, or None when that would not be a fair question (a what-question naming
    a value the other image lacks, a choice whose options miss its answer, a comparison)."""
    other = 1 - form.image
    shape, color = facts[other]
    if form.kind.startswith("same_"):
        return None
    if form.kind in ("what_shape", "what_color"):
        if (form.shape not in (None, shape)) or (form.color not in (None, color)):
            return None
    if form.kind in ("choose_shape", "choose_color"):
        truth = shape if form.kind == "choose_shape" else color
        if truth not in form.options or form.shape not in (None, shape):
            return None
    return replace(form, image=other)


def _repeat_turn(prev: Turn, facts: Sequence[Facts], images: Sequence[int], rng: np.random.Generator,
                 shown: bool) -> Turn | None:
    """The previous question asked again about the other image, elliptically: "And this one?" when that image was
    just shown (`shown`), else "What about the first picture?"."""
    form = _on_other_image(prev.form, facts)
    if form is None:
        return None
    if shown:
        k, text = _say(ELLIPSIS_THIS, rng)
        cid = f"ellipsis-this/{k}"
    else:
        refs = (FIRST_REFS if form.image == 0 else SECOND_REFS) + OTHER_REFS
        k, text = _say(ELLIPSIS_REF, rng, ref=_pick(rng, refs).format(imgw=_pick(rng, IMAGE_WORDS)))
        cid = f"ellipsis-ref/{k}"
    return Turn(text, answer(form, facts), form, cid, images[form.image], text)


def _same_image_ellipsis(prev: Turn, facts: Sequence[Facts], images: Sequence[int],
                         rng: np.random.Generator) -> Turn | None:
    """A follow-up about the same image that says only what changes: another value of a yes/no question's
    attribute ("And a triangle?") or the other attribute after a shape or colour question ("And its colour?")."""
    f = prev.form
    options = []
    if f.kind in ("has_shape", "has_color") and not f.negated:
        options.append("value")
    if f.kind in ("has_shape", "what_shape", "choose_shape", "has_color", "what_color", "choose_color"):
        options.append("attribute")
    if not options:
        return None
    if _pick(rng, options) == "value":
        shape, color = facts[f.image]
        if f.kind == "has_shape":  # the new value is the true one half the time (when the old one was not)
            others = [v for v in SHAPES if v != f.shape]
            new = shape if shape in others and rng.random() < 0.5 else str(_pick(rng, others))
            form = Form("has_shape", shape=new, image=f.image)
            value = _a(_pick(rng, SHAPE_WORDS[new])[0])
        else:
            others = [v for v in COLORS if v != f.color]
            new = color if color in others and rng.random() < 0.5 else str(_pick(rng, others))
            form = Form("has_color", color=new, image=f.image)
            value = _pick(rng, COLOR_WORDS[new])
        k, text = _say(ELLIPSIS_VALUE, rng, value=value)
        cid = f"ellipsis-value/{k}"
    else:
        asked = "color" if f.kind.endswith("shape") else "shape"
        form = Form("what_color" if asked == "color" else "what_shape", image=f.image)
        k, text = _say(ELLIPSIS_ATTRIBUTE[asked], rng)
        cid = f"ellipsis-attribute/{k}"
    return Turn(text, answer(form, facts), form, cid, images[f.image], text)


COMPARE_THIS_CONSTRUCTIONS = {kind: [Construction(f"{kind}{'-not' if neg else ''}-this/{k}", kind, frame, None, neg)
                                     for (kk, neg), frames in COMPARE_THIS.items() if kk == kind
                                     for k, frame in enumerate(frames)]
                              for kind in ("same_shape", "same_color")}


def conversation(pool: ImagePool, rng: np.random.Generator, max_turns: int = 4, cross_image: float = 0.5,
                 ellipsis: float = 0.0, compare: float = 0.5) -> tuple[list[int], list[Turn]]:
    """2..`max_turns` turns about one image, or (share `cross_image`) about two: ``(image ids, turns)``.

    A follow-up is elliptical with probability `ellipsis` where one fits ("And a triangle?", "And its colour?",
    "And this one?", "What about the first picture?"); a two-image conversation compares the images in one turn
    with probability `compare` (when the second image is shown, "Is this one the same colour as the first?", or
    later, "Do the two pictures show the same shape?"), its answer drawn first."""
    n = int(rng.integers(2, max(2, max_turns) + 1))
    first = pool.image_with(rng)
    if rng.random() >= cross_image:
        facts1 = [pool.facts[first]]
        turns = [_question(pool, rng, _qtype(rng), [first])]
        turns[0].user = "<image>\n" + turns[0].question
        for _ in range(1, n):
            t = _same_image_ellipsis(turns[-1], facts1, [first], rng) if rng.random() < ellipsis else None
            if t is None:
                t = _question(pool, rng, _qtype(rng), [first])
                t.question = t.user = _follow_up(t.question, rng)
            turns.append(t)
        return [first], turns
    a = pool.facts[first]
    compare_at = None
    if rng.random() < compare:
        compare_at = 1 if n < 3 or rng.random() < 0.4 else int(rng.integers(2, n))
    keep = (False, False)
    if compare_at is not None:  # the comparison's answer is drawn first; the second image is chosen to give it
        kind = _pick(rng, ("same_shape", "same_color"))
        construction = _pick(rng, COMPARE_THIS_CONSTRUCTIONS[kind] if compare_at == 1 else CONSTRUCTIONS[kind])
        same = (_pick(rng, ("yes", "no")) == "yes") != construction.negated
        keep = (same, False) if kind == "same_shape" else (False, same)
    second = pool.image_with(rng, same=a, keep=keep, avoid=first)
    images = [first, second]
    facts = [a, pool.facts[second]]
    turns = [_question(pool, rng, _qtype(rng), images)]
    turns[0].user = "<image>\n" + turns[0].question
    for k in range(1, n):
        t = None
        if k == compare_at:
            form = Form(kind, negated=construction.negated)
            text = realize(construction, form, rng)
            if k > 1:
                text = _follow_up(text, rng)
            t = Turn(text, answer(form, facts), form, construction.id, second, text)
        elif rng.random() < ellipsis:
            t = _repeat_turn(turns[-1], facts, images, rng, shown=k == 1)
        if t is None and k == 1:
            t = _question(pool, rng, _qtype(rng), images, image=1)
        if t is None:
            image = int(rng.integers(2))
            qtype = _qtype(rng)
            if qtype != "yes_no" and facts[0][qtype == "color"] == facts[1][qtype == "color"]:
                qtype = "yes_no"  # the two images agree on this attribute: a what-question would not tell them apart
            ref = _pick(rng, FIRST_REFS if image == 0 else SECOND_REFS).format(imgw=_pick(rng, IMAGE_WORDS))
            t = _question(pool, rng, qtype, images, image=image, img=ref)
            t.question = t.user = _follow_up(t.question, rng)
        if k == 1:
            intro = _pick(rng, INTROS).format(imgw=_pick(rng, IMAGE_WORDS))
            t.user = f"{intro}\n<image>\n{t.question}"
        turns.append(t)
    return images, turns


def paraphrases(form: Form, rng: np.random.Generator, n: int = 20) -> list[str]:
    """`n` wordings of one `form` (constructions of its kind and negation that can say it); answers are all one."""
    frames = [c for c in CONSTRUCTIONS[form.kind] if c.negated == form.negated and usable(c, form)]
    if not frames:
        raise ValueError(f"no construction can word {form}; give the values its kind's frames need")
    return [realize(_pick(rng, frames), form, rng) for _ in range(n)]
