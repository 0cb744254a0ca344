"""Checking what a demo user sends: uploaded files and the prompt, before anything reaches a model.

Every check raises `mmhub.errors.InputError` with a message meant for the UI: which
file or field, what is wrong (with the numbers) and what to do. A file is read once
here (images decoded and converted to RGB, audio decoded to 16 kHz mono), so a model
never sees a file that failed a check.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from mmhub.errors import InputError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff"}
AUDIO_SUFFIXES = {".wav", ".wave"}
AUDIO_RATE = 16_000


@dataclass(frozen=True)
class Limits:
    """What the demo accepts per message (set from `mmhub demo` flags)."""

    max_upload_mb: float = 20.0
    max_prompt_chars: int = 4000
    max_files: int = 4
    max_image_pixels: int = 40_000_000
    max_audio_seconds: float = 120.0


def modality_of(path: str | Path) -> str:
    """``image`` or ``audio`` from the file name; anything else is an InputError."""
    suffix = Path(path).suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in AUDIO_SUFFIXES:
        return "audio"
    raise InputError(f"'{Path(path).name}' is not a file type this demo reads; upload images "
                     f"({', '.join(sorted(IMAGE_SUFFIXES))}) or WAV audio")


def check_prompt(text: str, limits: Limits) -> str:
    """The prompt text, stripped; too long is an InputError."""
    text = (text or "").strip()
    bad = next((i for i, ch in enumerate(text) if "\ud800" <= ch <= "\udfff"), None)
    if bad is not None:  # half of a UTF-16 pair: no tokenizer can encode it (a broken paste or escape)
        raise InputError(f"the message has an invalid character at position {bad + 1} (U+{ord(text[bad]):04X}, half "
                         "of a UTF-16 surrogate pair); remove it or paste the text again")
    if len(text) > limits.max_prompt_chars:
        raise InputError(f"the message has {len(text):,} characters; this demo takes at most "
                         f"{limits.max_prompt_chars:,} (shorten it, or start the demo with --max-prompt-chars)")
    return text


def read_upload(path: str | Path, accepted: list[str], limits: Limits) -> tuple[str, Any]:
    """One uploaded file -> (modality, decoded item): a PIL RGB image or a 16 kHz float32 array."""
    p = Path(path)
    name = p.name
    modality = modality_of(p)
    if modality not in accepted:
        takes = ", ".join(accepted) if accepted else "text only"
        raise InputError(f"'{name}' is {modality}, but the loaded model takes {takes}; "
                         f"choose a model that reads {modality} in the Model box")
    try:
        size = os.path.getsize(p)
    except OSError as exc:
        raise InputError(f"'{name}' could not be read ({exc.strerror}); upload it again") from None
    if size > limits.max_upload_mb * 1e6:
        raise InputError(f"'{name}' is {size / 1e6:.1f} MB; this demo takes files up to {limits.max_upload_mb:g} MB "
                         "(upload a smaller file, or start the demo with --max-upload-mb)")
    if size == 0:
        raise InputError(f"'{name}' is empty (0 bytes); upload the file again")
    if modality == "image":
        return modality, _read_image(p, limits)
    return modality, _read_audio(p, limits)


def _read_image(p: Path, limits: Limits) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(p) as im:
                w, h = im.size
                if w * h > limits.max_image_pixels:
                    raise InputError(f"'{p.name}' is {w}x{h} = {w * h:,} pixels; this demo takes images up to "
                                     f"{limits.max_image_pixels:,} pixels (resize it first)")
                im.load()
                return im.convert("RGB")
        except InputError:
            raise
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            raise InputError(f"'{p.name}' is not a readable image ({type(exc).__name__}); "
                             "upload a PNG, JPEG, GIF, WebP or BMP file") from None


def _read_audio(p: Path, limits: Limits) -> Any:
    from mmhub.encoders.audio_io import load_audio

    try:
        wave = load_audio(str(p), AUDIO_RATE)
    except InputError as exc:
        raise InputError(f"'{p.name}': {exc}") from None
    if wave.size == 0:
        raise InputError(f"'{p.name}' holds no audio (0 samples); record or upload a longer clip")
    seconds = wave.size / AUDIO_RATE
    if seconds > limits.max_audio_seconds:
        raise InputError(f"'{p.name}' is {seconds:.0f} s long; this demo takes clips up to "
                         f"{limits.max_audio_seconds:g} s (cut it first)")
    return wave
