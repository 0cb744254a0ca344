"""The easy-VQA benchmark: free-form answers, exact match, accuracy overall and per question type.

Each question of the split (the first ``limit``) is asked as ``<image>\\n{question}`` (the
``easy_vqa`` dataset's ``qa`` samples) through ``model.generate`` in batches, greedily
(``do_sample=False``; the model pads on the left itself). Answers are scored with
`mmhub.evaluation.base.exact_match` (every easy-VQA answer is one word, so the first word of
the normalised reply counts). Question types: ``shape``, ``color``, ``yes_no``.

``blind=True`` replaces every image by a blank one of the same size (mid grey, RGB 128,128,128):
the gap between the two accuracies measures how much the model uses the image (the blind
score of a model that ignores images is the language prior, near chance for yes/no).
"""

from __future__ import annotations

import time
from typing import Any, Callable

from PIL import Image

from mmhub.data.easy_vqa import SOURCE, EasyVQAConfig, EasyVQADataset
from mmhub.errors import InputError
from mmhub.evaluation.base import EvalConfig, EvalTask, exact_match, score
from mmhub.media import load_image

BLANK_RGB = (128, 128, 128)


def blank_like(image: Image.Image) -> Image.Image:
    """A mid-grey RGB image of the same size as `image`."""
    return Image.new("RGB", image.size, BLANK_RGB)


class EasyVQATaskConfig(EvalConfig):
    data_dir: str = SOURCE  # a weight-source URI or a folder holding train/ and test/


class EasyVQATask(EvalTask):
    """easy-VQA: generated answers, exact match, accuracy overall and per question type (shape, color, yes_no)."""

    name = "easy_vqa"
    Config = EasyVQATaskConfig
    modalities = ("image",)

    def run(self, model: Any, *, split: str = "test", limit: int | None = None, blind: bool = False,
            batch_size: int = 16, max_new_tokens: int = 8,
            on_result: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        if split not in ("train", "test"):
            raise InputError(f"easy-VQA has the splits train and test, not {split!r}")
        if batch_size < 1 or (limit is not None and limit < 1):
            raise InputError(f"batch_size and limit must be >= 1 (got {batch_size}, {limit})")
        if "image" not in getattr(model, "modalities", []):
            raise InputError(f"easy-VQA needs a model that takes images; this one takes "
                             f"{', '.join(model.modalities) or 'text only'}")
        t0 = time.perf_counter()
        data = EasyVQADataset(EasyVQAConfig(split=split, task="qa", limit=limit, data_dir=self.config.data_dir))
        triples: list[tuple[str, str, str]] = []
        for start in range(0, len(data), batch_size):
            batch = [data[i] for i in range(start, min(start + batch_size, len(data)))]
            media = []
            for s in batch:
                images = [load_image(x) for x in s.media["image"]]
                media.append({"image": [blank_like(im) for im in images] if blind else images})
            prompts = [_prompt(s.messages) for s in batch]  # the question only: never the reference answer
            replies = model.generate(prompts, media, max_new_tokens=max_new_tokens, do_sample=False)
            for s, reply in zip(batch, replies, strict=True):
                kind, answer = s.meta["question_type"], s.meta["answer"]
                triples.append((reply.text, answer, kind))
                if on_result is not None:
                    on_result({"id": s.id, "question": s.meta["question"], "answer": answer, "prediction": reply.text,
                               "type": kind, "correct": exact_match(reply.text, answer)})
        result = score(triples)
        return {"task": self.name, "split": split, "n": result["n"], "correct": result["correct"],
                "accuracy": result["accuracy"], "per_type": result["per_type"], "blind": blind,
                "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                "seconds": round(time.perf_counter() - t0, 3)}


def _prompt(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The conversation up to (not including) the final assistant turn, which holds the reference answer."""
    end = len(messages)
    while end and messages[end - 1]["role"] == "assistant":
        end -= 1
    return [dict(m) for m in messages[:end]]
