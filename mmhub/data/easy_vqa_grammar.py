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
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from mmhub.data.easy_vqa import COLORS, SHAPES

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


# Slots: {img} the image ("the picture"; "the first image" in a two-image conversation), {noun} {a_noun} {nouns}
# a generic object word, {cnoun} a colour word, {coloured}, {a_shape} {shape} {shapes} {shape_adj} the asked shape,
# {color} the asked colour, {opts} a choice's options, {imgs} {imgw} image words (plural / bare).
_FRAMES: dict[tuple[str, bool], list[tuple[str, str | None]]] = {
    ("has_shape", False): [
        ("is there {a_shape} in {img}?", "whether there is {a_shape} in {img}"),
        ("can you see {a_shape}?", "whether you can see {a_shape}"),
        ("do you spot {a_shape} in {img}?", "if you spot {a_shape} in {img}"),
        ("does {img} contain {a_shape}?", "whether {img} contains {a_shape}"),
        ("is {a_shape} shown in {img}?", "whether {a_shape} is shown in {img}"),
        ("are there any {shapes} in {img}?", "whether there are any {shapes} in {img}"),
        ("is the {noun} {a_shape}?", "whether the {noun} is {a_shape}"),
        ("is the {noun} in {img} {shape_adj}?", "if the {noun} in {img} is {shape_adj}"),
        ("does {img} show {a_shape}?", "whether {img} shows {a_shape}"),
        ("is {a_shape} visible in {img}?", "whether {a_shape} is visible in {img}"),
        ("is there {a_shape} anywhere in {img}?", None),
        ("do you see {a_shape} here?", "whether you see {a_shape} here"),
        ("has {img} got {a_shape} in it?", None),
        ("is it {a_shape}?", "whether it is {a_shape}"),
        ("is there any {shape} in {img}?", "whether there is any {shape} in {img}"),
        ("does the {noun} have a {shape_adj} form?", "whether the {noun} has a {shape_adj} form"),
        ("would you say the {noun} is {shape_adj}?", None),
    ],
    ("has_shape", True): [
        ("is there no {shape} in {img}?", "whether there is no {shape} in {img}"),
        ("does {img} lack {a_shape}?", "whether {img} lacks {a_shape}"),
        ("is {img} without {a_shape}?", "whether {img} is without {a_shape}"),
        ("is the {noun} not {a_shape}?", "whether the {noun} is not {a_shape}"),
        ("is the {noun} something other than {a_shape}?", "whether the {noun} is something other than {a_shape}"),
        ("is {a_shape} absent from {img}?", "whether {a_shape} is absent from {img}"),
        ("is it true that there is no {shape} in {img}?", None),
        ("are there no {shapes} in {img}?", "whether there are no {shapes} in {img}"),
        ("is {img} free of {shapes}?", "whether {img} is free of {shapes}"),
        ("does {img} not contain {a_shape}?", "whether {img} does not contain {a_shape}"),
        ("is the {noun} not {shape_adj}?", "if the {noun} is not {shape_adj}"),
        ("is it correct that {img} has no {shape}?", None),
        ("is {a_shape} missing from {img}?", "whether {a_shape} is missing from {img}"),
    ],
    ("has_color", False): [
        ("is there a {color} {noun} in {img}?", "whether there is a {color} {noun} in {img}"),
        ("is the {noun} {color}?", "whether the {noun} is {color}"),
        ("is there anything {color} in {img}?", "whether there is anything {color} in {img}"),
        ("is there any {color} {noun} in {img}?", "whether there is any {color} {noun} in {img}"),
        ("can you see something {color}?", "whether you can see something {color}"),
        ("do you spot anything {color}?", "if you spot anything {color}"),
        ("does {img} contain a {color} {noun}?", "whether {img} contains a {color} {noun}"),
        ("is the {cnoun} of the {noun} {color}?", "whether the {cnoun} of the {noun} is {color}"),
        ("is the {noun} {coloured} {color}?", "whether the {noun} is {coloured} {color}"),
        ("is {color} the {cnoun} of the {noun}?", "whether {color} is the {cnoun} of the {noun}"),
        ("does the {noun} have a {color} {cnoun}?", "whether the {noun} has a {color} {cnoun}"),
        ("is the {noun} painted {color}?", "whether the {noun} is painted {color}"),
        ("is it {color}?", "whether it is {color}"),
        ("is any {noun} in {img} {color}?", "whether any {noun} in {img} is {color}"),
        ("is something {color} shown?", None),
        ("does {img} have anything {color} in it?", None),
    ],
    ("has_color", True): [
        ("is there no {color} {noun} in {img}?", "whether there is no {color} {noun} in {img}"),
        ("is the {noun} not {color}?", "whether the {noun} is not {color}"),
        ("is nothing in {img} {color}?", "whether nothing in {img} is {color}"),
        ("is the {noun} a {cnoun} other than {color}?", "whether the {noun} is a {cnoun} other than {color}"),
        ("does {img} lack anything {color}?", "whether {img} lacks anything {color}"),
        ("is {img} free of {color}?", "whether {img} is free of {color}"),
        ("is it true that the {noun} is not {color}?", None),
        ("is {color} missing from {img}?", "whether {color} is missing from {img}"),
        ("is the {noun} anything but {color}?", "whether the {noun} is anything but {color}"),
        ("does the {noun} not have a {color} {cnoun}?", None),
        ("is there nothing {color} in {img}?", "whether there is nothing {color} in {img}"),
        ("is the {noun} {coloured} something other than {color}?", None),
    ],
    ("has_both", False): [
        ("is there a {color} {shape} in {img}?", "whether there is a {color} {shape} in {img}"),
        ("can you see a {color} {shape}?", "whether you can see a {color} {shape}"),
        ("do you spot a {color} {shape}?", "if you spot a {color} {shape}"),
        ("does {img} contain a {color} {shape}?", "whether {img} contains a {color} {shape}"),
        ("is the {noun} a {color} {shape}?", "whether the {noun} is a {color} {shape}"),
        ("is it a {color} {shape}?", None),
        ("is there any {color} {shape} in {img}?", None),
        ("is a {color} {shape} shown?", "whether a {color} {shape} is shown"),
    ],
    ("has_both", True): [
        ("is there no {color} {shape} in {img}?", "whether there is no {color} {shape} in {img}"),
        ("does {img} lack a {color} {shape}?", "whether {img} lacks a {color} {shape}"),
        ("is the {noun} something other than a {color} {shape}?",
         "whether the {noun} is something other than a {color} {shape}"),
        ("is it true that {img} has no {color} {shape}?", None),
        ("is a {color} {shape} absent from {img}?", "whether a {color} {shape} is absent from {img}"),
    ],
    ("and", False): [
        ("is the {noun} {color} and {shape_adj}?", "whether the {noun} is {color} and {shape_adj}"),
        ("is the {noun} both {color} and {a_shape}?", "whether the {noun} is both {color} and {a_shape}"),
        ("is it {color}, and is it {a_shape}?", None),
        ("is the {noun} {a_shape} and is it {color}?", None),
        ("is the {noun} {shape_adj} and {coloured} {color}?",
         "whether the {noun} is {shape_adj} and {coloured} {color}"),
        ("is the {cnoun} {color} and the {noun} {a_shape}?", None),
        ("does {img} show {a_shape} that is {color}?", "whether {img} shows {a_shape} that is {color}"),
    ],
    ("or", False): [
        ("is the {noun} {color} or {shape_adj}, or both?", "whether the {noun} is {color} or {shape_adj}, or both"),
        ("is the {noun} either {color} or {a_shape}?", "whether the {noun} is either {color} or {a_shape}"),
        ("is at least one true: the {noun} is {color}, or it is {a_shape}?", None),
        ("is there anything {color} or anything {shape_adj} in {img}?",
         "whether there is anything {color} or anything {shape_adj} in {img}"),
        ("does {img} show something {color} or {a_shape}, or both?",
         "whether {img} shows something {color} or {a_shape}, or both"),
        ("is it true that the {noun} is {color} or {shape_adj} (or both)?", None),
    ],
    ("what_shape", False): [
        ("what shape is in {img}?", "what shape is in {img}"),
        ("which {noun} is {color}?", "which {noun} is {color}"),
        ("what is the {color} {noun}?", "what the {color} {noun} is"),
        ("what kind of {noun} is shown?", "what kind of {noun} is shown"),
        ("what shape does the {noun} have?", "what shape the {noun} has"),
        ("name the shape in {img}.", None),
        ("which shape do you see?", "which shape you see"),
        ("the {color} {noun} is what shape?", None),
        ("what form does the {noun} take?", "what form the {noun} takes"),
        ("identify the shape of the {color} {noun}.", None),
        ("what geometric shape can you see?", "what geometric shape you can see"),
        ("what is the shape of the {noun}?", "what the shape of the {noun} is"),
        ("which {noun} has a {color} {cnoun}?", "which {noun} has a {color} {cnoun}"),
        ("what shape is the {color} {noun}?", "what shape the {color} {noun} is"),
        ("which shape is drawn in {color}?", "which shape is drawn in {color}"),
        ("what {noun} do you see in {img}?", "what {noun} you see in {img}"),
    ],
    ("choose_shape", False): [
        ("is the {noun} {opts}?", None),
        ("which is it, {opts}?", None),
        ("is it {opts}?", None),
        ("which of these is in {img}: {opts}?", "which of these is in {img}: {opts}"),
        ("{opts}: which one is shown?", None),
    ],
    ("what_color", False): [
        ("what {cnoun} is the {shape}?", "what {cnoun} the {shape} is"),
        ("what {cnoun} is the {noun}?", "what {cnoun} the {noun} is"),
        ("which {cnoun} does the {shape} have?", "which {cnoun} the {shape} has"),
        ("what is the {cnoun} of the {noun}?", "what the {cnoun} of the {noun} is"),
        ("how is the {shape} {coloured}?", "how the {shape} is {coloured}"),
        ("the {shape} is what {cnoun}?", None),
        ("name the {cnoun} of the {shape}.", None),
        ("what {cnoun} is the {shape_adj} {noun}?", "what {cnoun} the {shape_adj} {noun} is"),
        ("in what {cnoun} is the {noun} drawn?", "in what {cnoun} the {noun} is drawn"),
        ("which {cnoun} do you see in {img}?", "which {cnoun} you see in {img}"),
        ("what {cnoun} has the {shape} got?", None),
        ("what is the {shape}'s {cnoun}?", "what the {shape}'s {cnoun} is"),
        ("what {cnoun} is used for the {noun}?", "what {cnoun} is used for the {noun}"),
    ],
    ("choose_color", False): [
        ("is the {noun} {opts}?", None),
        ("which is it, {opts}?", None),
        ("is the {shape} {opts}?", None),
        ("which {cnoun} is the {noun}: {opts}?", "which {cnoun} the {noun} is: {opts}"),
    ],
    ("same_shape", False): [
        ("do the two {imgs} show the same shape?", "whether the two {imgs} show the same shape"),
        ("is the {noun} in the first {imgw} the same shape as the one in the second?",
         "whether the {noun} in the first {imgw} is the same shape as the one in the second"),
        ("are both {nouns} the same shape?", "whether both {nouns} are the same shape"),
        ("is the shape in the second {imgw} the same as in the first?", None),
    ],
    ("same_shape", True): [
        ("do the two {imgs} show different shapes?", "whether the two {imgs} show different shapes"),
        ("are the {nouns} in the two {imgs} differently shaped?", None),
    ],
    ("same_color", False): [
        ("are the two {nouns} the same {cnoun}?", "whether the two {nouns} are the same {cnoun}"),
        ("do both {imgs} use the same {cnoun}?", "whether both {imgs} use the same {cnoun}"),
        ("is the {noun} in the second {imgw} the same {cnoun} as the one in the first?", None),
        ("is the {cnoun} the same in both {imgs}?", "whether the {cnoun} is the same in both {imgs}"),
    ],
    ("same_color", True): [
        ("are the two {nouns} different {cnoun}s?", "whether the two {nouns} are different {cnoun}s"),
        ("do the {nouns} in the two {imgs} differ in {cnoun}?", None),
    ],
}


