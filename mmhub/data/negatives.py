"""Pictures that are not easy-VQA scenes, the questions asked about them and the reply that declines.

A model trained only on easy-VQA describes any picture as coloured shapes ("a black triangle" for an astronaut).
Training samples made here teach it to say what it can answer instead. `negative_image` draws one picture from
a seeded generator, of one of these kinds:

* ``photo``: a random crop (30-100% of the side), flip, rotation by a multiple of 90 degrees and colour jitter of
  one of the bundled photos in `TRAIN_PHOTOS` (`mmhub.data.photos`): never one of the held-out evaluation photos
  (`mmhub/recipes/heldout/photos.json`, checked by the tests);
* ``noise``: per-pixel colour noise, smooth (upscaled from a few pixels) or fine;
* ``text``: random letters written in a few lines on a plain background;
* ``blank``: one flat colour, any colour;
* ``pattern``: stripes, a checkerboard or a colour gradient.

The question is a grammar question about shapes and colours (as a user would ask of easy-VQA) or an open
request ("describe this photo"), and the answer is always `REFUSAL`. The refusal states the limit in words
`mmhub.evaluation.refusal.is_refusal` recognises ("I can only answer ..."); the detector was written first
and is not tuned to this sentence.
"""

from __future__ import annotations

import functools
import string
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from mmhub.data.photos import load_photo

REFUSAL = "I can only answer questions about pictures of one simple coloured shape, and this is not one of them."
KINDS = ("photo", "noise", "text", "blank", "pattern")
KIND_WEIGHTS = (0.45, 0.15, 0.15, 0.1, 0.15)

# Bundled photos a model may be trained to decline (never the held-out ones of mmhub/recipes/heldout/photos.json).
TRAIN_PHOTOS = (
    "sklearn:flower.jpg", "skimage:stereo_motorcycle", "skimage:clock", "skimage:brick", "skimage:grass",
    "skimage:gravel", "skimage:cell", "skimage:retina", "skimage:microaneurysms", "skimage:horse", "skimage:text",
    "skimage:colorwheel", "skimage:logo", "skimage:shepp_logan_phantom", "skimage:checkerboard",
    "skimage:binary_blobs", "matplotlib:logo2.png", "matplotlib:Minduka_Present_Blue_Pack.png",
)

_OPEN_VERBS = ("describe", "tell me about", "explain", "give me a description of", "what can you say about",
               "summarise", "what is going on in", "what do you notice in")
_OPEN_OBJECTS = ("this photo", "the picture", "this image", "what you see", "the scene", "this", "the photograph")
_OPEN_WH = ("what is this?", "what's in this picture?", "what does this show?", "who is in the photo?",
            "what is the main object here?", "where was this taken?", "what is happening?",
            "what do you see?", "can you identify this?", "what am I looking at?")
SIZE = 128


@functools.lru_cache(maxsize=len(TRAIN_PHOTOS))
def _photo(source: str) -> Image.Image:
    return load_photo(source)


def load_photos(sources: Sequence[str]) -> None:
    """Load (and cache) each photo in `sources` now, so a source that cannot load is named before a run starts."""
    for source in sources:
        _photo(source)


def _pick(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, size=3))


def _photo_crop(rng: np.random.Generator, photos: Sequence[str]) -> Image.Image:
    im = _photo(_pick(rng, photos))
    w, h = im.size
    side = int(min(w, h) * rng.uniform(0.3, 1.0))
    x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    im = im.crop((x, y, x + side, y + side)).resize((SIZE, SIZE), Image.BICUBIC)
    if rng.random() < 0.5:
        im = ImageOps.mirror(im)
    im = im.rotate(90 * int(rng.integers(4)))
    a = np.asarray(im, dtype=np.float32) * rng.uniform(0.7, 1.3, size=3) + rng.uniform(-30, 30)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def _noise(rng: np.random.Generator) -> Image.Image:
    cells = int(_pick(rng, (2, 4, 8, 16, SIZE)))
    a = rng.integers(0, 256, size=(cells, cells, 3), dtype=np.uint8)
    return Image.fromarray(a).resize((SIZE, SIZE), _pick(rng, (Image.NEAREST, Image.BILINEAR, Image.BICUBIC)))


def _text(rng: np.random.Generator) -> Image.Image:
    im = Image.new("RGB", (SIZE, SIZE), _colour(rng))
    draw = ImageDraw.Draw(im)
    ink = _colour(rng)
    for row in range(int(rng.integers(2, 9))):
        word = "".join(rng.choice(list(string.ascii_letters + "     ")) for _ in range(int(rng.integers(4, 22))))
        draw.text((int(rng.integers(0, 20)), 4 + 15 * row), word, fill=ink)
    return im


def _pattern(rng: np.random.Generator) -> Image.Image:
    kind = _pick(rng, ("stripes", "checks", "gradient"))
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    if kind == "gradient":
        t = (x * np.cos(rng.uniform(0, np.pi)) + y * np.sin(rng.uniform(0, np.pi))) / (SIZE * 1.5) + 0.5
        a, b = np.array(_colour(rng)), np.array(_colour(rng))
        out = a * (1 - t[..., None]) + b * t[..., None]
    else:
        period = int(rng.integers(4, 33))
        mask = (x // period) % 2 if kind == "stripes" else ((x // period) + (y // period)) % 2
        out = np.where(mask[..., None] == 1, np.array(_colour(rng)), np.array(_colour(rng)))
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def negative_image(rng: np.random.Generator, photos: Sequence[str] = TRAIN_PHOTOS) -> tuple[str, Image.Image]:
    """``(kind, picture)``: one non-easy-VQA picture (`SIZE` px square RGB) drawn from `rng` (kinds: module doc)."""
    kind = str(rng.choice(KINDS, p=KIND_WEIGHTS)) if photos else str(rng.choice(KINDS[1:]))
    if kind == "photo":
        return kind, _photo_crop(rng, photos)
    if kind == "noise":
        return kind, _noise(rng)
    if kind == "text":
        return kind, _text(rng)
    if kind == "blank":
        return kind, Image.new("RGB", (SIZE, SIZE), _colour(rng))
    return kind, _pattern(rng)


def open_question(rng: np.random.Generator) -> str:
    """An open request about a picture ("describe this photo", "what am I looking at?"), cased at random."""
    if rng.random() < 0.5:
        text = f"{_pick(rng, _OPEN_VERBS)} {_pick(rng, _OPEN_OBJECTS)}{_pick(rng, ('.', '?', ''))}"
    else:
        text = _pick(rng, _OPEN_WH)
    return text[0].upper() + text[1:] if rng.random() < 0.7 else text
