"""Turning conversations + media into model inputs: template, tokens, labels, media tensors.

`MMProcessor.encode` handles one sample (checking its placeholders against its
media); `MMProcessor.collate` pads a list of samples into a batch. Labels are
-100 everywhere except assistant replies (not those of turns marked ``train: false``,
which are context). For models with an output side, a group
marker (``<img_out>``) in the text expands into that modality's signal tokens, and
each sample's output captions (the media its assistant turns generate) are carried
into the batch as ``outputs``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from mmhub.errors import InputError
from mmhub.splice import IGNORE

Messages = Sequence[Mapping[str, str]]


@dataclass
class Encoded:
    """One tokenized sample."""

    input_ids: list[int]
    labels: list[int]
    media: dict[str, list[torch.Tensor]]
    index: int | None = None  # the sample's index in its dataset, for error messages
    outputs: dict[str, list[str]] | None = None  # captions of the media its assistant turns generate, per modality


def check_text(messages: Messages, where: str) -> None:
    """Raise `InputError` when a message's text cannot be tokenized: not a string, or holding half a UTF-16
    surrogate pair (U+D800..U+DFFF, which no UTF-8 text holds; tokenizers reject it with a bare TypeError)."""
    for k, msg in enumerate(messages):
        text = msg.get("content", "")
        if not isinstance(text, str):
            raise InputError(f"{where}: message {k} ({msg.get('role')!r}) content is a {type(text).__name__}, "
                             "not text; give each message's content as a string")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # only a surrogate code point cannot be encoded as UTF-8
            raise InputError(f"{where}: text holds half a UTF-16 surrogate pair (U+{ord(text[exc.start]):04X}) at "
                             f"character {exc.start} of message {k} ({msg.get('role')!r}); the data was decoded from "
                             "broken UTF-16 or an escaped '\\ud8xx': fix the text to valid UTF-8 or drop the sample"
                             ) from None


def context_replies(segments: list[tuple[str, bool]], messages: Messages, where: str,
                    template: str) -> list[tuple[str, bool]]:
    """`segments` with the replies of assistant turns marked ``train: false`` turned into context (no loss): an
    earlier reply a later turn responds to, as in a critique-and-refinement conversation (DRESS's NLF data)."""
    replies = [m for m in messages if m.get("role") == "assistant"]
    for k, m in enumerate(replies):
        if not isinstance(m.get("train", True), bool):
            raise InputError(f"{where}: assistant turn {k} has train: {m.get('train')!r}; give true (a target, the "
                             "default) or false (context only)")
    if all(m.get("train", True) for m in replies):
        return segments
    targets = [i for i, (_, target) in enumerate(segments) if target]
    if len(targets) != len(replies):
        raise InputError(f"{where}: template {template!r} renders {len(targets)} target piece(s) for {len(replies)} "
                         "assistant turn(s), so `train: false` cannot be matched to its turn; use a named template "
                         "(chatml, vicuna_v1, llama-2, plain)")
    context = {i for i, m in zip(targets, replies, strict=True) if m.get("train", True) is False}
    return [(text, target and i not in context) for i, (text, target) in enumerate(segments)]


class MMProcessor:
    """Tokenizer + chat template + per-modality preprocessing for one assembled model."""

    def __init__(self, tokenizer: Any, template: Any, placeholders: dict[str, str],
                 preprocess: dict[str, Callable[[Any], torch.Tensor]], signal_groups: Mapping[str, str] | None = None):
        from mmhub.signals import group_marker

        self.tokenizer = tokenizer
        # output modality -> (group marker in data, the signal tokens it expands into)
        self.signal_groups = {m: (group_marker(m), toks) for m, toks in (signal_groups or {}).items()}
        self.template = template
        self.placeholders = placeholders
        self.preprocess = preprocess
        self.placeholder_ids = {m: tokenizer.convert_tokens_to_ids(p) for m, p in placeholders.items()}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    @staticmethod
    def as_messages(prompt: str | Messages) -> list[dict[str, str]]:
        if isinstance(prompt, str):
            return [{"role": "user", "content": prompt}]
        return [dict(m) for m in prompt]

    def encode(self, messages: str | Messages, media: Mapping[str, Sequence[Any]] | None = None,
               add_generation_prompt: bool = False, index: int | None = None, preprocess: bool = True) -> Encoded:
        """One conversation (or a bare user prompt) and its media items -> token ids, labels, tensors.

        With ``preprocess=False`` the media items are passed through raw (the trainer then looks
        them up in a feature cache before preprocessing only the missing ones)."""
        messages = self.as_messages(messages)
        media = dict(media or {})
        where = f"sample {index}" if index is not None else "the sample"
        check_text(messages, where)
        for m in media:
            if m not in self.placeholders:
                takes = ", ".join(self.placeholders) or "text only"
                raise InputError(f"{where} has {m} items, but this model takes {takes}.")
        for m, mark in self.placeholders.items():
            n_ph = sum(msg["content"].count(mark) for msg in messages)
            n_items = len(media.get(m, []))
            if n_ph != n_items:
                raise InputError(f"{where} has {n_ph} {mark} placeholder(s) but {n_items} {m} item(s); "
                                 f"put one {mark} in the text per {m} given.")
        for marker, tokens in self.signal_groups.values():
            if any(marker in msg["content"] for msg in messages):
                messages = [{**msg, "content": msg["content"].replace(marker, tokens)} for msg in messages]
        ids: list[int] = []
        labels: list[int] = []
        segments = context_replies(self.template.render(messages, self.tokenizer, add_generation_prompt),
                                   messages, where, getattr(self.template, "name", "?"))
        for text, target in segments:
            piece = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            labels += piece if target else [IGNORE] * len(piece)
        if not preprocess:
            return Encoded(ids, labels, {m: list(items) for m, items in media.items() if items})
        tensors = {m: [self.preprocess[m](item) for item in items] for m, items in media.items() if items}
        return Encoded(ids, labels, tensors)

    def batch(self, conversations: Sequence[Any], media: Sequence[Mapping[str, Sequence[Any]]] | None = None,
              add_generation_prompt: bool = False, padding_side: str = "right") -> dict[str, Any]:
        """Encode and collate conversations with their media (one mapping per conversation)."""
        media = list(media) if media is not None else [{} for _ in conversations]
        if len(media) != len(conversations):
            raise InputError(f"{len(conversations)} conversations but {len(media)} media entries; "
                             "give one per conversation")
        enc = [self.encode(c, m, add_generation_prompt=add_generation_prompt, index=i)
               for i, (c, m) in enumerate(zip(conversations, media, strict=True))]
        return self.collate(enc, padding_side=padding_side)

    def collate(self, samples: Sequence[Encoded], padding_side: str = "right") -> dict[str, Any]:
        """Pad samples into a batch dict: input_ids, attention_mask, labels (B, L) and media {m: (N, ...)}."""
        if not samples:
            raise InputError("cannot collate an empty list of samples")
        longest = max(len(s.input_ids) for s in samples)
        ids = torch.full((len(samples), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(samples), longest), dtype=torch.long)
        labels = torch.full((len(samples), longest), IGNORE, dtype=torch.long)
        for i, s in enumerate(samples):
            n = len(s.input_ids)
            sl = slice(longest - n, longest) if padding_side == "left" else slice(0, n)
            ids[i, sl] = torch.tensor(s.input_ids, dtype=torch.long)
            mask[i, sl] = 1
            labels[i, sl] = torch.tensor(s.labels, dtype=torch.long)
        media: dict[str, torch.Tensor] = {}
        for m in self.placeholders:
            items = [t for s in samples for t in s.media.get(m, [])]
            if items:  # items preprocessed to different shapes (dynamic resolution) stay a list
                media[m] = torch.stack(items) if all(t.shape == items[0].shape for t in items) else items
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "media": media,
                 "padding_side": padding_side}
        if self.signal_groups:
            batch["outputs"] = {m: [c for s in samples for c in (s.outputs or {}).get(m, [])]
                                for m in self.signal_groups}
        return batch
