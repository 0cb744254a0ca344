"""Replay: another dataset's prompts, answered by a given model, as training samples (its greedy replies the targets).

Mixed into a fine-tune, a model's own answers to the questions the fine-tune is not about hold the update still
there (sequence-level self-distillation): a specialist trained on one skill plus the base's replies to another
skill's questions learns its skill without teaching the base a new answer for everything else, which is what a
later per-slot merge of specialists needs (docs/merging.md, "Specialists that keep the base's other answers").

    data:
      - {type: easy_vqa_varied, question_types: {shape: 1, color: 1}}
      - {type: replay, model: runs/skills-base/align/model, samples: 2000,
         data: {type: easy_vqa, split: train, task: qa, question_types: [yes_no]}}

The replies are generated once, when the dataset is loaded (greedy, ``max_new_tokens``, ``batch_size`` prompts at a
time); a sample the inner dataset cannot read is skipped and counted (``skipped``), as in any long run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pydantic import Field

from mmhub.data.base import Dataset, DatasetConfig, SampleError, load_dataset
from mmhub.data.sample import Sample, prompt_messages
from mmhub.errors import InputError


class ReplayConfig(DatasetConfig):
    model: str = Field(description="the model whose greedy replies become the targets: a saved mmhub folder or a "
                                   "preset name (usually the base the fine-tune starts from)")
    data: Any = Field(description="the dataset whose prompts are asked: any spec `load_dataset` takes")
    samples: int | None = Field(None, ge=1, description="ask the first N samples only (all when unset)")
    max_new_tokens: int = Field(16, ge=1, le=1024, description="reply length limit, in tokens")
    batch_size: int = Field(16, ge=1, le=1024, description="prompts generated at a time")


def prompt_of(sample: Sample) -> list[dict[str, str]]:
    """The conversation up to its last user turn (the reference reply after it left out)."""
    prompt = prompt_messages(sample.messages)
    if not prompt or prompt[-1]["role"] != "user":
        raise SampleError(f"sample {sample.id!r} has no user turn to answer", reason="no_prompt")
    return prompt


class ReplayDataset(Dataset):
    """The prompts of ``data`` with ``model``'s greedy replies as the assistant turns (see the module docstring)."""

    name = "replay"
    Config = ReplayConfig

    def __init__(self, config: ReplayConfig | None = None, base_dir: Path | None = None):
        super().__init__(config, base_dir)
        cfg: ReplayConfig = self.config
        inner = load_dataset(cfg.data, base_dir)
        if inner.streaming:
            raise InputError(f"replay asks a map-style dataset, and {inner.source} is streaming; list its samples in "
                             f"a JSON/JSONL file, or set samples: N on a map-style format")
        n = len(inner) if cfg.samples is None else min(cfg.samples, len(inner))
        self.inner_source = inner.source
        self.skipped = 0
        asked: list[tuple[Sample, list[dict[str, str]]]] = []
        for i in range(n):
            try:
                sample = inner[i]
                if sample.is_preference:
                    raise SampleError(f"sample {sample.id!r} is a preference pair; replay asks plain conversations",
                                      reason="preference_sample")
                asked.append((sample, prompt_of(sample)))
            except SampleError:
                self.skipped += 1
        if not asked:
            raise InputError(f"replay: none of the first {n} samples of {inner.source} has a prompt to answer "
                             f"({self.skipped} skipped)")
        self.samples = self._answer(asked)

    def _answer(self, asked: list[tuple[Sample, list[dict[str, str]]]]) -> list[Sample]:
        from mmhub.model import MMModel

        cfg: ReplayConfig = self.config
        where = self.resolve(cfg.model)
        model = MMModel.from_pretrained(str(where) if where.exists() else cfg.model).eval()
        t0 = time.perf_counter()
        out: list[Sample] = []
        for start in range(0, len(asked), cfg.batch_size):
            batch = asked[start:start + cfg.batch_size]
            try:
                replies = self._generate(model, batch)
            except (InputError, OSError):  # one unreadable item: ask one at a time, skip and count the bad ones
                replies = []
                for one in batch:
                    try:
                        replies += self._generate(model, [one])
                    except (InputError, OSError):
                        self.skipped += 1
                        replies.append(None)
            for (sample, prompt), reply in zip(batch, replies, strict=True):
                if reply is None:
                    continue
                out.append(Sample(id=f"replay:{sample.id}",
                                  messages=[*prompt, {"role": "assistant", "content": reply}],
                                  media=dict(sample.media), meta={**sample.meta, "replay_of": cfg.model}))
        self.seconds = round(time.perf_counter() - t0, 1)
        if not out:
            raise InputError(f"replay: no sample of {self.inner_source} could be answered by {cfg.model} "
                             f"({self.skipped} skipped); check the dataset's media files")
        return out

    def _generate(self, model: Any, batch: list[tuple[Sample, list[dict[str, str]]]]) -> list[str | None]:
        cfg: ReplayConfig = self.config
        replies = model.generate([p for _, p in batch], [dict(s.media) for s, _ in batch],
                                 max_new_tokens=cfg.max_new_tokens, do_sample=False, generate_media=False)
        return [r.text for r in replies]

    @property
    def source(self) -> str:
        cfg: ReplayConfig = self.config
        return f"replay of {self.inner_source} answered by {cfg.model}"

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]
