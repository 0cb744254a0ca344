"""One training/evaluation example, whatever file format it came from.

A `Sample` holds a conversation in mmhub's roles (``system`` / ``user`` / ``assistant``)
and its media. Each media item appears in the text as one placeholder, the default
placeholder of its modality: ``<image>``, ``<audio>``, ``<video>``, ``<points>``
(``<modality>`` in general; a spec's ``placeholders:`` may rename them for a model,
but datasets always write the defaults). Items are given in text order per modality.

Media items are file paths (``str`` / ``Path``), raw file bytes (webdataset shards) or
in-memory objects (PIL images, numpy arrays, ``(array, rate)`` audio tuples); files are
read only when the sample is used (`mmhub.data.robust.load_media` or the model's processor).

Preference samples (DPO-style) keep the prompt in ``messages`` (ending in a user turn)
and the two assistant replies in ``chosen`` / ``rejected``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant")


def prompt_messages(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Copies of `messages` up to (not including) the trailing assistant turns: what a model is asked to answer."""
    end = len(messages)
    while end and messages[end - 1]["role"] == "assistant":
        end -= 1
    return [dict(m) for m in messages[:end]]


def placeholder(modality: str) -> str:
    """The default text marker of one `modality` item (``<image>`` for ``image``)."""
    return f"<{modality}>"


@dataclass
class Sample:
    """A conversation plus its media (see the module docstring for the conventions)."""

    id: str
    messages: list[dict[str, str]]
    media: dict[str, list[Any]] = field(default_factory=dict)
    chosen: str | None = None
    rejected: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    # generation tasks: per output modality, the captions of the items the assistant turns generate (one
    # ``<img_out>``-style marker each, in text order); decoding-side alignment trains towards their features
    outputs: dict[str, list[str]] = field(default_factory=dict)

    @property
    def is_preference(self) -> bool:
        return self.chosen is not None or self.rejected is not None

    def placeholder_counts(self) -> dict[str, int]:
        """Placeholders per modality found in the text, for every modality that has items or markers."""
        text = "".join(m.get("content", "") for m in self.messages)
        mods = set(self.media) | {m for m in ("image", "video", "audio", "points") if placeholder(m) in text}
        return {m: text.count(placeholder(m)) for m in sorted(mods)}

    def problems(self) -> list[str]:
        """What is structurally wrong with this sample (empty when it is well formed)."""
        out = []
        if not self.messages:
            out.append("has no messages")
        for i, m in enumerate(self.messages):
            if m.get("role") not in ROLES:
                out.append(f"message {i} has role {m.get('role')!r}; use one of {', '.join(ROLES)}")
            if not isinstance(m.get("content"), str):
                out.append(f"message {i} has no text content")
        for mod, n in self.placeholder_counts().items():
            items = len(self.media.get(mod, []))
            if n != items:
                out.append(f"{n} {placeholder(mod)} placeholder(s) but {items} {mod} item(s)")
        if self.is_preference:
            if self.chosen is None or self.rejected is None:
                out.append("a preference sample needs both chosen and rejected")
            if self.messages and self.messages[-1].get("role") != "user":
                out.append("a preference prompt must end with a user turn")
        return out

    def conversation(self, reply: str | None = None) -> list[dict[str, str]]:
        """The messages, plus `reply` as a final assistant turn (for preference samples: chosen or rejected)."""
        msgs = [dict(m) for m in self.messages]
        if reply is not None:
            msgs.append({"role": "assistant", "content": reply})
        return msgs