# Negative questions asking to confirm the positive statement: answered as the un-negated frames above.
_CONFIRM_FRAMES: dict[str, list[str]] = {
    "has_shape": [
        "isn't the {noun} {a_shape}?", "isn't that {a_shape}?", "doesn't {img} show {a_shape}?",
        "isn't there {a_shape} in {img}?", "don't you see {a_shape} here?", "the {noun} is {a_shape}, isn't it?",
        "there's {a_shape} in {img}, isn't there?", "isn't the {noun} {shape_adj}?",
        "wouldn't you agree the {noun} is {shape_adj}?", "doesn't the {noun} look {shape_adj}?",
        "aren't there any {shapes} in {img}?", "that's {a_shape}, right?",
    ],
    "has_color": [
        "isn't the {noun} {color}?", "isn't it {color}?", "doesn't the {noun} look {color}?",
        "the {noun} is {color}, isn't it?", "isn't there something {color} in {img}?",
        "don't you see anything {color}?", "that {noun} is {color}, right?", "isn't the {cnoun} {color}?",
        "wasn't the {noun} {coloured} {color}?",
    ],
    "has_both": [
        "isn't it a {color} {shape}?", "isn't there a {color} {shape} in {img}?",
        "doesn't {img} show a {color} {shape}?", "that's a {color} {shape}, isn't it?",
        "isn't the {noun} a {color} {shape}?",
    ],
}


