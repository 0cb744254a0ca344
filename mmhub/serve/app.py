"""The HTTP side of `mmhub serve`: an OpenAI-compatible FastAPI app over one `Engine`.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` (plain or ``stream: true`` server-sent events in
OpenAI's chunk format, a last chunk with ``usage``), ``GET /health`` and ``GET /metrics`` (Prometheus text).
Errors are OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 for a malformed body or bad
media, 401 for a missing or wrong bearer token (with ``--api-key``), 429 when the queue is full, 504 past
``--timeout``. A client that disconnects cancels its request: its rows leave the running batch at the next step.

Drawing models return what they drew in ``choices[i].message.mmhub_media`` (a list of ``image_url`` parts with
PNG data URIs; in a stream, in the choice's last delta): an extension field a plain OpenAI client ignores.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from mmhub.serve.content import ContentLimits, to_model_input
from mmhub.serve.engine import Delta, Engine, EngineError, Failed, Finished, Request, Sampling
from mmhub.serve.protocol import APIError, ChatRequest, validation_error


@dataclass(frozen=True)
class ServerSettings:
    """`mmhub serve`'s flags that shape requests."""

    model_name: str = "mmhub"
    api_key: str | None = None
    timeout: float = 600.0
    default_max_tokens: int = 256
    limits: ContentLimits = ContentLimits()


def create_app(engine: Engine, settings: ServerSettings) -> Any:
    """The FastAPI app; `engine` must be started (`Engine.start`)."""
    from fastapi.responses import JSONResponse, PlainTextResponse

    app = FastAPI(title="mmhub", docs_url=None, redoc_url=None)
    app.state.mmhub_engine = engine
    model = engine.model
    placeholders = dict(model.processor.placeholders)
    started = int(time.time())
    max_body = int((settings.limits.max_image_mb * settings.limits.max_images * 1.4 + 4) * 1e6)

    def check_key(request: HTTPRequest) -> None:
        _check_key(request, settings.api_key)

    @app.exception_handler(APIError)
    async def _api_error(_: HTTPRequest, exc: APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": settings.model_name, "batching": engine.mode, "queue": engine.queue_length,
                "running": engine.running}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(prometheus(engine), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: HTTPRequest) -> dict[str, Any]:
        check_key(request)
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": started,
                                            "owned_by": "mmhub"}]}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: HTTPRequest) -> Any:
        check_key(request)
        body = await _body(request, max_body)
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        job = Request(*_inputs(body, placeholders, settings, engine.context), emit=lambda ev: loop.call_soon_threadsafe(
            queue.put_nowait, ev), n=body.n, timeout=settings.timeout)
        try:
            engine.submit(job)
        except EngineError as exc:
            raise APIError(str(exc), exc.status, exc.kind) from None
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return StreamingResponse(_sse(job, queue, rid, created, settings.model_name, request),
                                     media_type="text/event-stream")
        return await _complete(job, queue, rid, created, settings.model_name, request)

    return app


def _check_key(request: Any, api_key: str | None) -> None:
    """With ``--api-key``: a 401 unless the request sends ``Authorization: Bearer KEY`` (compared in constant time)."""
    if api_key is None:
        return
    given = request.headers.get("authorization", "")
    token = given[7:] if given.lower().startswith("bearer ") else ""
    if not token or not secrets.compare_digest(token.encode(), api_key.encode()):
        raise APIError("missing or wrong API key: send 'Authorization: Bearer KEY' with the server's --api-key",
                       401, "authentication_error", code="invalid_api_key")


async def _body(request: Any, max_body: int) -> ChatRequest:
    from pydantic import ValidationError

    raw = await request.body()
    if len(raw) > max_body:
        raise APIError(f"the body is {len(raw) / 1e6:.1f} MB; the server takes up to {max_body / 1e6:.0f} MB "
                       "(--max-image-mb x --max-images)")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(f"the body is not valid JSON ({exc})") from None
    except RecursionError:
        raise APIError("the body's JSON is nested too deeply to read; a chat request needs a few levels") from None
    if not isinstance(data, dict):
        raise APIError(f"the body must be a JSON object, got {type(data).__name__}")
    try:
        body = ChatRequest.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None
    refused = body.refused()
    if refused is not None:
        raise refused
    return body


