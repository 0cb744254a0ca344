"""What `MMModel.generate` and `MMModel.stream` hand back for a prompt: a `Reply`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length"]  # a stop token was chosen / max_new_tokens was reached


@dataclass
class Reply:
    """A generated reply.

    * ``text``: the decoded reply, special and signal tokens stripped;
    * ``media``: what the model's generators drew, {modality: [PIL image | frames | Audio]} ({} for models
      without an output side, or with ``generate_media=False``); ``images`` is its image list;
    * ``token_ids``: the generated tokenizer ids (stop token excluded);
    * ``finish_reason``: ``"stop"`` or ``"length"``; None while a streamed reply is still growing.
    """

    text: str
    media: dict[str, list[Any]] = field(default_factory=dict)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None

    @property
    def images(self) -> list[Any]:
        """The images drawn for this reply (``media["image"]``), in the order their signal groups were emitted."""
        return list(self.media.get("image", []))

    def __str__(self) -> str:
        return self.text
