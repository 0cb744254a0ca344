"""OpenAI chat messages -> the model's messages (one placeholder per media item) and its media, checked.

Images come as ``image_url`` parts holding a base64 ``data:`` URI, or a local path (``file://`` or plain) inside
a folder the server was started with (``--allow-files``); ``http(s)`` URLs are refused and nothing is fetched.
Audio comes as ``input_audio`` parts (base64 WAV). Every problem is an `APIError` (HTTP 400) naming the part
(``messages[2].content[1].image_url.url``), what is wrong, with the numbers, and what to send instead.
"""

from __future__ import annotations

import base64
import binascii
import io
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmhub.serve.protocol import APIError, ChatRequest

ROLES = {"system", "developer", "user", "assistant"}


@dataclass(frozen=True)
class ContentLimits:
    """What one request may carry (set from `mmhub serve` flags)."""

    max_image_mb: float = 20.0
    max_images: int = 8
    max_image_pixels: int = 40_000_000
    allow_files: Path | None = None


def to_model_input(body: ChatRequest, placeholders: dict[str, str],
                   limits: ContentLimits) -> tuple[list[dict[str, str]], dict[str, list[Any]]]:
    """The request's messages as ``[{"role", "content"}]`` with placeholders, and ``{modality: [items]}``."""
    messages, media = [], {}
    n_items = 0
    for i, msg in enumerate(body.messages):
        where = f"messages[{i}]"
        parts = msg.content if isinstance(msg.content, list) else [{"type": "text", "text": msg.content or ""}]
        texts, heads = [], []
        for j, part in enumerate(parts):
            p = part if isinstance(part, dict) else part.model_dump()
            kind = p.get("type")
            at = f"{where}.content[{j}]"
            if kind == "text":
                text = p.get("text")
                if not isinstance(text, str):
                    raise APIError(f"{at}.text: must be a string, got {type(text).__name__}", param=f"{at}.text")
                texts.append(text)
                continue
            if kind not in ("image_url", "input_audio"):
                raise APIError(f"{at}: content parts of type {kind!r} are not supported; send 'text', 'image_url' "
                               "or 'input_audio' parts", param=f"{at}.type")
            modality = "image" if kind == "image_url" else "audio"
            if modality not in placeholders:
                takes = ", ".join(sorted(placeholders)) or "text only"
                raise APIError(f"{at}: this model does not read {modality} (it takes {takes})", param=f"{at}.type")
            if msg.role != "user":
                raise APIError(f"{at}: media can only be sent in user messages, not {msg.role!r}", param=at)
            n_items += 1
            if modality == "image" and n_items > limits.max_images:
                raise APIError(f"the request holds more than {limits.max_images} images (part {at}); the server "
                               f"takes at most {limits.max_images} per request (--max-images)", param=at)
            item = _image(p.get("image_url"), at, limits) if modality == "image" else _audio(p.get("input_audio"),
                                                                                           at, limits)
            media.setdefault(modality, []).append(item)
            heads.append(f"{placeholders[modality]}\n")
        role = "system" if msg.role == "developer" else msg.role
        messages.append({"role": role, "content": "".join(heads) + "\n".join(texts)})
    if not any(m["role"] == "user" for m in messages):
        raise APIError("the messages hold no user message; the last message should be the user's", param="messages")
    return messages, media


def _b64(data: str, at: str, limits: ContentLimits) -> bytes:
    if len(data) * 3 / 4 > limits.max_image_mb * 1e6 * 1.01:
        raise APIError(f"{at}: the media is about {len(data) * 3 / 4 / 1e6:.1f} MB; the server takes up to "
                       f"{limits.max_image_mb:g} MB per item (--max-image-mb)", param=at)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise APIError(f"{at}: the base64 data does not decode ({exc}); send standard base64 (A-Z, a-z, 0-9, +, /, "
                       "= padding)", param=at) from None


def _image(image_url: Any, at: str, limits: ContentLimits) -> Any:
    where = f"{at}.image_url.url"
    url = (image_url or {}).get("url") if isinstance(image_url, dict) else None
    if not isinstance(url, str) or not url:
        raise APIError(f"{where}: missing; give a base64 data: URI such as data:image/png;base64,...", param=where)
    if url.startswith(("http://", "https://")):
        raise APIError(f"{where}: the server fetches nothing from the network; send the image inline as a base64 "
                       "data: URI (data:image/png;base64,...)", param=where)
    if url.startswith("data:"):
        head, sep, data = url.partition(",")
        if not sep or ";base64" not in head:
            raise APIError(f"{where}: a data: URI must be base64 (data:image/png;base64,...)", param=where)
        return _decode_image(_b64(data, where, limits), where, limits)
    return _decode_image(_local_file(url, where, limits), where, limits)


def _local_file(url: str, where: str, limits: ContentLimits) -> bytes:
    path = Path(url.removeprefix("file://"))
    if limits.allow_files is None:
        raise APIError(f"{where}: local paths are off; send the image as a base64 data: URI, or start the server "
                       "with --allow-files DIR", param=where)
    root = limits.allow_files.resolve()
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise APIError(f"{where}: no such file '{path}'", param=where) from None
    if not real.is_relative_to(root) or not real.is_file():
        raise APIError(f"{where}: '{path}' is not a file inside the allowed folder {root} (--allow-files)",
                       param=where)
    size = real.stat().st_size
    if size > limits.max_image_mb * 1e6:
        raise APIError(f"{where}: '{path.name}' is {size / 1e6:.1f} MB; the server takes up to "
                       f"{limits.max_image_mb:g} MB per item (--max-image-mb)", param=where)
    return real.read_bytes()


def _decode_image(raw: bytes, where: str, limits: ContentLimits) -> Any:
    from PIL import Image

    if not raw:
        raise APIError(f"{where}: the image is empty (0 bytes)", param=where)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(raw)) as im:
                w, h = im.size
                if w * h > limits.max_image_pixels:
                    raise APIError(f"{where}: the image is {w}x{h} = {w * h:,} pixels; the server takes up to "
                                   f"{limits.max_image_pixels:,} (resize it first)", param=where)
                im.load()
                return im.convert("RGB")
        except APIError:
            raise
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            raise APIError(f"{where}: the {len(raw):,} bytes are not a readable image ({type(e).__name__}); send "
                           "PNG, JPEG, GIF, WebP or BMP", param=where) from None


def _audio(input_audio: Any, at: str, limits: ContentLimits) -> Any:
    from mmhub.encoders.audio_io import load_audio

    where = f"{at}.input_audio"
    data = input_audio.get("data") if isinstance(input_audio, dict) else None
    fmt = (input_audio or {}).get("format", "wav") if isinstance(input_audio, dict) else None
    if not isinstance(data, str) or not data:
        raise APIError(f"{where}.data: missing; give base64 WAV bytes", param=f"{where}.data")
    if fmt != "wav":
        raise APIError(f"{where}.format: {fmt!r} is not read here; send WAV ('format': 'wav')",
                       param=f"{where}.format")
    raw = _b64(data, f"{where}.data", limits)
    with tempfile.NamedTemporaryFile(suffix=".wav") as f:
        f.write(raw)
        f.flush()
        try:
            wave = load_audio(f.name, 16_000)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is the client's data
            raise APIError(f"{where}.data: not readable WAV audio ({exc})", param=f"{where}.data") from None
    if wave.size == 0:
        raise APIError(f"{where}.data: holds no audio (0 samples)", param=f"{where}.data")
    return wave
