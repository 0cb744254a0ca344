"""Photo refusal: does the model decline to answer about real photos, and only about them?

Each of the hand-written questions in ``mmhub/recipes/heldout/photos.json`` is asked (``<image>\\n{question}``,
greedily) about every **held-out** photo there (`mmhub.data.photos.load_photo`; never trained on) and about the
first ``easy_vqa_images`` easy-VQA test images. A reply is a refusal by `mmhub.evaluation.refusal.is_refusal`
(it says it can only answer about simple coloured shapes, cannot tell, does not know, or that the picture is not
a simple shape picture). Reported: ``refusal_rate`` (refusals among the photo replies; also ``accuracy``),
``false_refusal_rate`` (refusals among the easy-VQA replies), ``n`` / ``n_easy_vqa`` (replies scored), and
``per_photo`` (refusal rate per held-out photo). ``limit`` takes the first N photos. The replies get at least
24 new tokens (``max(max_new_tokens, 24)``) so that a refusal sentence fits. Blind runs have no meaning here.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from pydantic import Field

from mmhub.data.easy_vqa import SOURCE, EasyVQAConfig, EasyVQADataset
from mmhub.data.photos import load_photo
from mmhub.errors import InputError
from mmhub.evaluation.base import EvalConfig, EvalTask
from mmhub.evaluation.heldout import photo_list
from mmhub.evaluation.refusal import is_refusal
from mmhub.evaluation.reworded import check_run, user_text
from mmhub.media import load_image

MIN_REPLY_TOKENS = 24


class PhotoRefusalConfig(EvalConfig):
    data_dir: str = SOURCE  # the easy-VQA data (a weight-source URI or a folder holding test/)
    photos: str = ""  # another photo list of the same format; empty: the shipped photos.json
    easy_vqa_images: int = Field(12, ge=1)  # easy-VQA test images (ids in file order) for the false-refusal rate


class PhotoRefusalTask(EvalTask):
    """Photo refusal: the refusal rate on held-out real photos and the false-refusal rate on easy-VQA images."""

    name = "photo_refusal"
    Config = PhotoRefusalConfig
    modalities = ("image",)

    def run(self, model: Any, *, split: str = "test", limit: int | None = None, blind: bool | str = False,
            batch_size: int = 16, max_new_tokens: int = 8,
            on_result: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        check_run(self.name, model, split, limit, batch_size)
        if blind:
            raise InputError(f"{self.name} has no blind mode: it measures how the model treats the pictures "
                             f"themselves (got blind={blind!r})")
        t0 = time.perf_counter()
        listing = photo_list(self.config.photos or None)
        questions = listing["questions"]
        data = EasyVQADataset(EasyVQAConfig(split="test", task="caption", data_dir=self.config.data_dir))
        pictures = [("photo", p["name"], load_photo(p["source"])) for p in listing["held_out"][:limit]]
        pictures += [("easy_vqa", str(i), load_image(data.image_path(i)))
                     for i in data.image_ids[:self.config.easy_vqa_images]]
        jobs = [(source, name, image, q) for source, name, image in pictures for q in questions]
        refused: dict[str, list[bool]] = {"photo": [], "easy_vqa": []}
        per_photo: dict[str, list[bool]] = {}
        tokens = max(max_new_tokens, MIN_REPLY_TOKENS)
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start:start + batch_size]
            prompts = [[{"role": "user", "content": user_text(q, True, None)}] for _, _, _, q in batch]
            replies = model.generate(prompts, [{"image": [im]} for _, _, im, _ in batch], max_new_tokens=tokens,
                                     do_sample=False)
            for (source, name, _, q), reply in zip(batch, replies, strict=True):
                r = is_refusal(reply.text)
                refused[source].append(r)
                if source == "photo":
                    per_photo.setdefault(name, []).append(r)
                if on_result is not None:
                    on_result({"source": source, "picture": name, "question": q, "prediction": reply.text,
                               "refusal": r})
        rate = {k: sum(v) / len(v) if v else 0.0 for k, v in refused.items()}
        return {"task": self.name, "split": split, "n": len(refused["photo"]), "accuracy": rate["photo"],
                "refusal_rate": rate["photo"], "n_easy_vqa": len(refused["easy_vqa"]),
                "false_refusal_rate": rate["easy_vqa"],
                "per_type": {k: {"n": len(v), "refusals": sum(v), "rate": rate[k]} for k, v in refused.items()},
                "per_photo": {k: sum(v) / len(v) for k, v in per_photo.items()},
                "blind": False, "max_new_tokens": tokens, "batch_size": batch_size,
                "seconds": round(time.perf_counter() - t0, 3)}
