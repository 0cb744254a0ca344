"""Real photos bundled with scikit-image, scikit-learn and matplotlib, loaded by name as RGB PIL images.

A source is ``skimage:NAME`` (a function of ``skimage.data`` that needs no download: astronaut, coffee,
camera, ...; a stereo pair gives its left view), ``sklearn:FILE`` (``sklearn.datasets.load_sample_images``:
china.jpg, flower.jpg) or ``matplotlib:FILE`` (matplotlib's sample data: grace_hopper.jpg, logo2.png, ...).
Greyscale, boolean, float and RGBA arrays become 8-bit RGB (alpha composited on white). These packages are test
extras (``pip install -e .[test]``), not dependencies; a missing one is named in the error.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
from PIL import Image

from mmhub.errors import InputError

SCHEMES = ("skimage", "sklearn", "matplotlib")


def _module(name: str, package: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        raise InputError(f"the bundled photos need {package} (`pip install {package}` or `pip install -e .[test]`)"
                         ) from None


def to_rgb(array: np.ndarray) -> Image.Image:
    """An image array (greyscale, bool, float in [0, 1], RGB or RGBA) as an 8-bit RGB PIL image."""
    a = np.asarray(array)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype.kind == "f":
        a = (np.clip(a, 0.0, 1.0) * 255).round().astype(np.uint8)
    elif a.dtype != np.uint8:
        a = np.clip(a, 0, 255).astype(np.uint8)
    if a.ndim == 2:
        return Image.fromarray(a).convert("RGB")
    if a.ndim == 3 and a.shape[2] == 4:
        rgba = Image.fromarray(a, "RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.split()[3])
        return canvas
    if a.ndim == 3 and a.shape[2] == 3:
        return Image.fromarray(a, "RGB")
    raise InputError(f"an image array of shape {a.shape} is not greyscale, RGB or RGBA")


def load_photo(source: str) -> Image.Image:
    """The bundled photo `source` (``skimage:astronaut``, ``sklearn:china.jpg``, ``matplotlib:grace_hopper.jpg``)."""
    scheme, _, name = source.partition(":")
    if scheme not in SCHEMES or not name:
        raise InputError(f"photo source {source!r} is unknown: write skimage:NAME, sklearn:FILE or matplotlib:FILE "
                         f"(e.g. skimage:astronaut, sklearn:china.jpg, matplotlib:grace_hopper.jpg)")
    if scheme == "skimage":
        data = _module("skimage.data", "scikit-image")
        fn = getattr(data, name, None)
        if not callable(fn) or name.startswith("_"):
            raise InputError(f"photo source {source!r} is unknown: skimage.data has no image {name!r}")
        try:
            value = fn()
        except Exception as exc:  # noqa: BLE001 - pooch downloads fail offline with many exception types
            raise InputError(f"photo source {source!r} cannot be loaded here ({type(exc).__name__}: {exc}); it is "
                             f"one of skimage's downloaded images, pick a bundled one (astronaut, coffee, ...)"
                             ) from None
        return to_rgb(value[0] if isinstance(value, tuple) else value)
    if scheme == "sklearn":
        datasets = _module("sklearn.datasets", "scikit-learn")
        bundle = datasets.load_sample_images()
        names = [Path(f).name for f in bundle.filenames]
        if name not in names:
            raise InputError(f"photo source {source!r} is unknown: scikit-learn's sample images are {names}")
        return to_rgb(bundle.images[names.index(name)])
    cbook = _module("matplotlib.cbook", "matplotlib")
    try:
        path = Path(cbook.get_sample_data(name, asfileobj=False))
    except (OSError, ValueError):
        path = Path("")
    if not path.is_file():
        raise InputError(f"photo source {source!r} is unknown: matplotlib's sample data has no file {name!r}")
    with Image.open(path) as im:
        return to_rgb(np.asarray(im.convert("RGBA") if im.mode in ("RGBA", "LA", "P") else im.convert("RGB")))
