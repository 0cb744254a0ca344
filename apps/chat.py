"""The demo's conversation: turns with their media, what the model is given, and how the chat shows it.

A conversation is a list of `Turn`s kept per browser session. A user turn holds the
text typed, the uploaded files (for display) and the decoded media (for the model);
an assistant turn holds the reply as it streams in. `prompt_for` turns the whole
conversation into the messages + media the model takes, one placeholder per item,
so a follow-up question still sees the earlier images. What the model draws is shown
enlarged (`display_copy`) with its original pixels linked for download beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from mmhub.apps.models import LoadedModel
from mmhub.apps.uploads import Limits, check_prompt, read_upload
from mmhub.errors import InputError
from mmhub.reply import Reply

if TYPE_CHECKING:
    from PIL.Image import Image


@dataclass
class Turn:
    role: str  # "user" or "assistant"
    text: str
    files: list[str] = field(default_factory=list)  # uploaded paths, shown in the chat
    media: dict[str, list[Any]] = field(default_factory=dict)  # decoded items, given to the model
    originals: dict[str, str] = field(default_factory=dict)  # shown file -> its original pixels, linked for download


@dataclass(frozen=True)
class Settings:
    """Generation settings from the UI; temperature 0 means greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0

    def generate_kwargs(self) -> dict[str, Any]:
        if not 1 <= self.max_new_tokens <= 2048:
            raise InputError(f"max new tokens must be within 1..2048, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise InputError(f"temperature must be >= 0 and top-p within (0, 1]; "
                             f"got {self.temperature} and {self.top_p}")
        if self.temperature == 0:
            return {"max_new_tokens": int(self.max_new_tokens)}
        return {"max_new_tokens": int(self.max_new_tokens), "do_sample": True,
                "temperature": float(self.temperature), "top_p": float(self.top_p)}


def _paths(files: list[Any] | None) -> list[str]:
    out = []
    for f in files or []:
        path = f.get("path") if isinstance(f, dict) else getattr(f, "path", f)
        out.append(str(path))
    return out


def user_turn(text: str, files: list[Any] | None, loaded: LoadedModel, limits: Limits) -> Turn:
    """Check and decode one message from the input box; every problem is an InputError for the UI."""
    text = check_prompt(text, limits)
    paths = _paths(files)
    if not text and not paths:
        raise InputError("the message is empty; type a question or attach a file")
    if len(paths) > limits.max_files:
        raise InputError(f"{len(paths)} files attached; this demo takes at most {limits.max_files} per message")
    marks = set(loaded.model.processor.placeholders.values())
    for mark in marks:  # placeholders are the demo's to place, one per attached item
        text = text.replace(mark, "").strip()
    media: dict[str, list[Any]] = {}
    for p in paths:
        modality, item = read_upload(p, loaded.modalities, limits)
        media.setdefault(modality, []).append(item)
    return Turn("user", text, paths, media)


def prompt_for(turns: list[Turn], loaded: LoadedModel) -> tuple[list[dict[str, str]], dict[str, list[Any]]]:
    """The conversation as the model's messages (placeholders first in each user turn) and its media in order."""
    marks = loaded.model.processor.placeholders
    messages, media = [], {}
    for t in turns:
        if t.role == "user":
            head = "".join(f"{marks[m]}\n" * len(items) for m, items in t.media.items())
            messages.append({"role": "user", "content": head + t.text})
            for m, items in t.media.items():
                media.setdefault(m, []).extend(items)
        elif t.text:
            messages.append({"role": "assistant", "content": t.text})
    return messages, media


