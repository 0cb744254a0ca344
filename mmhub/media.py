"""Reading media items (images for now) from what users pass: PIL images, arrays, file paths, bytes.

Every failure names the item and what is wrong with it, so a bad upload or a
corrupt dataset file is reported rather than crashing deep inside an encoder.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from mmhub.errors import InputError

MAX_PIXELS = 64_000_000  # beyond this, decoding is refused (decompression-bomb guard)


def load_image(item: Any) -> Image.Image:
    """A PIL RGB image from a PIL image, an HxW[xC] array, a path or raw bytes."""
    if isinstance(item, Image.Image):
        img = item
    elif isinstance(item, np.ndarray):
        arr = item
        if arr.dtype != np.uint8:
            arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr)
    elif isinstance(item, (str, Path, bytes, bytearray)):
        src = io.BytesIO(item) if isinstance(item, (bytes, bytearray)) else Path(item)
        name = "the uploaded bytes" if isinstance(item, (bytes, bytearray)) else str(item)
        if isinstance(src, Path) and not src.is_file():
            raise InputError(f"image file {name} does not exist")
        try:
            img = Image.open(src)
            if img.width * img.height > MAX_PIXELS:
                raise InputError(f"image {name} is {img.width}x{img.height} = {img.width * img.height} pixels, "
                                 f"more than the {MAX_PIXELS} allowed; downscale it first")
            img.load()
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
            raise InputError(f"{name} is not a readable image ({type(exc).__name__}: {exc})") from None
    else:
        raise InputError(f"cannot read an image from a {type(item).__name__}; "
                         "pass a PIL image, an array or a file path")
    return img.convert("RGB")