def _inputs(body: ChatRequest, placeholders: dict[str, str], settings: ServerSettings,
            ctx: int | None) -> tuple[list[dict[str, str]], dict[str, list[Any]], Sampling]:
    messages, media = to_model_input(body, placeholders, settings.limits)
    bad = next(((i, m) for i, m in enumerate(messages) if any("\ud800" <= c <= "\udfff" for c in m["content"])), None)
    if bad is not None:
        raise APIError(f"messages[{bad[0]}]: the text holds half a UTF-16 surrogate pair", param=f"messages[{bad[0]}]")
    limit = body.token_limit(settings.default_max_tokens)
    if ctx is not None and limit >= ctx:
        raise APIError(f"max_tokens {limit} does not fit the model's context of {ctx} tokens", param="max_tokens")
    return messages, media, Sampling(max_tokens=limit, temperature=body.temperature, top_p=body.top_p,
                                     seed=body.seed, stop=tuple(body.stop or ()))


def _usage(job: Request, completion: int) -> dict[str, int]:
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": completion,
            "total_tokens": job.prompt_tokens + completion}


def _media_parts(media: dict[str, list[Any]]) -> list[dict[str, Any]]:
    parts = []
    for item in media.get("image", []):
        buf = io.BytesIO()
        item.save(buf, format="PNG")
        parts.append({"type": "image_url",
                      "image_url": {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}})
    return parts


async def _next(queue: asyncio.Queue, request: Any, job: Request) -> Any:
    """The engine's next event; a disconnected client cancels the job."""
    while True:
        try:
            return await asyncio.wait_for(queue.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancelled.set()
                raise asyncio.CancelledError from None


async def _complete(job: Request, queue: asyncio.Queue, rid: str, created: int, name: str, request: Any) -> Any:
    done: dict[int, Finished] = {}
    try:
        while len(done) < job.n:
            ev = await _next(queue, request, job)
            if isinstance(ev, Failed):
                raise APIError(str(ev.error), ev.error.status, ev.error.kind)
            if isinstance(ev, Finished):
                done[ev.choice] = ev
    except asyncio.CancelledError:
        job.cancelled.set()
        raise
    choices = []
    for i in range(job.n):
        ev = done[i]
        message: dict[str, Any] = {"role": "assistant", "content": ev.text}
        if ev.media:
            message["mmhub_media"] = _media_parts(ev.media)
        choices.append({"index": i, "message": message, "finish_reason": ev.finish_reason, "logprobs": None})
    completion = sum(ev.completion_tokens for ev in done.values())
    return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": name,
                         "choices": choices, "usage": _usage(job, completion)})


async def _sse(job: Request, queue: asyncio.Queue, rid: str, created: int, name: str,
               request: Any) -> AsyncIterator[str]:
    def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        body: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                                "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    finished, completion = 0, 0
    try:
        for i in range(job.n):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        while finished < job.n:
            ev = await _next(queue, request, job)
            if isinstance(ev, Failed):
                yield f"data: {json.dumps(APIError(str(ev.error), ev.error.status, ev.error.kind).body())}\n\n"
                return
            if isinstance(ev, Delta):
                yield chunk([{"index": ev.choice, "delta": {"content": ev.text}, "finish_reason": None}])
            elif isinstance(ev, Finished):
                finished += 1
                completion += ev.completion_tokens
                delta: dict[str, Any] = {}
                if ev.media:
                    delta["mmhub_media"] = _media_parts(ev.media)
                yield chunk([{"index": ev.choice, "delta": delta, "finish_reason": ev.finish_reason}])
        yield chunk([], _usage(job, completion))
        yield "data: [DONE]\n\n"
    finally:
        if finished < job.n:
            job.cancelled.set()


def prometheus(engine: Engine) -> str:
    """The engine's gauges and counters in Prometheus' text format."""
    s = engine.stats
    rows = [
        ("mmhub_queue_length", "gauge", "requests waiting to be admitted", engine.queue_length),
        ("mmhub_running_batch_size", "gauge", "rows in the running batch", engine.running),
        ("mmhub_tokens_per_second", "gauge", "completion tokens per second over the last 10 s",
         round(s.tokens_per_second(), 3)),
        ("mmhub_requests_total", "counter", "requests accepted into the queue", s.requests),
        ("mmhub_requests_failed_total", "counter", "requests that ended in an error", s.failed),
        ("mmhub_prompt_tokens_total", "counter", "prompt tokens prefilled (media tokens included)", s.prompt_tokens),
        ("mmhub_completion_tokens_total", "counter", "tokens generated", s.completion_tokens),
        ("mmhub_decode_steps_total", "counter", "decode steps of the running batch", s.steps),
    ]
    out = []
    for name, kind, doc, value in rows:
        out += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}", f"{name} {value}"]
    return "\n".join(out) + "\n"
