"""Streamed generation: the reply of one prompt as it grows, token by token.

`stream_reply` runs the model's own `generate_ids` (so the same stop tokens, placeholder
suppression and KV cache) in a worker thread with a transformers streamer that hands
each new token to this thread through a queue. It yields the decoded reply so far
after every token that changes it; the last value equals what `MMModel.generate`
returns for the same prompt and settings. An error in the worker is re-raised here.

For a model with an output side the last value is a `Reply` whose ``media`` holds what its
generators drew (they run once the text is complete).
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Iterator, Mapping, Sequence

from transformers.generation.streamers import BaseStreamer

from mmhub.errors import InputError

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
                 seed: int | None = None, timeout: float | None = 600.0) -> Iterator[str]:
    """Yield the reply to one prompt (a user message or a conversation) as it grows."""
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    b = model.batch([prompt], [dict(media or {})], add_generation_prompt=True, padding_side="left")
    streamer = _TokenQueue()
    failure: list[BaseException] = []

    decoded: list[Any] = []
    drawing = getattr(model, "signal_tokens", None) is not None

    def work() -> None:
        try:
            settings = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
                            seed=seed, streamer=streamer)
            if drawing:  # mmhub's decode loop, which also hands back the signal states
                decoded.append(model._decode(b["input_ids"], b["attention_mask"], b["media"], **settings))
            else:
                model.generate_ids(b["input_ids"], b["attention_mask"], b["media"], **settings)
        except BaseException as exc:  # handed to the consumer, never lost in the thread
            failure.append(exc)
            streamer.end()

    worker = threading.Thread(target=work, name="mmhub-stream", daemon=True)
    worker.start()
    stop = set(model.stop_token_ids())
    ids: list[int] = []
    shown = ""
    try:
        while True:
            item = streamer.queue.get(timeout=timeout)
            if item is _END:
                break
            for t in item:
                if t in stop:
                    break
                ids.append(t)
            else:
                text = model.tokenizer.decode(ids, skip_special_tokens=True).strip()
                if text != shown:
                    shown = text
                    yield text
                continue
            break  # a stop token: the rest is not part of the reply
    finally:
        worker.join(timeout=timeout)
    if failure:
        raise failure[0]
    if drawing and decoded and decoded[0].signals[0]:
        from mmhub.decoding import Reply

        yield Reply(shown, model.draw(decoded[0].signals[0], seed=seed))