def _constructions() -> dict[str, list[Construction]]:
    out: dict[str, list[Construction]] = {}
    for (kind, negated), frames in _FRAMES.items():
        for k, (direct, embedded) in enumerate(frames):
            cid = f"{kind}{'-not' if negated else ''}/{k}"
            out.setdefault(kind, []).append(Construction(cid, kind, direct, embedded, negated))
    for kind, frames in _CONFIRM_FRAMES.items():
        for k, direct in enumerate(frames):
            out[kind].append(Construction(f"{kind}-confirm/{k}", kind, direct, None, False))
    return out


CONSTRUCTIONS: dict[str, list[Construction]] = _constructions()
SINGLE_IMAGE_KINDS = {"yes_no": ("has_shape", "has_color", "has_both", "and", "or"),
                      "shape": ("what_shape", "choose_shape"), "color": ("what_color", "choose_color")}

SHAPE_WORDS = {"circle": (("circle", "circles"), ("round shape", "round shapes"), ("disc", "discs"),
                          ("circular shape", "circular shapes")),
               "rectangle": (("rectangle", "rectangles"), ("rectangular shape", "rectangular shapes"),
                             ("box", "boxes")),
               "triangle": (("triangle", "triangles"), ("triangular shape", "triangular shapes"),
                            ("three-sided shape", "three-sided shapes"))}
