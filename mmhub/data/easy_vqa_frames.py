"""The easy-VQA question grammar's vocabulary: sentence frames per question kind, synonyms and wrappers.

Data only; `mmhub.data.easy_vqa_grammar` turns it into constructions, realises questions and computes answers
(its docstring gives the conventions: negation inside the clause vs confirmation questions, and/or, choices).
`FRAMES` maps (kind, negated) to (direct question, embedded form or None); `CONFIRM_FRAMES` maps a kind to
negative questions asking to confirm the positive statement ("isn't the figure a circle?"), answered as the
un-negated frames.
"""

from __future__ import annotations

from mmhub.data.easy_vqa import COLORS

# Slots: {img} the image ("the picture"; "the first image" in a two-image conversation), {noun} {a_noun} {nouns}
# a generic object word, {cnoun} a colour word, {coloured}, {a_shape} {shape} {shapes} {shape_adj} the asked shape,
# {color} the asked colour, {opts} a choice's options, {imgs} {imgw} image words (plural / bare).
FRAMES: dict[tuple[str, bool], list[tuple[str, str | None]]] = {
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
CONFIRM_FRAMES: dict[str, list[str]] = {
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
OTHER_REFS = ("the other one", "the other {imgw}")
# Elliptical follow-ups: the previous question asked again, with only what changes said.
# - about the image just shown (the second image's first turn):
ELLIPSIS_THIS = ("and this one?", "what about this one?", "same question.", "how about this {imgw}?", "and here?",
                 "same question for this {imgw}.", "and now?", "what about now?", "and this {imgw}?",
                 "same question, this {imgw}.")
# - about the other image ({ref} names it):
ELLIPSIS_REF = ("and {ref}?", "what about {ref}?", "same question for {ref}.", "how about {ref}?",
                "and in {ref}?", "same for {ref}?", "now {ref}: same question.")
# - the same image, another value of the asked attribute ({value}: "a triangle", "blue"):
ELLIPSIS_VALUE = ("and {value}?", "what about {value}?", "how about {value}?", "and {value}, then?",
                  "{value}?", "what about {value} instead?")
# - the same image, the other attribute (after a shape question, its colour; after a colour question, its shape):
ELLIPSIS_ATTRIBUTE = {
    "color": ("and its {cnoun}?", "and the {cnoun}?", "what {cnoun} is it, then?", "and what {cnoun}?",
              "which {cnoun}, though?", "its {cnoun}?"),
    "shape": ("and its shape?", "and the shape?", "what shape is it, then?", "and which shape?",
              "what kind of shape, though?", "its shape?"),
}
# Comparisons asked when the second image is shown ("this one" is the new image, "the first" the earlier one).
COMPARE_THIS = {
    ("same_shape", False): ("is this one the same shape as the first?",
                            "does this {noun} have the same shape as the one before?", "same shape as before?",
                            "is it shaped like the first one?"),
    ("same_shape", True): ("is this one a different shape from the first?", "is this {noun} shaped differently?"),
    ("same_color", False): ("is this one the same {cnoun} as the first?",
                            "does this {noun} have the same {cnoun} as the previous one?", "same {cnoun} as before?",
                            "is it {coloured} like the first one?"),
    ("same_color", True): ("is this one a different {cnoun} from the first?", "does this {noun} differ in {cnoun}?"),
}
EMBED_SHARE, PREFIX_SHARE, CAPITAL_SHARE, BARE_SHARE = 0.35, 0.15, 0.6, 0.1
