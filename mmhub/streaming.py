"""Streamed generation: the reply of one prompt as it grows, token by token.

`stream_reply` runs the model's one decode path (`mmhub.generation.decode_batch`: the same stop tokens,
placeholder suppression and KV cache) in a worker thread with a transformers streamer that hands each new
token to this thread through a queue. It yields a `Reply` holding the text so far (``finish_reason`` None)
after every token that changes the text, and last the finished `Reply`, equal to what `MMModel.generate`
returns for the same prompt and settings (with the media the model's generators drew, which run once the
text is complete). An error in the worker is re-raised here.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Iterator, Mapping, Sequence

from transformers.generation.streamers import BaseStreamer

from mmhub.decoding import Decoded
from mmhub.errors import InputError
from mmhub.generation import decode_batch, draw, reply_of, stop_token_ids
from mmhub.reply import Reply

_END = object()


class _TokenQueue(BaseStreamer):
    """Receives generated token ids from `generate` (the first call, the prompt, is skipped)."""

    def __init__(self) -> None:
        self.queue: queue.Queue = queue.Queue()
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # transformers first passes the prompt (or the decoder start token)
            self._prompt_seen = True
            return
        self.queue.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self.queue.put(_END)


def stream_reply(model: Any, prompt: Any, media: Mapping[str, Sequence[Any]] | None = None, *,
                 max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 seed: int | None = None, timeout: float | None = 600.0) -> Iterator[Reply]:
    """Yield the reply to one prompt (a user message or a conversation) as it grows, then finished."""
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    b = model.batch([prompt], [dict(media or {})], add_generation_prompt=True, padding_side="left")
    streamer = _TokenQueue()
    failure: list[BaseException] = []
    decoded: list[Decoded] = []

    def work() -> None:
        try:
            decoded.append(decode_batch(model, b["input_ids"], b["attention_mask"], b["media"], seed=seed,
                                        max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                        top_p=top_p, streamer=streamer))
        except BaseException as exc:  # handed to the consumer, never lost in the thread
            failure.append(exc)
            streamer.end()

    worker = threading.Thread(target=work, name="mmhub-stream", daemon=True)
    worker.start()
    try:
        yield from _growing(model, streamer, set(stop_token_ids(model)), timeout)
    finally:
        worker.join(timeout=timeout)
    if failure:
        raise failure[0]
    drawn = draw(model, decoded[0].signals[0], seed=seed) if model.signal_tokens is not None else {}
    yield reply_of(model, decoded[0], 0, drawn)


def _growing(model: Any, streamer: _TokenQueue, stop: set[int], timeout: float | None) -> Iterator[Reply]:
    """The streamed tokens as partial replies: one per token that changes the text, until a stop token or the end."""
    ids: list[int] = []
    shown = ""
    while True:
        item = streamer.queue.get(timeout=timeout)
        if item is _END:
            return
        for t in item:
            if t in stop:
                return  # the rest is not part of the reply
            ids.append(t)
        text = model.tokenizer.decode(ids, skip_special_tokens=True).strip()
        if text != shown:
            shown = text
            yield Reply(text, token_ids=list(ids))
