"""Hostile `POST /v1/chat/completions` bodies for `mmhub serve`: broken JSON, wrong types in every field, absurd
numbers, damaged or lying media in `image_url` / `input_audio` parts, URLs and paths the server must not open,
deep nesting, surrogates. Each kind makes raw body bytes from a random generator; `benchmarks.fuzz.cases`
posts them to the app and classifies the answer (a 2xx completion or a 4xx OpenAI-shaped error is clean; a 5xx,
a malformed error, an exception or a server that stops answering is a failure)."""

from __future__ import annotations

import base64
import json
import random
from typing import Any, Callable

from benchmarks.fuzz import uploads


def _user(*parts: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": list(parts)}], "max_tokens": 4}


def _text(t: str) -> dict[str, str]:
    return {"type": "text", "text": t}


def _image(url: Any) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def _junk(r: random.Random, depth: int = 0) -> Any:
    """A random JSON value."""
    kinds = ["int", "float", "str", "bool", "null"] + (["list", "dict"] if depth < 3 else [])
    k = r.choice(kinds)
    if k == "int":
        return r.choice([0, -1, 1, 2**31, -(2**63), 2**80, r.randrange(-1000, 1000)])
    if k == "float":
        return r.choice([0.0, -0.5, 1e308, -1e-308, 3.5, float(r.random())])
    if k == "str":
        return r.choice(["", "user", "x" * r.randrange(1, 200), "\u0000", "\ufeff", "🙂" * 5, "<image>"])
    if k == "bool":
        return r.random() < 0.5
    if k == "null":
        return None
    if k == "list":
        return [_junk(r, depth + 1) for _ in range(r.randrange(0, 4))]
    return {r.choice(["role", "content", "type", "url", "x"]): _junk(r, depth + 1) for _ in range(r.randrange(0, 4))}


FIELDS = ["messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "n", "stream",
          "stream_options", "model", "tools", "logprobs", "response_format"]


def _wrong_field(r: random.Random) -> dict[str, Any]:
    body = _user(_text("what shape is this?"))
    body[r.choice(FIELDS)] = _junk(r)
    return body


def _wrong_message(r: random.Random) -> dict[str, Any]:
    msg = {"role": r.choice(["user", "assistant", "system", "tool", "", None, 3]), "content": _junk(r)}
    return {"messages": [msg, *([{"role": "user", "content": "hi"}] if r.random() < 0.5 else [])], "max_tokens": 3}


def _wrong_part(r: random.Random) -> dict[str, Any]:
    part = r.choice([
        {"type": r.choice(["video_url", "file", "", None, 7])},
        {"type": "image_url", "image_url": _junk(r)},
        {"type": "image_url"},
        {"type": "text", "text": _junk(r)},
        {"type": "input_audio", "input_audio": _junk(r)},
        _junk(r),
    ])
    return _user(part, _text("hi"))


def _media_file(r: random.Random) -> dict[str, Any]:
    kind = r.choice(sorted(uploads.FILES))
    _, raw = uploads.FILES[kind](r)
    data = base64.b64encode(raw).decode()
    if kind.endswith("wav"):
        return _user({"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}, _text("hi"))
    return _user(_image(f"data:image/png;base64,{data}"), _text("what shape is this?"))


def _bad_uri(r: random.Random) -> dict[str, Any]:
    url = r.choice([
        "http://127.0.0.1:1/x.png", "https://example.com/a.png", "file:///etc/passwd", "/etc/passwd", "../../x.png",
        "data:image/png;base64,", "data:image/png,notbase64", "data:;base64,@@@@", "data:image/png;base64,QUJD=",
        "data:image/png;base64," + "A" * r.randrange(1, 50), "ftp://x/y.png", "\u0000", "data:" + "x" * 5000,
        "data:image/png;base64," + base64.b64encode(r.randbytes(r.randrange(0, 3000))).decode(),
    ])
    return _user(_image(url), _text("what is it?"))


def _many_images(r: random.Random) -> dict[str, Any]:
    png = "data:image/png;base64," + base64.b64encode(uploads.FILES["one_pixel_png"](r)[1]).decode()
    return _user(*[_image(png) for _ in range(r.randrange(9, 40))], _text("count them"))


def _absurd_numbers(r: random.Random) -> dict[str, Any]:
    body = _user(_text("hi"))
    body.update({r.choice(["max_tokens", "n", "seed", "temperature", "top_p"]):
                 r.choice([0, -1, 2**63, 10**30, 1e308, -1e308, 0.0000001, 17, 65])})
    return body


def _stops(r: random.Random) -> dict[str, Any]:
    body = _user(_text("hi"))
    body["stop"] = r.choice([["a"] * 5, [""], ["\ud800"], "x" * 10_000, [None], [1, 2], []])
    return body


def _long_prompt(r: random.Random) -> dict[str, Any]:
    return _user(_text("the shape " * r.randrange(100, 3000)))


def _deep(r: random.Random) -> bytes:
    depth = r.choice([100, 1000, 50_000])
    return ('{"messages": ' + "[" * depth + "]" * depth + "}").encode()


def _raw(r: random.Random) -> bytes:
    return r.choice([
        b"", b"{", b"null", b"[]", b"42", b'"messages"', b"\xff\xfe{\x00}\x00", r.randbytes(r.randrange(1, 400)),
        b'{"messages": [{"role": "user", "content": "\\ud800"}]}', b'{"messages": [], "messages": 3}',
        b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
        b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": Infinity}',
    ])


KINDS: dict[str, Callable[[random.Random], Any]] = {
    "wrong_field": _wrong_field, "wrong_message": _wrong_message, "wrong_part": _wrong_part,
    "media_file": _media_file, "bad_uri": _bad_uri, "many_images": _many_images, "absurd_numbers": _absurd_numbers,
    "stops": _stops, "long_prompt": _long_prompt, "deep": _deep, "raw": _raw,
}


def body(kind: str, r: random.Random) -> bytes:
    """The raw body bytes of one case of `kind`."""
    made = KINDS[kind](r)
    return made if isinstance(made, bytes) else json.dumps(made).encode()
