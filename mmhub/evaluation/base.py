"""Evaluation tasks (a plugin kind, ``register_eval_tasks``) and the shared answer scoring.

An `EvalTask` has a ``name``, a pydantic ``Config`` (extra settings are errors) and
``run(model, *, split, limit, blind, batch_size, max_new_tokens, on_result) -> dict`` returning
at least ``task``, ``split``, ``n``, ``accuracy`` (a fraction in [0, 1]), ``per_type``,
``blind`` and ``seconds``. ``on_result`` (optional) receives one dict per scored item.

Answer normalisation (`normalize_answer`), exactly:

1. lowercase;
2. every ASCII punctuation character becomes a space;
3. split on whitespace and drop the articles ``a``, ``an``, ``the``;
4. with ``one_word=True``, keep only the first remaining word (so "Circle." -> "circle",
   "Yes, it is." -> "yes", "a red one" -> "red"); else join the words with single spaces.

`exact_match(prediction, answer)` normalises both and compares them whole: strict, so a reply
naming two answers ("yes no") or saying more than the answer ("yes, it is") is wrong. With
``lenient=True`` a one-word answer is compared with the reply's first word only (``one_word``), so
"yes no" and "a red one" count as "yes" and "red". An empty prediction never matches. `score`
reports both: ``accuracy`` (strict) and ``accuracy_lenient``, overall and per type, and ``refusals`` /
``refusal_rate``: the replies that decline to answer (`mmhub.evaluation.refusal.is_refusal`), false refusals on
questions every one of which has an answer.
"""

from __future__ import annotations

import string
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Iterable

from pydantic import BaseModel, ConfigDict

from mmhub.evaluation.refusal import is_refusal

ARTICLES = frozenset({"a", "an", "the"})
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalize_answer(text: str, one_word: bool = False) -> str:
    """Normalise a free-form answer for exact match (see the module docstring for the exact steps)."""
    words = [w for w in text.lower().translate(_PUNCT).split() if w not in ARTICLES]
    if one_word:
        return words[0] if words else ""
    return " ".join(words)


def exact_match(prediction: str, answer: str, lenient: bool = False) -> bool:
    """Whether `prediction` matches the reference `answer` after normalisation: the whole reply (strict), or with
    `lenient` its first word when the answer is one word (see the module docstring)."""
    ref = normalize_answer(answer)
    pred = normalize_answer(prediction, one_word=lenient and len(ref.split()) == 1)
    return bool(pred) and pred == ref


def score(items: Iterable[tuple[str, str, str]]) -> dict[str, Any]:
    """(prediction, answer, type) triples -> ``{n, correct, accuracy, correct_lenient, accuracy_lenient,
    per_type: {type: {the same five}}, refusals, refusal_rate}``: strict exact match, the lenient first-word score
    beside it, and the replies that are refusals."""
    total = {"n": 0, "correct": 0, "correct_lenient": 0}
    refusals = 0
    per: dict[str, dict[str, Any]] = {}
    for prediction, answer, kind in items:
        strict, lenient = exact_match(prediction, answer), exact_match(prediction, answer, lenient=True)
        refusals += is_refusal(prediction)
        for bucket in (total, per.setdefault(kind, {"n": 0, "correct": 0, "correct_lenient": 0})):
            bucket["n"] += 1
            bucket["correct"] += strict
            bucket["correct_lenient"] += lenient
    for bucket in (total, *per.values()):
        n = bucket["n"]
        bucket["accuracy"] = bucket["correct"] / n if n else 0.0
        bucket["accuracy_lenient"] = bucket["correct_lenient"] / n if n else 0.0
    return {"n": total["n"], "correct": total["correct"], "accuracy": total["accuracy"],
            "correct_lenient": total["correct_lenient"], "accuracy_lenient": total["accuracy_lenient"],
            "per_type": {k: {f: per[k][f] for f in ("n", "correct", "accuracy", "correct_lenient",
                                                    "accuracy_lenient")} for k in sorted(per)},
            "refusals": refusals, "refusal_rate": refusals / total["n"] if total["n"] else 0.0}


class EvalConfig(BaseModel):
    """Settings of an evaluation task (subclass it; unknown settings are errors)."""

    model_config = ConfigDict(extra="forbid")


class EvalTask(ABC):
    """An evaluation: runs a model on a benchmark split and returns its scores (see the module docstring)."""

    name: ClassVar[str]
    Config: ClassVar[type[EvalConfig]] = EvalConfig
    modalities: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: EvalConfig | None = None):
        self.config = config if config is not None else self.Config()

    @abstractmethod
    def run(self, model: Any, *, split: str = "test", limit: int | None = None, blind: bool = False,
            batch_size: int = 16, max_new_tokens: int = 8,
            on_result: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]: ...

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip().splitlines()
        return doc[0] if doc else cls.__name__
