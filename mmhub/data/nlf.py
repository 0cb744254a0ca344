"""Natural-language-feedback conversations (DRESS's NLF data) from JSONL, for ``objective: nlf`` stages.

One record: ``{prompt, response, critique, refinement?, refined, images?}`` (or ``rounds``: a list of
``{response, critique, refinement?}`` for several feedback rounds before ``refined``). It becomes the conversation

    user: prompt                      (with ``<image>`` per image, prepended when missing)
    assistant: response               (``train: false``: the model's earlier reply, context only)
    user: critique + refinement       (the feedback, formatted by ``feedback_format``)
    ... more rounds ...
    assistant: refined                (the target: the reply refined given the feedback)

so the loss falls on the refined reply, conditioned on the earlier reply and its critique. ``images`` are file
names relative to ``image_folder`` (default: the file's folder).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from mmhub.data.base import (
    Dataset,
    DatasetConfig,
    SampleError,
    media_path,
    parse_jsonl_line,
    prepend_missing_placeholders,
    read_jsonl_lines,
)
from mmhub.data.sample import Sample


class NLFConfig(DatasetConfig):
    path: str
    image_folder: str | None = None
    images_key: str = "images"
    feedback_format: str = Field("{critique}\n{refinement}", description="the feedback turn's text; {refinement} "
                                 "and the newline before it are left out when a round has no refinement")
    limit: int | None = None


def has_feedback(messages: list[dict[str, Any]]) -> bool:
    """Whether a conversation holds a feedback round: a context reply (``train: false``), a user turn (the
    feedback), then a trained reply."""
    roles = [(m.get("role"), m.get("train", True)) for m in messages]
    return any(roles[i:i + 3] == [("assistant", False), ("user", True), ("assistant", True)]
               for i in range(len(roles) - 2))


def _text(rec: dict[str, Any], key: str, where: str, required: bool = True) -> str:
    value = rec.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or not value.strip():
        raise SampleError(f"{where}: {key!r} must be non-empty text", "malformed_record", where)
    return value


class NLFDataset(Dataset):
    """NLF JSONL (prompt, earlier reply, critique, refinement, refined reply) -> critique-and-refinement samples."""

    name = "nlf"
    Config = NLFConfig
    modalities = ("image",)

    def __init__(self, config: NLFConfig, base_dir: Path | None = None):
        super().__init__(config, base_dir)
        self.file = self.resolve(config.path)
        self.folder = self.resolve(config.image_folder) if config.image_folder else self.file.parent
        self.lines = read_jsonl_lines(self.file, "NLF JSONL")[:config.limit]

    def __len__(self) -> int:
        return len(self.lines)

    def _feedback(self, round_: dict[str, Any], where: str) -> str:
        critique = _text(round_, "critique", where)
        refinement = _text(round_, "refinement", where, required=False)
        if not refinement:
            return critique
        return self.config.feedback_format.format(critique=critique, refinement=refinement)

    def __getitem__(self, index: int) -> Sample:
        lineno, line = self.lines[index]
        rec, where = parse_jsonl_line(self.file, lineno, line), f"{self.file}:{lineno}"
        rounds = rec.get("rounds", [rec])
        if not isinstance(rounds, list) or not rounds or not all(isinstance(r, dict) for r in rounds):
            raise SampleError(f"{where}: 'rounds' must be a non-empty list of {{response, critique, refinement}}",
                              "malformed_record", where)
        messages: list[dict[str, Any]] = [{"role": "user", "content": _text(rec, "prompt", where)}]
        for r in rounds:
            messages += [{"role": "assistant", "content": _text(r, "response", where), "train": False},
                         {"role": "user", "content": self._feedback(r, where)}]
        messages.append({"role": "assistant", "content": _text(rec, "refined", where)})
        images = rec.get(self.config.images_key) or []
        if isinstance(images, str):
            images = [images]
        if not isinstance(images, list):
            raise SampleError(f"{where}: {self.config.images_key} must be a list of file names", "malformed_record",
                              where)
        media = {"image": [media_path(self.folder, x) for x in images]} if images else {}
        prepend_missing_placeholders(messages, media, where, where)
        return Sample(id=str(rec.get("id", index)), messages=messages, media=media,
                      meta={"source": where, "feedback_rounds": len(rounds)})
