"""ShareGPT / messages format, as LLaMA-Factory reads it (``.json`` list or ``.jsonl``).

Each record has ``messages: [{role, content}]`` or ``conversations: [{from, value}]``
(``human``/``user``, ``gpt``/``assistant``/``model``, ``system``), an optional top-level
``system`` prompt, and media lists ``images``, ``audios``, ``videos`` (file names relative to
``media_folder``, default the data file's folder), several per sample and several
modalities per sample. Placeholders ``<image>``, ``<audio>``, ``<video>`` must match the
item counts exactly (LLaMA-Factory refuses mismatches too); a mismatch is a malformed record.
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
    read_json_list,
    read_jsonl_lines,
)
from mmhub.data.sample import Sample, placeholder

MEDIA_KEYS = {"images": "image", "audios": "audio", "videos": "video"}


class ShareGPTConfig(DatasetConfig):
    path: str
    media_folder: str | None = None  # default: the data file's folder
    limit: int | None = None


class ShareGPTDataset(Dataset):
    """ShareGPT/LLaMA-Factory records (messages or conversations + images/audios/videos lists)."""

    name = "sharegpt"
    Config = ShareGPTConfig
    modalities = ("image", "audio", "video")

    def __init__(self, config: ShareGPTConfig, base_dir: Path | None = None):
        super().__init__(config, base_dir)
        self.file = self.resolve(config.path)
        self.folder = self.resolve(config.media_folder) if config.media_folder else self.file.parent
        if self.file.suffix.lower() == ".jsonl":
            self.lines: list[tuple[int, str]] | None = read_jsonl_lines(self.file, "ShareGPT JSONL")[:config.limit]
            self.records: list[Any] | None = None
        else:
            self.lines, self.records = None, read_json_list(self.file, "ShareGPT JSON")[:config.limit]

    def __len__(self) -> int:
        return len(self.lines if self.lines is not None else self.records)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Sample:
        if self.lines is not None:
            lineno, line = self.lines[index]
            rec = parse_jsonl_line(self.file, lineno, line)
            where, file = f"{self.file}:{lineno}", f"{self.file}:{lineno}"
        else:
            rec, where, file = self.records[index], f"record {index} of {self.file}", str(self.file)  # type: ignore[index]
            if not isinstance(rec, dict):
                raise SampleError(f"{where} is a {type(rec).__name__}, not an object", "malformed_record", file)
        messages = convert_turns(rec.get("messages", rec.get("conversations")), where, file)
        if isinstance(rec.get("system"), str) and rec["system"] and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": rec["system"]})
        media: dict[str, list[Any]] = {}
        for key, mod in MEDIA_KEYS.items():
            items = rec.get(key) or []
            if isinstance(items, str):
                items = [items]
            if not isinstance(items, list):
                raise SampleError(f"{where}: {key} must be a list of file names", "malformed_record", file)
            if items:
                media[mod] = [media_path(self.folder, x) for x in items]
        text = "".join(m["content"] for m in messages)
        for mod in MEDIA_KEYS.values():
            n, k = text.count(placeholder(mod)), len(media.get(mod, []))
            if n != k:
                raise SampleError(f"{where} has {n} {placeholder(mod)} placeholder(s) but {k} {mod} item(s)",
                                  "malformed_record", file)
        return Sample(id=str(rec.get("id", index)), messages=messages, media=media, meta={"source": where})