SHAPE_ADJECTIVES = {"circle": ("round", "circular"), "rectangle": ("rectangular",),
                    "triangle": ("triangular", "three-sided")}
COLOR_WORDS = {c: (c,) for c in COLORS} | {"gray": ("gray", "grey")}
NOUNS = (("shape", "shapes"), ("figure", "figures"), ("object", "objects"), ("thing", "things"), ("item", "items"))
COLOR_NOUNS = ("colour", "color", "hue", "shade")
IMAGE_WORDS = ("image", "picture", "drawing", "scene")
EMBEDDING_WRAPPERS = ("could you tell me {q}?", "can you tell me {q}?", "I'd like to know {q}.", "please tell me {q}.",
                      "do you know {q}?", "I wonder {q}.", "would you mind telling me {q}?", "tell me {q}.",
                      "let me know {q}.", "I want to know {q}.", "could you check {q}?", "I'm curious {q}.")
PREFIXES = ("Quick question: ", "Look at {img}. ", "Please answer: ", "Hey, ", "One question: ", "Tell me, ",
            "Question: ")
FOLLOW_UPS = ("And ", "Also, ", "Next: ", "One more: ", "What about this: ", "Now, ", "")
INTROS = ("Here is another {imgw}.", "Now look at this one.", "And this {imgw}:", "Next {imgw}:", "Another one:",
          "Let's look at a second {imgw}.")