def reply(turns: list[Turn], loaded: LoadedModel, settings: Settings) -> Iterator[Reply]:
    """Stream the model's answer to the conversation (which must end with a user turn): growing `Reply`s, the
    last one finished, with the media the model drew."""
    if not turns or turns[-1].role != "user":
        raise InputError("nothing to answer: send a message first")
    from mmhub.serve.engine import Sampling
    from mmhub.serve.local import stream_replies

    messages, media = prompt_for(turns, loaded)
    kwargs = settings.generate_kwargs()
    sampling = Sampling(max_tokens=kwargs["max_new_tokens"], temperature=kwargs.get("temperature", 0.0),
                        top_p=kwargs.get("top_p", 1.0))
    # the model's engine batches this conversation with every other one on the same model (the API's too)
    yield from stream_replies(loaded.engine(), messages, media, sampling)


DISPLAY_SIZE = 256  # px on the longer side of a drawing as shown in the chat
DOWNLOAD_MIME = "application/octet-stream"  # the chat lists such a file as a download link, not as a picture


@dataclass
class SavedMedia:
    """Files of one reply's media: `shown` inline in the chat, in order, and for a drawing shown enlarged, the file
    with its original pixels (`originals`: shown file -> original file)."""

    shown: list[str] = field(default_factory=list)
    originals: dict[str, str] = field(default_factory=dict)


def display_copy(image: Image, size: int = DISPLAY_SIZE) -> Image:
    """A PIL image enlarged with nearest-neighbour to `size` px on its longer side, keeping its aspect, so each
    pixel stays a sharp block; an image already that large or larger is returned as it is (never shrunk)."""
    from PIL.Image import Resampling

    w, h = image.size
    if max(w, h) >= size:
        return image
    scale = size / max(w, h)
    return image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Resampling.NEAREST)


def save_media(media: dict[str, list[Any]], folder: str | Path | None = None) -> SavedMedia:
    """Generated media -> files the chat can show: images as PNG (a display copy enlarged to `DISPLAY_SIZE`, and
    the original as ``image-N-original.png``), videos as animated GIF, audio as WAV."""
    import tempfile
    import wave

    import numpy as np

    if not media:
        return SavedMedia()
    out_dir = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="mmhub-demo-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = SavedMedia()
    for m, items in media.items():
        for i, item in enumerate(items):
            if m == "image":
                path = out_dir / f"image-{i}.png"
                original = out_dir / f"image-{i}-original.png"
                item.save(original)
                display_copy(item).save(path)
                saved.originals[str(path)] = str(original)
            elif m == "video":
                path = out_dir / f"video-{i}.gif"
                item[0].save(path, save_all=True, append_images=list(item[1:]), duration=125, loop=0)
            elif m == "audio":
                path = out_dir / f"audio-{i}.wav"
                pcm = (np.clip(np.asarray(item.samples, dtype=np.float32), -1, 1) * 32767).astype("<i2")
                with wave.open(str(path), "wb") as fh:
                    fh.setnchannels(1)
                    fh.setsampwidth(2)
                    fh.setframerate(int(item.sample_rate))
                    fh.writeframes(pcm.tobytes())
            else:
                continue
            saved.shown.append(str(path))
    return saved


def render(turns: list[Turn]) -> list[dict[str, Any]]:
    """Turns -> the Chatbot's messages: uploaded (user) or generated (assistant) files shown inline, each followed
    by a download link to its original when it has one, and the text."""
    out = []
    for t in turns:
        content: list[Any] = []
        for p in t.files:
            content.append({"path": p, "alt_text": Path(p).name})
            if p in t.originals:
                o = t.originals[p]
                content.append({"file": {"path": o, "orig_name": Path(o).name, "mime_type": DOWNLOAD_MIME},
                                "alt_text": f"{Path(o).name} (the original pixels)"})
        if t.role == "user":
            if t.text:
                content.append(t.text)
            out.append({"role": "user", "content": content})
        else:
            reply = [*([t.text] if t.text else []), *content] if content else (t.text or "…")
            out.append({"role": "assistant", "content": reply})
    return out


def undo(turns: list[Turn]) -> list[Turn]:
    """The conversation without its last exchange (the last user turn and any reply to it)."""
    turns = list(turns)
    while turns and turns[-1].role == "assistant":
        turns.pop()
    if turns:
        turns.pop()
    return turns
