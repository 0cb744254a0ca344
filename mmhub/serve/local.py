"""In-process use of a serving engine: a conversation as the growing `Reply`s `MMModel.stream` gives (the Gradio
demo's chat goes through this, so the page and the API share one queue)."""

from __future__ import annotations

import queue
from typing import Any, Iterator

from mmhub.errors import InputError, MMHubError
from mmhub.reply import Reply
from mmhub.serve.engine import Engine
from mmhub.serve.types import Delta, Failed, Finished, Request, Sampling


def stream_replies(engine: Engine, messages: list[dict[str, str]], media: dict[str, list[Any]],
                   sampling: Sampling, timeout: float | None = None) -> Iterator[Reply]:
    """One conversation through `engine`'s queue, as `MMModel.stream` gives it: growing `Reply`s, then the finished
    one with what the model drew. For in-process callers (the Gradio demo); stopping early cancels the request."""
    events: queue.Queue = queue.Queue()
    request = Request(messages, media, sampling, events.put, timeout=timeout)
    engine.submit(request)
    text, finished = "", False
    try:
        while True:
            ev = events.get()
            if isinstance(ev, Delta):
                text += ev.text
                yield Reply(text)
            elif isinstance(ev, Finished):
                finished = True
                yield Reply(ev.text, dict(ev.media), list(ev.token_ids), ev.finish_reason)  # type: ignore[arg-type]
                return
            elif isinstance(ev, Failed):
                finished = True
                raise (InputError if ev.error.status < 500 else MMHubError)(str(ev.error))
    finally:
        if not finished:
            request.cancelled.set()
