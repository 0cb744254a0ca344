"""Media-caption pairs from JSONL or CSV: pre-training (alignment) samples.

Each row names one media file (column/key ``media_key``, default ``image``, relative to
``media_folder``, default the data file's folder) and its caption (``caption_key``, default
``caption``). A sample is ``user: PROMPT`` / ``assistant: CAPTION``, where ``prompt`` is a
template whose ``{placeholder}`` becomes the modality's marker (``<image>``, ``<audio>``, ...);
the default ``"{placeholder}"`` is LLaVA's pre-training form (the marker alone). A template
without ``{placeholder}`` gets the marker and a newline prepended.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import field_validator

from mmhub.data.base import (
    Dataset,
    DatasetConfig,
    SampleError,
    media_path,
    parse_jsonl_line,
    read_csv_rows,
    read_jsonl_lines,
)
from mmhub.data.sample import Sample, placeholder


class CaptionsConfig(DatasetConfig):
    path: str
    media_folder: str | None = None
    modality: str = "image"
    media_key: str | None = None  # default: the modality's name ("image", "audio")
    caption_key: str = "caption"
    prompt: str = "{placeholder}"
    limit: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one_placeholder(cls, v: str) -> str:
        if v.count("{placeholder}") > 1:
            raise ValueError("prompt may hold {placeholder} at most once (one media item per row)")
        return v


class CaptionsDataset(Dataset):
    """Image/audio-caption pairs (JSONL or CSV) as pre-training samples: user PROMPT, assistant caption."""

    name = "captions"
    Config = CaptionsConfig
    modalities = ("image", "audio", "video", "points")

    def __init__(self, config: CaptionsConfig, base_dir: Path | None = None):
        super().__init__(config, base_dir)
        self.file = self.resolve(config.path)
        self.folder = self.resolve(config.media_folder) if config.media_folder else self.file.parent
        self.media_key = config.media_key or config.modality
        self.is_csv = self.file.suffix.lower() == ".csv"
        rows: list[Any] = (read_csv_rows(self.file, "captions CSV") if self.is_csv
                           else read_jsonl_lines(self.file, "captions JSONL"))
        self.rows = rows[:config.limit]

    def user_text(self) -> str:
        mark = placeholder(self.config.modality)
        prompt = self.config.prompt
        return prompt.replace("{placeholder}", mark) if "{placeholder}" in prompt else f"{mark}\n{prompt}"

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Sample:
        if self.is_csv:
            rec, where = self.rows[index], f"{self.file}:{index + 2}"  # row 1 is the header
        else:
            lineno, line = self.rows[index]
            rec, where = parse_jsonl_line(self.file, lineno, line), f"{self.file}:{lineno}"
        item, caption = rec.get(self.media_key), rec.get(self.config.caption_key)
        if not isinstance(item, str) or not item:
            raise SampleError(f"{where} has no {self.media_key!r} file name", "malformed_record", where)
        if not isinstance(caption, str) or not caption.strip():
            raise SampleError(f"{where} has no {self.config.caption_key!r} text", "malformed_record", where)
        messages = [{"role": "user", "content": self.user_text()}, {"role": "assistant", "content": caption.strip()}]
        return Sample(id=str(rec.get("id") or index), messages=messages,
                      media={self.config.modality: [media_path(self.folder, item)]}, meta={"source": where})