FIRST_REFS = ("the first {imgw}", "the earlier {imgw}", "the first one")
SECOND_REFS = ("the second {imgw}", "the new {imgw}", "the latest {imgw}")
EMBED_SHARE, PREFIX_SHARE, CAPITAL_SHARE, BARE_SHARE = 0.35, 0.15, 0.6, 0.1


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


def conversation(pool: ImagePool, rng: np.random.Generator, max_turns: int = 4,
                 cross_image: float = 0.5) -> tuple[list[int], list[Turn]]:
    """2..`max_turns` turns about one image, or (share `cross_image`) about two: ``(image ids, turns)``."""
    n = int(rng.integers(2, max(2, max_turns) + 1))
    first = pool.image_with(rng)
    if rng.random() >= cross_image:
        turns = [_question(pool, rng, _qtype(rng), [first]) for _ in range(n)]
        turns[0].user = "<image>\n" + turns[0].question
        for t in turns[1:]:
            t.question = _follow_up(t.question, rng)
            t.user = t.question
        return [first], turns
    a = pool.facts[first]
    compare_at = int(rng.integers(2, n)) if n >= 3 and rng.random() < 0.5 else None
    keep = (False, False)
    if compare_at is not None:  # the comparison's answer is drawn first; the second image is chosen to give it
        kind = _pick(rng, ("same_shape", "same_color"))
        construction = _pick(rng, CONSTRUCTIONS[kind])
        same = (_pick(rng, ("yes", "no")) == "yes") != construction.negated
        keep = (same, False) if kind == "same_shape" else (False, same)
    second = pool.image_with(rng, same=a, keep=keep, avoid=first)
    facts = [a, pool.facts[second]]
    turns = [_question(pool, rng, _qtype(rng), [first, second])]
    turns[0].user = "<image>\n" + turns[0].question
    t = _question(pool, rng, _qtype(rng), [first, second], image=1)
    intro = _pick(rng, INTROS).format(imgw=_pick(rng, IMAGE_WORDS))
    t.user = f"{intro}\n<image>\n{t.question}"
    turns.append(t)
    for k in range(2, n):
        if k == compare_at:
            form = Form(kind, negated=construction.negated)
            text = _follow_up(realize(construction, form, rng), rng)
            turns.append(Turn(text, answer(form, facts), form, construction.id, second, text))
            continue
        image = int(rng.integers(2))
        qtype = _qtype(rng)
        if qtype != "yes_no" and facts[0][qtype == "color"] == facts[1][qtype == "color"]:
            qtype = "yes_no"  # the two images agree on this attribute: a what-question would not tell them apart
        ref = _pick(rng, FIRST_REFS if image == 0 else SECOND_REFS).format(imgw=_pick(rng, IMAGE_WORDS))
        t = _question(pool, rng, qtype, [first, second], image=image, img=ref)
        t.question = t.user = _follow_up(t.question, rng)
        turns.append(t)
    return [first, second], turns


def paraphrases(form: Form, rng: np.random.Generator, n: int = 20) -> list[str]:
    """`n` wordings of one `form` (constructions of its kind and negation that can say it); answers are all one."""
    frames = [c for c in CONSTRUCTIONS[form.kind] if c.negated == form.negated and usable(c, form)]
    if not frames:
        raise ValueError(f"no construction can word {form}; give the values its kind's frames need")
    return [realize(_pick(rng, frames), form, rng) for _ in range(n)]
