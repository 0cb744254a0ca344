"""What flows through the serving engine: a request and its sampling settings, the events it answers with
(`Delta`, `Finished`, `Failed`), the errors (`EngineError`, `QueueFull`) and the counters /metrics reads."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from mmhub.errors import InputError

log = logging.getLogger(__name__)


class EngineError(Exception):
    """A request the engine could not finish; ``status`` is the HTTP status it maps to."""

    def __init__(self, message: str, status: int = 500, kind: str = "server_error") -> None:
        super().__init__(message)
        self.status, self.kind = status, kind


class QueueFull(EngineError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the server's queue is full ({limit} requests waiting); retry later", 429,
                         "rate_limit_exceeded")


@dataclass(frozen=True)
class Sampling:
    """One request's decoding settings; temperature 0 is greedy."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Delta:
    choice: int
    text: str


@dataclass
class Finished:
    choice: int
    text: str
    finish_reason: str
    completion_tokens: int
    media: dict[str, list[Any]] = field(default_factory=dict)
    token_ids: list[int] = field(default_factory=list)


@dataclass
class Failed:
    error: EngineError


Event = Delta | Finished | Failed


@dataclass
class Request:
    """A chat to answer: messages with placeholders and their media in order (as `MMModel.batch` takes them)."""

    messages: list[dict[str, str]]
    media: dict[str, list[Any]]
    sampling: Sampling
    emit: Callable[[Event], None]
    n: int = 1
    timeout: float | None = None
    prompt_tokens: int = 0  # set at prefill: text + media tokens
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)
    finished_choices: int = 0

    def expired(self, now: float) -> bool:
        return self.timeout is not None and now - self.submitted > self.timeout


@dataclass
class Stats:
    """What /metrics reports."""

    requests: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    steps: int = 0
    recent: deque = field(default_factory=lambda: deque(maxlen=4096))  # (time, tokens) per step

    def tokens_per_second(self, window: float = 10.0) -> float:
        now = time.monotonic()
        toks = sum(n for t, n in list(self.recent) if now - t <= window)
        return toks / window


def as_error(exc: Exception) -> EngineError:
    """An exception from a request's prefill or decode as the error its client gets."""
    if isinstance(exc, EngineError):
        return exc
    if isinstance(exc, InputError):
        return EngineError(str(exc), 400, "invalid_request_error")
    log.error("request failed", exc_info=exc)
    return EngineError(f"{type(exc).__name__}: {exc}")


def timeout_error(request: Request) -> EngineError:
    return EngineError(f"the request took longer than the server's --timeout of {request.timeout:g} s", 504,
                       "timeout")


def cancelled_error() -> EngineError:
    return EngineError("the client went away", 499, "cancelled")
