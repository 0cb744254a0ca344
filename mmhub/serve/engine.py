"""The serving engine: one model, one bounded queue, one running batch decoded step by step (continuous batching).

Requests wait in a queue of at most ``max_queue``; between two decode steps the engine admits as many as fit
in ``max_batch`` rows (a request asking for ``n`` choices takes ``n`` rows), prefills them together (their images
encoded and projected once, into the KV cache), joins their rows to the running batch (`mmhub.serve.kv`), and
decodes every row one token per step. A row leaves the batch as soon as it stops (stop token, stop string, its
``max_tokens``, a cancelled or timed-out request), so a long answer never holds up a short one. The decode step is
the one `mmhub.decoding` runs for a single prompt (the same head over the vocabulary and signal tokens, the same
forced signal groups and recorded states), so a greedy answer equals the same request run alone.

Models whose decoding cannot share a batch this way (encoder-decoder backbones, injectors, M-RoPE grid positions,
prefix-LM prompts, caches that are not plain key/value tensors) are served ``serial``: one request at a time from the
same queue, through `mmhub.streaming`. `Engine.mode` says which, and why.

Results go back through each request's ``emit`` callback, called on the engine thread: `Delta` (new text of a
choice, held back while it could still become a stop string), `Finished` (a choice's final text, finish reason,
token count and drawn media) and `Failed` (the whole request, with an `EngineError`).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from mmhub.decoding import Decoded, embed_ids, group_starts, head_columns, pick, record_group_states, take
from mmhub.generation import draw, stop_token_ids
from mmhub.inputs import prepare
from mmhub.serve import kv
from mmhub.serve.serial import SerialServing
from mmhub.serve.types import (  # noqa: F401  (Event, Stats: re-exported with the engine's other vocabulary)
    Delta,
    EngineError,
    Event,
    Failed,
    Finished,
    QueueFull,
    Request,
    Sampling,
    Stats,
    as_error,
    cancelled_error,
    timeout_error,
)

log = logging.getLogger(__name__)


@dataclass
class _Row:
    """One choice being decoded."""

    request: Request
    choice: int
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    signals: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    forced: list[int] = field(default_factory=list)
    pending: Any = None
    done: bool = False
    finish_reason: str = "length"
    sent: int = 0  # characters of text already emitted
    text: str = ""

    @property
    def steps(self) -> int:
        return len(self.tokens)


def _context_length(model: Any) -> int | None:
    """The backbone's context in tokens (its validated facts), when known."""
    value = getattr(getattr(getattr(model, "plan", None), "backbone_facts", None), "context_length", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def continuous_reason(model: Any) -> str | None:
    """Why `model` cannot be decoded in a shared running batch (None: it can)."""
    backbone = model.backbone
    if model.is_encoder_decoder:
        return "an encoder-decoder backbone"
    if not backbone.supports_step:
        return f"the {backbone.name} backbone has no incremental step"
    if len(model.injectors):
        return "injectors inside the backbone"
    if backbone.grid_positions:
        return "grid (M-RoPE) positions"
    if getattr(backbone, "prefix_lm", False):
        return "a prefix-LM prompt"
    return None

class Engine(SerialServing):
    """Serves `model` from one thread; `submit` from any thread."""

    def __init__(self, model: Any, max_batch: int = 8, max_queue: int = 64) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be >= 1, got {max_batch} and {max_queue}")
        self.model = model.eval()
        self.max_batch, self.max_queue = max_batch, max_queue
        reason = continuous_reason(model)
        self.mode = "continuous" if reason is None else "serial"
        self.mode_reason = reason
        self.stats = Stats()
        self._waiting: deque[Request] = deque()
        self._rows: list[_Row] = []
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._stop_ids = stop_token_ids(model)
        self._first = group_starts(model.signal_tokens)
        suppress = [i for i in model.processor.placeholder_ids.values()
                    if model.signal_tokens is not None or i < model.backbone_vocab_size]
        self._suppress, _ = head_columns(model.signal_tokens, suppress, self._stop_ids, model.device)
        self.context = _context_length(model)
        self._cache: Any = None
        self._mask = self._last = self._next_pos = None

    # ---- the outside ----------------------------------------------------------------------------------------
    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mmhub-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, request: Request) -> None:
        """Queue `request`; raises `QueueFull` when ``max_queue`` requests already wait."""
        if request.n > self.max_batch:
            raise EngineError(f"n={request.n} choices need {request.n} batch rows but the server runs at most "
                              f"{self.max_batch} (--max-batch); ask for fewer", 400, "invalid_request_error")
        with self._cond:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(self.max_queue)
            self._waiting.append(request)
            self.stats.requests += 1
            self._cond.notify_all()

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._rows)

    # ---- the engine thread ------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._waiting and not self._rows:
                    self._cond.wait()
                if self._stop:
                    self._fail_all(EngineError("the server is shutting down", 503, "server_error"))
                    return
                admitted = self._admit()
            try:
                if self.mode == "serial":
                    for request in admitted:
                        self._serve_alone(request)
                    continue
                if admitted:
                    self._admit_rows(admitted)
                self._drop_cancelled()
                if self._rows:
                    self._step()
            except Exception as exc:  # noqa: BLE001 - a failing batch fails its requests, never the server
                log.exception("engine step failed")
                error = as_error(exc)
                for request in {id(r.request): r.request for r in self._rows}.values():
                    self._fail(request, error)
                self._reset()

    def _admit(self) -> list[Request]:
        """Pop the waiting requests that fit (called with the lock held); expired or cancelled ones fail."""
        admitted, now = [], time.monotonic()
        rows = len(self._rows)
        limit = 1 if self.mode == "serial" else self.max_batch
        while self._waiting:
            request = self._waiting[0]
            if request.cancelled.is_set() or request.expired(now):
                self._waiting.popleft()
                self._fail(request, timeout_error(request) if request.expired(now) else cancelled_error())
                continue
            if rows + request.n > limit:
                break
            self._waiting.popleft()
            admitted.append(request)
            rows += request.n
        return admitted

    def _admit_rows(self, requests: list[Request]) -> None:
        """Prefill `requests` together; when that fails, each alone, so one bad request fails only itself."""
        try:
            self._prefill(requests)
        except Exception as exc:  # noqa: BLE001
            if len(requests) > 1:
                for request in requests:
                    self._admit_rows([request])
                return
            self._fail(requests[0], as_error(exc))

    def _new_row(self, request: Request, choice: int) -> _Row:
        return _Row(request, choice, None)

    def _check_budget(self, request: Request, prompt: int) -> None:
        ctx = self.context
        if ctx is not None and prompt + request.sampling.max_tokens > ctx:
            raise EngineError(f"the prompt is {prompt} tokens (media included) and max_tokens "
                              f"{request.sampling.max_tokens}: {prompt + request.sampling.max_tokens} > the model's "
                              f"context of {ctx} tokens; shorten the conversation, send fewer images or lower "
                              "max_tokens", 400, "invalid_request_error")

    def _prefill(self, requests: list[Request]) -> None:
        model = self.model
        batch = model.batch([r.messages for r in requests], [r.media for r in requests], add_generation_prompt=True,
                            padding_side="left")
        prep = prepare(model, batch["input_ids"], batch["attention_mask"], None, batch["media"], padding_side="left")
        sp = prep.spliced
        for i, request in enumerate(requests):
            self._check_budget(request, int(sp.attention_mask[i].sum()))  # over: the caller retries each alone
        hidden, cache = model.backbone.step(sp.inputs_embeds, sp.attention_mask, sp.position_ids, None)
        if not kv.mergeable(cache):
            self.mode, self.mode_reason = "serial", f"its KV cache ({type(cache).__name__}) is not plain key/value"
            log.warning("serving one request at a time: %s", self.mode_reason)
            for request in requests:
                self._serve_alone(request)
            return
        rows, index = [], []
        for i, request in enumerate(requests):
            request.prompt_tokens = int(sp.attention_mask[i].sum())
            self.stats.prompt_tokens += request.prompt_tokens
            for choice in range(request.n):
                rows.append(_Row(request, choice, _generator(request.sampling, choice, model.device)))
                index.append(i)
        mask = kv.select_rows(cache, sp.attention_mask.long(), index)
        last = hidden[:, -1].index_select(0, torch.tensor(index, device=hidden.device))
        next_pos = (sp.position_ids[..., -1:] + 1).index_select(0, torch.tensor(index, device=hidden.device))
        if self._cache is None:
            self._cache, self._mask, self._last, self._next_pos = cache, mask, last, next_pos
        else:
            self._mask = kv.join(self._cache, self._mask, cache, mask)
            self._last = torch.cat([self._last, last])
            self._next_pos = torch.cat([self._next_pos, next_pos])
        self._rows.extend(rows)

    @torch.no_grad()
    def _step(self) -> None:
        model, sig = self.model, self.model.signal_tokens
        logits = model.head(self._last).float()
        if self._suppress.numel():
            logits[:, self._suppress] = torch.finfo(logits.dtype).min
        cols = logits.argmax(-1)  # greedy rows in one call; sampling rows each with their own generator
        for b, row in enumerate(self._rows):
            s = row.request.sampling
            if s.temperature > 0:
                cols[b] = pick(logits[b:b + 1], True, s.temperature, s.top_p, row.generator)[0]
        chosen = (sig.token_ids(cols) if sig is not None else cols).tolist()
        ids = [self._take(row, [chosen[b]]) for b, row in enumerate(self._rows)]
        self.stats.steps += 1
        self.stats.recent.append((time.monotonic(), len(ids)))
        keep = [b for b, row in enumerate(self._rows) if not self._settle(row)]
        ids = [ids[b] for b in keep]
        if not self._keep_rows(keep):
            return
        emb = embed_ids(model, torch.tensor(ids, device=model.device)[:, None])
        alive = torch.tensor([0 if r.done and r.pending is None else 1 for r in self._rows], device=self._mask.device)
        self._mask = torch.cat([self._mask, alive[:, None].to(self._mask.dtype)], 1)
        hidden, self._cache = model.backbone.step(emb, self._mask, self._next_pos, self._cache)
        self._last = hidden[:, -1]
        self._next_pos = self._next_pos + 1
        out = Decoded([r.tokens for r in self._rows], [r.signals for r in self._rows])
        pending = [r.pending for r in self._rows]
        record_group_states(out, pending, self._last)
        for row, p in zip(self._rows, pending, strict=True):
            row.pending = p

    def _take(self, row: _Row, tid: list[int]) -> int:
        """`mmhub.decoding.take` for one row; returns the id fed back to the model."""
        out = Decoded([row.tokens], [row.signals], [row.finish_reason])
        done, forced, pending = [row.done], [row.forced], [row.pending]
        before = len(row.tokens)
        take(tid, out, done, forced, pending, self._first, self._stop_ids, self.model.processor.pad_id,
             within_limit=before < row.request.sampling.max_tokens)
        row.done, row.forced, row.pending, row.finish_reason = done[0], forced[0], pending[0], out.finish_reasons[0]
        if len(row.tokens) > before:
            self.stats.completion_tokens += 1
        return tid[0]

    def _settle(self, row: _Row) -> bool:
        """Emit the row's new text; True when the row is finished and leaves the batch."""
        request = row.request
        if request.cancelled.is_set() or request.expired(time.monotonic()):
            return False  # no more text; `_drop_cancelled` fails the request (499 / timeout) before the next step
        text = self.model.tokenizer.decode(row.tokens, skip_special_tokens=True)
        stopped = self._update_text(row, text)
        at_limit = row.steps >= request.sampling.max_tokens
        if stopped:
            row.done, row.forced, row.pending = True, [], None
        elif at_limit and not row.done and not row.forced and row.pending is None:
            row.done, row.finish_reason = True, "length"
        if not row.done or row.forced or row.pending is not None:
            return False
        media = draw(self.model, row.signals, seed=request.sampling.seed) \
            if self.model.signal_tokens is not None and row.signals else {}
        self._finish(row, media)
        return True

    def _update_text(self, row: _Row, text: str) -> bool:
        """Cut at the first stop string (True if one appeared) and emit what can no longer change."""
        text = text.lstrip()
        stops = row.request.sampling.stop
        cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
        if cut >= 0:
            row.text, row.finish_reason = text[:cut], "stop"
            return True
        row.text = text
        hold = max((len(s) for s in stops), default=1) - 1
        safe = text[:len(text) - hold] if hold else text
        safe = safe.rstrip()
        if safe.endswith("\ufffd"):  # half a multi-byte character
            safe = safe[:-1]
        if len(safe) > row.sent and safe.startswith(text[:row.sent]):
            row.request.emit(Delta(row.choice, safe[row.sent:]))
            row.sent = len(safe)
        return False

    def _finish(self, row: _Row, media: dict[str, list[Any]]) -> None:
        text = row.text.strip()
        if len(text) > row.sent:
            row.request.emit(Delta(row.choice, text[row.sent:]))
        row.request.emit(Finished(row.choice, text, row.finish_reason, len(row.tokens), media, list(row.tokens)))
        row.request.finished_choices += 1

    def _drop_cancelled(self) -> None:
        """Rows of cancelled or timed-out requests leave the batch before the next step."""
        now = time.monotonic()
        gone = {id(r.request) for r in self._rows if r.request.cancelled.is_set() or r.request.expired(now)}
        if not gone:
            return
        for request in {id(r.request): r.request for r in self._rows if id(r.request) in gone}.values():
            self._fail(request, timeout_error(request) if request.expired(now) else cancelled_error())
        self._keep_rows([b for b, r in enumerate(self._rows) if id(r.request) not in gone])

    def _keep_rows(self, keep: list[int]) -> bool:
        """Keep only the running rows `keep` (their KV rows, last states and positions; dead columns trimmed);
        False when none is left (the batch is reset)."""
        if keep == list(range(len(self._rows))):
            return True
        self._rows = [self._rows[b] for b in keep]
        if not keep:
            self._reset()
            return False
        self._mask = kv.select_rows(self._cache, self._mask, keep)
        index = torch.tensor(keep, device=self._last.device)
        self._last, self._next_pos = self._last.index_select(0, index), self._next_pos.index_select(0, index)
        self._mask = kv.trim_left(self._cache, self._mask)
        return True

    def _reset(self) -> None:
        self._rows, self._cache = [], None
        self._mask = self._last = self._next_pos = None

    def _fail(self, request: Request, error: EngineError) -> None:
        self.stats.failed += 1
        request.emit(Failed(error))

    def _fail_all(self, error: EngineError) -> None:
        for request in list(self._waiting) + [r.request for r in self._rows]:
            self._fail(request, error)
        self._waiting.clear()
        self._reset()


def _generator(sampling: Sampling, choice: int, device: torch.device) -> torch.Generator | None:
    if sampling.temperature <= 0:
        return None
    # choice i samples with seed + i; torch takes seeds in [0, 2**63) here, so the sum wraps into that range
    seed = (sampling.seed + choice) % 2**63 if sampling.seed is not None else random.randrange(2**63)
    return torch.Generator(device=device).manual_seed(seed)


