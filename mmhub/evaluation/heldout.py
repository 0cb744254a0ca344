"""Reading the held-out evaluation material shipped in ``mmhub/recipes/heldout`` (see its README).

`reworded_items` (``easy_vqa_reworded.jsonl``), `followup_conversations` (``easy_vqa_followup.jsonl``) and
`photo_list` (``photos.json``) read and check the files; a path argument reads another copy of the same format.
Nothing here is training data: the tasks in `mmhub.evaluation.reworded`, `.followup` and `.photo_refusal` are
the only readers.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from mmhub.errors import InputError

REWORDED_TYPES = ("yes_no", "yes_no_negated", "yes_no_confirm", "presence", "shape", "which_shape", "color")
FOLLOWUP_TYPES = (*REWORDED_TYPES, "compare")


def heldout_dir() -> Path:
    """The folder of the shipped held-out files."""
    return Path(str(resources.files("mmhub.recipes") / "heldout"))


def _lines(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise InputError(f"held-out file {path} does not exist")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{n} is not a JSON line ({exc.msg})") from None
    return out


def _need(record: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in record]
    if missing:
        raise InputError(f"{where} lacks {', '.join(missing)} (has {', '.join(record) or 'nothing'})")


def reworded_items(path: str | Path | None = None) -> list[dict[str, Any]]:
    """The reworded questions: ``{image, question, answer, type, about}`` each, in file order."""
    p = Path(path) if path is not None else heldout_dir() / "easy_vqa_reworded.jsonl"
    items = _lines(p)
    for n, item in enumerate(items, 1):
        _need(item, ("image", "question", "answer", "type"), f"{p} line {n}")
        if item["type"] not in REWORDED_TYPES:
            raise InputError(f"{p} line {n}: type {item['type']!r} is not one of {', '.join(REWORDED_TYPES)}")
    return items


def followup_conversations(path: str | Path | None = None) -> list[dict[str, Any]]:
    """The follow-up conversations: ``{id, images, turns: [{question, answer, type, image?}, ...]}`` each."""
    p = Path(path) if path is not None else heldout_dir() / "easy_vqa_followup.jsonl"
    convs = _lines(p)
    for n, conv in enumerate(convs, 1):
        _need(conv, ("id", "images", "turns"), f"{p} line {n}")
        shown = []
        for k, turn in enumerate(conv["turns"], 1):
            _need(turn, ("question", "answer", "type"), f"{p} line {n} ({conv['id']}) turn {k}")
            if turn["type"] not in FOLLOWUP_TYPES:
                raise InputError(f"{p} line {n} turn {k}: type {turn['type']!r} is not one of "
                                 f"{', '.join(FOLLOWUP_TYPES)}")
            if "image" in turn:
                shown.append(turn["image"])
        if shown != list(range(len(conv["images"]))):
            raise InputError(f"{p} line {n} ({conv['id']}): its turns show images {shown}; each of its "
                             f"{len(conv['images'])} images must be shown once, in order, the first in turn 1")
    return convs


def photo_list(path: str | Path | None = None) -> dict[str, Any]:
    """``{held_out: [{name, source, ...}], train_negatives: [...], questions: [...]}`` from ``photos.json``."""
    p = Path(path) if path is not None else heldout_dir() / "photos.json"
    if not p.is_file():
        raise InputError(f"held-out photo list {p} does not exist")
    data = json.loads(p.read_text(encoding="utf-8"))
    _need(data, ("held_out", "train_negatives", "questions"), str(p))
    held = {x["source"] for x in data["held_out"]} | {a for x in data["held_out"] for a in x.get("aliases", [])}
    both = held & {x["source"] for x in data["train_negatives"]}
    if both:
        raise InputError(f"{p}: {', '.join(sorted(both))} are both held out and train negatives; a photo is one")
    return data
