"""Pre-flight check: tokenize a sample of the data with the model's own processor before training on it.

`preflight(model, dataset)` reads ``n`` samples (a seeded random subset of a map-style dataset,
the first ``n`` of a stream), reads their media and encodes them with ``model.processor``
exactly as training will, and counts per problem:

* ``all_masked``: every label is -100 (no assistant tokens to learn from);
* ``placeholder_mismatch``: the text's placeholders (the model's markers, ``<image>`` by
  default) do not match the number of media items;
* ``unsupported_modality``: the sample has items of a modality the model has no encoder for;
* ``too_long``: the spliced length (text tokens, each placeholder replaced by
  ``model.plan.tokens_per_item(m)`` media tokens) exceeds the backbone's context length;
* ``missing_file`` / ``unreadable_media`` / ``malformed_record``: the record or its media
  cannot be read; ``encode_failed``: the processor refused the sample for another reason.

Preference samples are checked with both replies (prompt + chosen, prompt + rejected). When
more than ``max_bad_fraction`` of the checked samples have a problem, `InputError` is raised
with the counts and up to 3 examples per problem (the report rides along as ``exc.report``);
otherwise the `PreflightReport` is returned (``print(report)``, ``report.to_dict()``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from mmhub.data.base import SampleError
from mmhub.data.robust import CAUGHT, classify, load_media
from mmhub.data.sample import Sample
from mmhub.errors import InputError
from mmhub.splice import IGNORE

MAX_EXAMPLES = 3


@dataclass
class PreflightReport:
    """What `preflight` found: samples checked, problems counted per kind, examples, token lengths."""

    source: str
    checked: int
    max_bad_fraction: float
    context_length: int
    problems: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    bad_samples: int = 0
    longest: int = 0
    mean_length: float = 0.0

    @property
    def bad_fraction(self) -> float:
        return self.bad_samples / self.checked if self.checked else 0.0

    @property
    def ok(self) -> bool:
        return self.bad_samples <= self.max_bad_fraction * self.checked

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "checked": self.checked, "bad_samples": self.bad_samples,
                "bad_fraction": self.bad_fraction, "max_bad_fraction": self.max_bad_fraction, "ok": self.ok,
                "problems": dict(self.problems), "examples": {k: list(v) for k, v in self.examples.items()},
                "context_length": self.context_length, "longest": self.longest, "mean_length": self.mean_length}

    def __str__(self) -> str:
        head = (f"preflight of {self.source}: {self.checked} sample(s) checked, {self.bad_samples} with problems "
                f"({self.bad_fraction:.1%}; allowed {self.max_bad_fraction:.1%}); longest {self.longest} of "
                f"{self.context_length} context tokens, mean {self.mean_length:.1f}")
        lines = [head]
        for kind, count in sorted(self.problems.items()):
            lines.append(f"  {kind}: {count}")
            lines += [f"    sample {e['index']} ({e['id']}): {e['detail']}" for e in self.examples.get(kind, [])]
        return "\n".join(lines)

    def add(self, kind: str, index: Any, sample_id: Any, detail: str) -> None:
        self.problems[kind] = self.problems.get(kind, 0) + 1
        shown = self.examples.setdefault(kind, [])
        if len(shown) < MAX_EXAMPLES:
            shown.append({"index": index, "id": sample_id, "detail": detail})


def _samples(dataset: Any, n: int, seed: int) -> list[tuple[Any, Sample | BaseException]]:
    if getattr(dataset, "streaming", False):
        return list(enumerate(islice(dataset.iter_items(), n)))
    total = len(dataset)
    picks = range(total) if total <= n else sorted(random.Random(seed).sample(range(total), n))
    out: list[tuple[Any, Sample | BaseException]] = []
    for i in picks:
        try:
            out.append((i, dataset[i]))
        except CAUGHT as exc:
            out.append((i, exc))
    return out


def _check(model: Any, index: Any, sample: Sample, report: PreflightReport, lengths: list[int]) -> set[str]:
    proc, plan = model.processor, model.plan
    found: set[str] = set()

    def problem(kind: str, detail: str) -> None:
        found.add(kind)
        report.add(kind, index, sample.id, detail)

    text = "".join(m.get("content", "") for m in sample.messages)
    for mod, items in sample.media.items():
        if items and mod not in proc.placeholders:
            problem("unsupported_modality", f"{len(items)} {mod} item(s), but the model takes "
                                            f"{', '.join(proc.placeholders) or 'text only'}")
    for mod, mark in proc.placeholders.items():
        n_marks, n_items = text.count(mark), len(sample.media.get(mod, []))
        if n_marks != n_items:
            problem("placeholder_mismatch", f"{n_marks} {mark} placeholder(s) but {n_items} {mod} item(s)")
    if found:
        return found
    try:
        media = load_media(sample).media
    except SampleError as exc:
        problem(exc.reason, str(exc))
        return found
    replies = [sample.chosen, sample.rejected] if sample.is_preference else [None]
    for reply in replies:
        try:
            enc = proc.encode(sample.conversation(reply), media, index=index if isinstance(index, int) else None)
        except CAUGHT as exc:
            problem("encode_failed", str(exc))
            return found
        marks = {m: text.count(p) for m, p in proc.placeholders.items()}
        length = len(enc.input_ids) + sum(k * (plan.tokens_per_item(m) - 1) for m, k in marks.items())
        lengths.append(length)
        which = "" if reply is None else (" (chosen)" if reply is sample.chosen else " (rejected)")
        if all(label == IGNORE for label in enc.labels):
            problem("all_masked", f"every label is -100{which}: no assistant reply to learn from")
        if length > report.context_length:
            media_tokens = length - len(enc.input_ids) + sum(marks.values())
            problem("too_long", f"{length} tokens{which} ({len(enc.input_ids) - sum(marks.values())} text + "
                                f"{media_tokens} media) > context length {report.context_length}")
    return found


def preflight(model: Any, dataset: Any, n: int = 256, max_bad_fraction: float = 0.01, seed: int = 0) -> PreflightReport:
    """Encode up to `n` samples of `dataset` with `model`'s processor and count problems (see the module doc)."""
    if n < 1:
        raise InputError(f"preflight needs n >= 1 samples, got {n}")
    source = getattr(dataset, "source", type(dataset).__name__)
    report = PreflightReport(source=source, checked=0, max_bad_fraction=max_bad_fraction,
                             context_length=int(model.plan.backbone_facts.context_length))
    lengths: list[int] = []
    for index, item in _samples(dataset, n, seed):
        report.checked += 1
        if isinstance(item, BaseException):
            reason, file = classify(item)
            report.add(reason, index, getattr(item, "sample_id", None), str(item))
            report.bad_samples += 1
            continue
        if _check(model, index, item, report, lengths):
            report.bad_samples += 1
    if report.checked == 0:
        raise InputError(f"{source} has no samples to check")
    report.longest = max(lengths, default=0)
    report.mean_length = sum(lengths) / len(lengths) if lengths else 0.0
    if not report.ok:
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(report.problems.items()))
        examples = "; ".join(f"{k}: sample {e['index']} ({e['id']}): {e['detail']}"
                             for k, shown in sorted(report.examples.items()) for e in shown)
        err = InputError(f"preflight: {report.bad_samples} of {report.checked} checked samples of {source} have "
                         f"problems ({counts}), more than max_bad_fraction {max_bad_fraction}. Examples: {examples}")
        err.report = report  # type: ignore[attr-defined]
        raise err
    return report
