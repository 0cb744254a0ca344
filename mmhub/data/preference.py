"""Preference pairs (DPO) from JSONL: ``{prompt, chosen, rejected, images?}``.

``prompt`` is a string (one user turn) or a list of ``{role, content}`` / ``{from, value}``
turns ending with a user turn; ``chosen`` / ``rejected`` are strings or one assistant turn
(``{role, content}``). ``images`` (optional) are file names relative to ``image_folder``
(default: the file's folder). As with LLaVA, a prompt with images but no ``<image>`` gets one
``<image>\\n`` per image prepended to its first user turn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmhub.data.base import (
    Dataset,
    DatasetConfig,
    SampleError,
    convert_turns,
    media_path,
    parse_jsonl_line,
    prepend_missing_placeholders,
    read_jsonl_lines,
)
from mmhub.data.sample import Sample


class PreferenceConfig(DatasetConfig):
    path: str
    image_folder: str | None = None
    prompt_key: str = "prompt"
    chosen_key: str = "chosen"
    rejected_key: str = "rejected"
    images_key: str = "images"
    limit: int | None = None


def _reply(value: Any, where: str, key: str) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        value = value.get("content", value.get("value"))
    if not isinstance(value, str) or not value.strip():
        raise SampleError(f"{where} has no {key} text", "malformed_record", where)
    return value


class PreferenceDataset(Dataset):
    """Preference JSONL (prompt, chosen, rejected, optional images) -> preference samples for DPO."""

    name = "preference"
    Config = PreferenceConfig
    modalities = ("image",)

    def __init__(self, config: PreferenceConfig, base_dir: Path | None = None):
        super().__init__(config, base_dir)
        self.file = self.resolve(config.path)
        self.folder = self.resolve(config.image_folder) if config.image_folder else self.file.parent
        self.lines = read_jsonl_lines(self.file, "preference JSONL")[:config.limit]

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, index: int) -> Sample:
        c = self.config
        lineno, line = self.lines[index]
        rec, where = parse_jsonl_line(self.file, lineno, line), f"{self.file}:{lineno}"
        prompt = rec.get(c.prompt_key)
        if isinstance(prompt, str) and prompt.strip():
            messages = [{"role": "user", "content": prompt}]
        else:
            messages = convert_turns(prompt, where, where)
        if messages[-1]["role"] != "user":
            raise SampleError(f"{where}: the prompt must end with a user turn", "malformed_record", where)
        images = rec.get(c.images_key) or []
        if isinstance(images, str):
            images = [images]
        if not isinstance(images, list):
            raise SampleError(f"{where}: {c.images_key} must be a list of file names", "malformed_record", where)
        media = {"image": [media_path(self.folder, x) for x in images]} if images else {}
        prepend_missing_placeholders(messages, media, where, where)
        return Sample(id=str(rec.get("id", index)), messages=messages, media=media,
                      chosen=_reply(rec.get(c.chosen_key), where, c.chosen_key),
                      rejected=_reply(rec.get(c.rejected_key), where, c.rejected_key), meta={"source": where})
