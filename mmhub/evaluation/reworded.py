"""easy-VQA reworded: hand-written questions on easy-VQA test images, scored strictly, per question type.

The questions are ``mmhub/recipes/heldout/easy_vqa_reworded.jsonl`` (504, never trained on; see that folder's
README for how they were written and the answer convention for negated questions). Each is asked as
``<image>\\n{question}`` with its easy-VQA test image, greedily, in batches, and scored like the ``easy_vqa``
task (`mmhub.evaluation.base.score`): ``accuracy`` strict (the whole normalised reply must be the answer word)
and ``accuracy_lenient`` (the reply's first word), overall and per type (`REWORDED_TYPES`). ``limit`` takes the
first N lines, which interleave the types. ``blind`` works as in ``easy_vqa`` (an empty canvas, or no image).
"""

from __future__ import annotations

import time
from typing import Any, Callable

from mmhub.data.easy_vqa import SOURCE, EasyVQAConfig, EasyVQADataset
from mmhub.data.sample import placeholder
from mmhub.errors import InputError
from mmhub.evaluation.base import EvalConfig, EvalTask, exact_match, score
from mmhub.evaluation.easy_vqa import blank_like, blind_input
from mmhub.evaluation.heldout import reworded_items
from mmhub.media import load_image


class RewordedConfig(EvalConfig):
    data_dir: str = SOURCE  # the easy-VQA data (a weight-source URI or a folder holding test/)
    questions: str = ""  # another file of the same format; empty: the shipped held-out set


def check_run(task: str, model: Any, split: str, limit: int | None, batch_size: int) -> None:
    """The checks every held-out easy-VQA task makes before it starts (test split, sizes, an image model)."""
    if split != "test":
        raise InputError(f"{task} asks about easy-VQA test images only; use split 'test' (got {split!r})")
    if batch_size < 1 or (limit is not None and limit < 1):
        raise InputError(f"batch_size and limit must be >= 1 (got {batch_size}, {limit})")
    if "image" not in getattr(model, "modalities", []):
        raise InputError(f"{task} needs a model that takes images; this one takes "
                         f"{', '.join(model.modalities) or 'text only'}")


def show(images: list[Any], mode: str | None) -> dict[str, list[Any]]:
    """The media of one prompt: the images, blank canvases of their size (``image``), or none (``no_image``)."""
    if mode == "no_image" or not images:
        return {}
    return {"image": [blank_like(im) for im in images] if mode == "image" else images}


def user_text(question: str, with_image: bool, mode: str | None) -> str:
    """A user message: the question, after the image placeholder when the turn shows an image (not when blind
    without images)."""
    return f"{placeholder('image')}\n{question}" if with_image and mode != "no_image" else question


class EasyVQARewordedTask(EvalTask):
    """easy-VQA reworded: 504 hand-written held-out questions on test images, strict accuracy per question type."""

    name = "easy_vqa_reworded"
    Config = RewordedConfig
    modalities = ("image",)

    def run(self, model: Any, *, split: str = "test", limit: int | None = None, blind: bool | str = False,
            batch_size: int = 16, max_new_tokens: int = 8,
            on_result: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        check_run(self.name, model, split, limit, batch_size)
        mode = blind_input(blind)
        t0 = time.perf_counter()
        items = reworded_items(self.config.questions or None)[:limit]
        data = EasyVQADataset(EasyVQAConfig(split="test", task="caption", data_dir=self.config.data_dir))
        triples: list[tuple[str, str, str]] = []
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            prompts = [[{"role": "user", "content": user_text(it["question"], True, mode)}] for it in batch]
            media = [show([load_image(data.image_path(it["image"]))], mode) for it in batch]
            replies = model.generate(prompts, media, max_new_tokens=max_new_tokens, do_sample=False)
            for it, reply in zip(batch, replies, strict=True):
                triples.append((reply.text, it["answer"], it["type"]))
                if on_result is not None:
                    on_result({"image": it["image"], "question": it["question"], "answer": it["answer"],
                               "prediction": reply.text, "type": it["type"],
                               "correct": exact_match(reply.text, it["answer"]),
                               "correct_lenient": exact_match(reply.text, it["answer"], lenient=True)})
        result = score(triples)
        return {"task": self.name, "split": split, **{k: result[k] for k in (
                    "n", "correct", "accuracy", "correct_lenient", "accuracy_lenient", "per_type", "refusals",
                    "refusal_rate")},
                "blind": mode is not None, "blind_input": mode, "max_new_tokens": max_new_tokens,
                "batch_size": batch_size, "seconds": round(time.perf_counter() - t0, 3)}
