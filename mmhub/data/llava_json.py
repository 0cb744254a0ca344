"""LLaVA's instruction-tuning JSON: a list of ``{id, image, conversations: [{from, value}]}``.

``image`` is a file name (or a list of them) relative to ``image_folder``; records without
``image`` are text-only. Roles ``human`` / ``gpt`` / ``system`` become user / assistant / system.
Placeholders: like LLaVA, a record whose text has no ``<image>`` at all but has k images gets
k ``<image>\\n`` prepended to its first human turn; a record with some ``<image>`` markers but
a different number of images is malformed (skipped by the robust reader). Markers are left
where the text puts them. The file is read once when the dataset is made; each sample is
built when it is asked for.
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
    prepend_missing_placeholders,
    read_json_list,
)
from mmhub.data.sample import Sample


class LlavaJsonConfig(DatasetConfig):
    path: str
    image_folder: str | None = None  # default: the JSON file's folder
    limit: int | None = None


class LlavaJsonDataset(Dataset):
    """LLaVA JSON (id, image, conversations from human/gpt) with images in image_folder."""

    name = "llava_json"
    Config = LlavaJsonConfig
    modalities = ("image",)

    def __init__(self, config: LlavaJsonConfig, base_dir: Path | None = None):
        super().__init__(config, base_dir)
        self.file = self.resolve(config.path)
        self.folder = self.resolve(config.image_folder) if config.image_folder else self.file.parent
        self.records = read_json_list(self.file, "LLaVA JSON")[:config.limit]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        rec = self.records[index]
        where = f"record {index} of {self.file}"
        if not isinstance(rec, dict):
            raise SampleError(f"{where} is a {type(rec).__name__}, not an object", "malformed_record", str(self.file))
        messages = convert_turns(rec.get("conversations"), where, str(self.file))
        images: Any = rec.get("image")
        if images is None:
            images = []
        elif isinstance(images, str):
            images = [images]
        if not isinstance(images, list) or not all(isinstance(x, str) for x in images):
            raise SampleError(f"{where}: image must be a file name or a list of them", "malformed_record",
                              str(self.file))
        media = {"image": [media_path(self.folder, x) for x in images]} if images else {}
        prepend_missing_placeholders(messages, media, where, str(self.file))
        return Sample(id=str(rec.get("id", index)), messages=messages, media=media,
                      meta={"source": str(self.file), "index": index})
