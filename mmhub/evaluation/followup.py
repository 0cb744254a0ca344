"""easy-VQA follow-ups: multi-turn conversations about one test image or across two, scored per turn.

The conversations are ``mmhub/recipes/heldout/easy_vqa_followup.jsonl`` (112, 335 turns, never trained on).
Turn k is asked with the whole conversation before it as history, each earlier turn's user message followed by
that turn's **expected** answer as the assistant message (so one wrong reply does not spoil the next turns),
through the model's own chat template (``model.generate`` on the message list). A turn that shows an image
starts its user message with the image placeholder; the turn's media are the images shown up to and including
it, in order. Replies are scored strictly and leniently (`mmhub.evaluation.base.score`): ``accuracy`` over all
turns, ``per_type`` (the reworded set's types plus ``compare``), ``per_turn`` (``"1"``, ``"2"``, ...: by the
turn's position), and ``conversations_correct``: the fraction of conversations with every turn right
(strictly). ``limit`` takes the first N conversations; ``blind`` works as in ``easy_vqa``.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from mmhub.data.easy_vqa import EasyVQAConfig, EasyVQADataset
from mmhub.evaluation.base import EvalTask, exact_match, score
from mmhub.evaluation.easy_vqa import blind_input
from mmhub.evaluation.heldout import followup_conversations
from mmhub.evaluation.reworded import RewordedConfig, check_run, show, user_text
from mmhub.media import load_image


def turn_prompts(conv: dict[str, Any], mode: str | None = None) -> list[tuple[list[dict[str, str]], list[int]]]:
    """For each turn of `conv`: (the messages up to its question, with the earlier turns' expected answers; the
    indexes into ``conv["images"]`` shown so far)."""
    out, history, shown = [], [], []
    for turn in conv["turns"]:
        if "image" in turn:
            shown = [*shown, turn["image"]]
        history = [*history, {"role": "user", "content": user_text(turn["question"], "image" in turn, mode)}]
        out.append((history, shown))
        history = [*history, {"role": "assistant", "content": turn["answer"]}]
    return out


class EasyVQAFollowupTask(EvalTask):
    """easy-VQA follow-ups: 112 held-out conversations (2-4 turns), strict accuracy per turn and per type."""

    name = "easy_vqa_followup"
    Config = RewordedConfig
    modalities = ("image",)

    def run(self, model: Any, *, split: str = "test", limit: int | None = None, blind: bool | str = False,
            batch_size: int = 16, max_new_tokens: int = 8,
            on_result: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        check_run(self.name, model, split, limit, batch_size)
        mode = blind_input(blind)
        t0 = time.perf_counter()
        convs = followup_conversations(self.config.questions or None)[:limit]
        data = EasyVQADataset(EasyVQAConfig(split="test", task="caption", data_dir=self.config.data_dir))
        jobs = [(c, k, messages, shown) for c in convs for k, (messages, shown) in enumerate(turn_prompts(c, mode))]
        triples: list[tuple[str, str, str]] = []
        by_turn: list[tuple[str, str, str]] = []
        wrong: set[str] = set()
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start:start + batch_size]
            media = [show([load_image(data.image_path(c["images"][i])) for i in shown], mode)
                     for c, _, _, shown in batch]
            replies = model.generate([m for _, _, m, _ in batch], media, max_new_tokens=max_new_tokens,
                                     do_sample=False)
            for (c, k, _, _), reply in zip(batch, replies, strict=True):
                turn = c["turns"][k]
                triples.append((reply.text, turn["answer"], turn["type"]))
                by_turn.append((reply.text, turn["answer"], str(k + 1)))
                correct = exact_match(reply.text, turn["answer"])
                if not correct:
                    wrong.add(c["id"])
                if on_result is not None:
                    on_result({"id": c["id"], "turn": k + 1, "images": c["images"], "question": turn["question"],
                               "answer": turn["answer"], "prediction": reply.text, "type": turn["type"],
                               "correct": correct, "correct_lenient": exact_match(reply.text, turn["answer"],
                                                                                  lenient=True)})
        result = score(triples)
        return {"task": self.name, "split": split, **{k: result[k] for k in (
                    "n", "correct", "accuracy", "correct_lenient", "accuracy_lenient", "per_type", "refusals",
                    "refusal_rate")},
                "per_turn": score(by_turn)["per_type"], "n_conversations": len(convs),
                "conversations_correct": (len(convs) - len(wrong)) / len(convs) if convs else 0.0,
                "blind": mode is not None, "blind_input": mode, "max_new_tokens": max_new_tokens,
                "batch_size": batch_size, "seconds": round(time.perf_counter() - t0, 3)}
