"""``easy_vqa_varied``: easy-VQA train images with grammar-generated questions and conversations (plus chat replay).

The questions come from `mmhub.data.easy_vqa_grammar` (many frames per question type, synonyms, negation,
and/or, polite and indirect forms); each image's shape and colour from `mmhub.data.easy_vqa` (its questions,
the rest read from its pixels). Only the **train** split's images are used: the test split stays for evaluation.

Settings:

* ``samples`` (default 40,000): the dataset's length. Sample ``i`` is drawn from its own generator seeded
  by ``(seed, i)``, so random access is deterministic and the same ``seed`` gives the same samples.
* ``question_types`` (default ``{yes_no: 2, shape: 1, color: 1}``): relative weights of the single-turn
  question types; within a type the answer is drawn uniformly (yes/no, the 3 shapes, the 8 colours).
* ``conversations`` (default 0.25): share of the image samples that are conversations of 2..``max_turns``
  turns (follow-ups about the same image, or, share ``cross_image`` of them, about two images; the second
  is shown in the second turn and later turns name "the first" / "the second" image or compare them).
* ``ellipsis`` (default 0): share of follow-ups asked elliptically where one fits ("And a triangle?", "And its
  colour?", "And this one?"); ``compare`` (default 0.5): share of two-image conversations with a comparison turn.
* ``negatives`` (default 0): share of the image samples that show a picture which is not an easy-VQA scene
  (`mmhub.data.negatives`: crops of the bundled train photos in ``negative_photos``, noise, text, flat colours,
  patterns), asked a grammar question or an open one ("describe this photo") and answered with the refusal
  (`mmhub.data.negatives.REFUSAL`). ``negative_photos: []`` keeps the synthetic kinds only.
* ``replay_fraction`` (default 0): share of the samples taken, evenly spread, from ``replay_path`` (a
  ShareGPT file, default the recipes' text-only ``chat_replay.jsonl``), so the language model keeps its chat.
* ``seed``, ``data_dir`` (as for ``easy_vqa``).

Each image sample's ``meta``: ``kind`` (``single`` / ``conversation``), ``image_ids``, and ``turns``: per turn
``question``, ``answer``, ``question_type`` (``yes_no``/``shape``/``color``), ``construction`` (the frame's
id), ``form`` (the logical form) and ``image`` (which of ``image_ids`` it asks about). Single-turn samples also
carry ``question``, ``answer``, ``question_type`` and ``image_id`` like ``easy_vqa``'s. Replay samples have
``meta = {kind: replay, source: <the replay sample's id>}``; negatives ``meta = {kind: negative, picture: <photo,
noise, text, blank or pattern>, question, answer}``.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, field_validator

from mmhub.data.base import Dataset, DatasetConfig
from mmhub.data.easy_vqa import SOURCE, EasyVQAConfig, EasyVQADataset
from mmhub.data.easy_vqa_grammar import ImagePool, Turn, conversation, single_turn
from mmhub.data.negatives import REFUSAL, TRAIN_PHOTOS, load_photos, negative_image, open_question
from mmhub.data.sample import Sample
from mmhub.errors import InputError

QuestionType = Literal["yes_no", "shape", "color"]


class EasyVQAVariedConfig(DatasetConfig):
    split: Literal["train"] = Field("train", description="train images only; the test split is kept for evaluation")
    samples: int = Field(40_000, ge=1, description="the dataset's length (sample i is seeded by (seed, i))")
    question_types: dict[QuestionType, float] = Field(
        default_factory=lambda: {"yes_no": 2.0, "shape": 1.0, "color": 1.0},
        description="relative weights of the single-turn question types")
    conversations: float = Field(0.25, ge=0, le=1, description="share of image samples that are conversations")
    cross_image: float = Field(0.5, ge=0, le=1, description="share of conversations about two images")
    max_turns: int = Field(4, ge=2, le=8, description="most turns per conversation (at least 2)")
    ellipsis: float = Field(0.0, ge=0, le=1, description="share of follow-ups asked elliptically where one fits "
                            "('And a triangle?', 'And its colour?', 'And this one?', 'What about the first picture?')")
    compare: float = Field(0.5, ge=0, le=1, description="share of two-image conversations with a comparison turn")
    negatives: float = Field(0.0, ge=0, lt=1, description="share of image samples showing a non-easy-VQA picture, "
                             "answered with the refusal")
    negative_photos: list[str] = Field(default_factory=lambda: list(TRAIN_PHOTOS),
                                       description="bundled photos the negatives crop (mmhub.data.photos sources)")
    replay_fraction: float = Field(0.0, ge=0, lt=1, description="share of samples taken from replay_path")
    replay_path: str = Field("mmhub:recipes/chat_replay.jsonl", description="text-only ShareGPT chat to replay")
    seed: int = 0
    data_dir: str = Field(SOURCE, description="easy-VQA's data: a weight-source URI or a folder")

    @field_validator("split", mode="before")
    @classmethod
    def _train_only(cls, value):
        if value != "train":
            raise ValueError(f"split {value!r}: easy_vqa_varied asks about the train split's images only (the test "
                             "split is kept for evaluation); remove split or set split: train")
        return value


class EasyVQAVariedDataset(Dataset):
    """easy-VQA train images with grammar-varied questions, follow-up conversations and optional chat replay."""

    name = "easy_vqa_varied"
    Config = EasyVQAVariedConfig
    modalities = ("image",)

    def __init__(self, config: EasyVQAVariedConfig | None = None, base_dir: Path | None = None, registry=None):
        super().__init__(config, base_dir)
        c = self.config
        weights = {k: float(v) for k, v in c.question_types.items() if v > 0}
        if not weights:
            raise InputError(f"easy_vqa_varied: question_types {c.question_types} gives no type a positive weight; "
                             "e.g. question_types: {yes_no: 2, shape: 1, color: 1}")
        self.types = sorted(weights)
        self.type_p = np.array([weights[t] for t in self.types]) / sum(weights.values())
        self.images = EasyVQADataset(EasyVQAConfig(split="train", task="caption", data_dir=c.data_dir), base_dir,
                                     registry)
        self.pool = ImagePool({i: self.images.full_facts(i) for i in self.images.image_ids})
        if c.negatives > 0:  # a photo that cannot load is named now, not in the middle of a run
            load_photos(c.negative_photos)
        self.replay: Dataset | None = None
        if c.replay_fraction > 0:
            from mmhub.data.sharegpt import ShareGPTConfig, ShareGPTDataset

            self.replay = ShareGPTDataset(ShareGPTConfig(path=c.replay_path), base_dir)
            if len(self.replay) == 0:
                raise InputError(f"easy_vqa_varied: replay_path {c.replay_path} has no samples; "
                                 "point it at a ShareGPT file or set replay_fraction: 0")
            self.replay_order = np.random.default_rng([c.seed, 1]).permutation(len(self.replay))

    @property
    def source(self) -> str:
        return f"easy_vqa_varied dataset (train images in {self.images.root})"

    def __len__(self) -> int:
        return self.config.samples

    def _replay_slot(self, index: int) -> int | None:
        """The replay sample at `index` (every 1/replay_fraction-th position), or None for an image sample."""
        f = self.config.replay_fraction
        if self.replay is None or math.floor((index + 1) * f) == math.floor(index * f):
            return None
        return int(self.replay_order[math.floor(index * f) % len(self.replay_order)])

    def __getitem__(self, index: int) -> Sample:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {self.source} ({n} samples)")
        sid = f"easy_vqa_varied/{self.config.seed}/{index}"
        slot = self._replay_slot(index)
        if slot is not None:
            s = self.replay[slot]
            return Sample(id=sid, messages=s.messages, media=s.media, meta={"kind": "replay", "source": s.id})
        c = self.config
        rng = np.random.default_rng([c.seed, index])
        if c.negatives and rng.random() < c.negatives:
            return self._negative(sid, rng)
        if rng.random() < c.conversations:
            image_ids, turns = conversation(self.pool, rng, c.max_turns, c.cross_image, c.ellipsis, c.compare)
            kind = "conversation"
        else:
            turn = single_turn(self.pool, rng, str(rng.choice(self.types, p=self.type_p)))
            image_ids, turns, kind = [turn.image_id], [turn], "single"
        messages = []
        for t in turns:
            messages += [{"role": "user", "content": t.user}, {"role": "assistant", "content": t.answer}]
        meta = {"kind": kind, "image_ids": image_ids, "turns": [_turn_meta(t) for t in turns]}
        if kind == "single":
            meta |= {"question": turns[0].question, "answer": turns[0].answer,
                     "question_type": turns[0].form.question_type, "image_id": image_ids[0]}
        return Sample(id=sid, messages=messages, media={"image": [self.images.image_path(i) for i in image_ids]},
                      meta=meta)

    def _negative(self, sid: str, rng: np.random.Generator) -> Sample:
        """A non-easy-VQA picture, a grammar or open question about it, and the refusal."""
        picture, image = negative_image(rng, self.config.negative_photos)
        question = single_turn(self.pool, rng).question if rng.random() < 0.6 else open_question(rng)
        return Sample(id=sid, messages=[{"role": "user", "content": "<image>\n" + question},
                                        {"role": "assistant", "content": REFUSAL}],
                      media={"image": [image]},
                      meta={"kind": "negative", "picture": picture, "question": question, "answer": REFUSAL})


def _turn_meta(turn: Turn) -> dict:
    return {"question": turn.question, "answer": turn.answer, "question_type": turn.form.question_type,
            "construction": turn.construction, "form": asdict(turn.form), "image": turn.form.image}
