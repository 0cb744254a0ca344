"""The easy-VQA benchmark: free-form answers, exact match, accuracy overall and per question type.

Each question of the split (the first ``limit``) is asked as ``<image>\\n{question}`` (the
``easy_vqa`` dataset's ``qa`` samples) through ``model.generate`` in batches, greedily
(``do_sample=False``; the model pads on the left itself). Answers are scored with
`mmhub.evaluation.base.exact_match`: ``accuracy`` strictly (the whole normalised reply must be the
one answer word, so "yes no" is wrong) and ``accuracy_lenient`` on the reply's first word (the
score this task reported before; "yes no" counts as "yes"). Question types: ``shape``, ``color``,
``yes_no``.

The blind ablation measures how much the model uses the image (the blind score of a model that
ignores images is the language prior, near chance for yes/no). ``blind=True`` (or ``"image"``)
replaces every image by an empty canvas of the same size: one flat pale colour, easy-VQA's own
kind of background, that is no answer colour and holds no shape (`blind_image`; a mid-grey
blank would be exactly easy-VQA's "gray"). ``blind="no_image"`` asks the question with no image
at all (no placeholder, no media), for models that answer text alone. The result's
``blind_input`` says which (``image``, ``no_image``, or None when not blind).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Literal

from PIL import Image

from mmhub.data.easy_vqa import SOURCE, EasyVQAConfig, EasyVQADataset
from mmhub.data.sample import placeholder, prompt_messages
from mmhub.errors import InputError
from mmhub.evaluation.base import EvalConfig, EvalTask, exact_match, score
from mmhub.media import load_image

# easy-VQA draws each shape on a flat pale background (RGB about 230-255 per channel); this one lies among those
# and is at least 190 (Euclidean RGB) from every answer colour: the nearest, yellow (255, 255, 0), is 243 away
BLANK_RGB = (242, 246, 244)
BLIND_INPUTS = ("image", "no_image")


def blind_image(size: tuple[int, int]) -> Image.Image:
    """An empty easy-VQA canvas of `size`: one flat pale colour (`BLANK_RGB`), no answer colour, no shape."""
    return Image.new("RGB", size, BLANK_RGB)


def blank_like(image: Image.Image) -> Image.Image:
    """`blind_image` of the same size as `image`."""
    return blind_image(image.size)


def blind_input(blind: bool | str) -> str | None:
    """The blind mode: None (the real images), ``image`` (`blind_image` instead) or ``no_image``."""
    if blind is False or blind is None or blind == "":
        return None
    if blind is True:
        return "image"
    mode = str(blind).replace("-", "_")
    if mode not in BLIND_INPUTS:
        raise InputError(f"blind must be False, True, 'image' or 'no_image' (got {blind!r}): 'image' asks with an "
                         f"empty canvas instead of each picture, 'no_image' with no picture at all")
    return mode


class EasyVQATaskConfig(EvalConfig):
    data_dir: str = SOURCE  # a weight-source URI or a folder holding train/ and test/
    # "balanced": the split's yes/no questions replaced by balanced ones about the same images (`easy_vqa_balanced`)
    yes_no: Literal["split", "balanced"] = "split"


class EasyVQATask(EvalTask):
    """easy-VQA: generated answers, exact match, accuracy overall and per question type (shape, color, yes_no)."""

    name = "easy_vqa"
    Config = EasyVQATaskConfig
    modalities = ("image",)

    def run(self, model: Any, *, split: str = "test", limit: int | None = None, blind: bool | str = False,
            batch_size: int = 16, max_new_tokens: int = 8,
            on_result: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        if split not in ("train", "test"):
            raise InputError(f"easy-VQA has the splits train and test, not {split!r}")
        if batch_size < 1 or (limit is not None and limit < 1):
            raise InputError(f"batch_size and limit must be >= 1 (got {batch_size}, {limit})")
        if "image" not in getattr(model, "modalities", []):
            raise InputError(f"easy-VQA needs a model that takes images; this one takes "
                             f"{', '.join(model.modalities) or 'text only'}")
        mode = blind_input(blind)
        t0 = time.perf_counter()
        data = EasyVQADataset(EasyVQAConfig(split=split, task="qa", limit=limit, data_dir=self.config.data_dir,
                                            yes_no=self.config.yes_no))
        triples: list[tuple[str, str, str]] = []
        for start in range(0, len(data), batch_size):
            batch = [data[i] for i in range(start, min(start + batch_size, len(data)))]
            media: list[dict[str, Any]] = []
            for s in batch:
                images = [load_image(x) for x in s.media["image"]] if mode != "no_image" else []
                media.append({"image": [blank_like(im) for im in images] if mode == "image" else images}
                             if images else {})
            # the question only: never the reference answer
            prompts = [_prompt(s.messages, without_images=mode == "no_image") for s in batch]
            replies = model.generate(prompts, media, max_new_tokens=max_new_tokens, do_sample=False)
            for s, reply in zip(batch, replies, strict=True):
                kind, answer = s.meta["question_type"], s.meta["answer"]
                triples.append((reply.text, answer, kind))
                if on_result is not None:
                    on_result({"id": s.id, "question": s.meta["question"], "answer": answer, "prediction": reply.text,
                               "type": kind, "correct": exact_match(reply.text, answer),
                               "correct_lenient": exact_match(reply.text, answer, lenient=True)})
        result = score(triples)
        return {"task": self.name, "split": split, **{k: result[k] for k in (
                    "n", "correct", "accuracy", "correct_lenient", "accuracy_lenient", "per_type", "refusals",
                    "refusal_rate")},
                "blind": mode is not None, "blind_input": mode, "max_new_tokens": max_new_tokens,
                "batch_size": batch_size, "seconds": round(time.perf_counter() - t0, 3)}


def _prompt(messages: list[dict[str, str]], without_images: bool = False) -> list[dict[str, str]]:
    """The conversation up to (not including) the final assistant turn, which holds the reference answer; with
    `without_images` the image placeholders (``<image>`` and the newline after it) are taken out."""
    out = prompt_messages(messages)
    if without_images:
        mark = placeholder("image")
        for m in out:
            m["content"] = m["content"].replace(mark + "\n", "").replace(mark, "")
    return out


class EasyVQABalancedConfig(EasyVQATaskConfig):
    yes_no: Literal["split", "balanced"] = "balanced"


class EasyVQABalancedTask(EasyVQATask):
    """easy-VQA with each yes/no question replaced by one about the same image whose answer is yes half the time:
    about 83% of the split's own yes/no answers follow from the wording, these only from the picture."""

    name = "easy_vqa_balanced"
    Config = EasyVQABalancedConfig
