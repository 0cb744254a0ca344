"""`mmhub serve` driven by the official `openai` client (and raw HTTP for what a client would never send)."""

from __future__ import annotations

import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from openai import OpenAI

from mmhub import build
from mmhub.serve.app import ServerSettings
from mmhub.serve.content import ContentLimits
from mmhub.serve.engine import Engine

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from live_server import data_uri, live_server  # noqa: E402


@pytest.fixture(scope="module")
def model():
    import copy

    from conftest import TINY_SPEC

    torch.manual_seed(0)
    return build(copy.deepcopy(TINY_SPEC)).eval()


@pytest.fixture(scope="module")
def pictures():
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)) for _ in range(4)]


def client(base: str, key: str = "none") -> OpenAI:
    return OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=120)


def image_part(img) -> dict:
    return {"type": "image_url", "image_url": {"url": data_uri(img)}}


def test_models_chat_stream_usage_and_metrics(model, pictures) -> None:
    with live_server(Engine(model)) as base:
        c = client(base)
        assert [m.id for m in c.models.list().data] == ["tiny"]
        messages = [{"role": "user", "content": [image_part(pictures[0]), {"type": "text", "text": "describe"}]}]
        plain = c.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0)
        text = plain.choices[0].message.content
        assert plain.choices[0].finish_reason in ("stop", "length") and plain.usage.completion_tokens >= 1
        # the prompt counts the image's 16 projected tokens in place of its placeholder (which the server puts on a
        # line of its own before the text)
        text_only = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "\ndescribe"}],
                                              max_tokens=1, temperature=0)
        assert plain.usage.prompt_tokens == text_only.usage.prompt_tokens + 16
        chunks = list(c.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0,
                                                stream=True))
        streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert streamed == text
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
        metrics = httpx.get(base + "/metrics").text
        assert "mmhub_queue_length 0" in metrics and "mmhub_completion_tokens_total" in metrics
        assert httpx.get(base + "/health").json()["batching"] == "continuous"


def test_n_seed_and_stop(model, pictures) -> None:
    with live_server(Engine(model)) as base:
        c = client(base)
        messages = [{"role": "user", "content": [image_part(pictures[1]), {"type": "text", "text": "hello"}]}]
        a = c.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=1.0, seed=3, n=2)
        b = c.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=1.0, seed=3, n=2)
        texts = [ch.message.content for ch in a.choices]
        assert texts == [ch.message.content for ch in b.choices] and texts[0] != texts[1]
        full = c.chat.completions.create(model="tiny", messages=messages, max_tokens=30, temperature=0)
        whole = full.choices[0].message.content
        cut = c.chat.completions.create(model="tiny", messages=messages, max_tokens=30, temperature=0,
                                        stop=[whole[3:5]])
        assert cut.choices[0].finish_reason == "stop"
        assert cut.choices[0].message.content == whole[:whole.index(whole[3:5])].strip()


def test_sixteen_concurrent_clients_get_what_each_gets_alone(model, pictures) -> None:
    jobs = []
    for i in range(16):
        content = [image_part(pictures[j % 4]) for j in range(i % 3)] + [{"type": "text", "text": "q" * (1 + 7 * i)}]
        jobs.append(([{"role": "user", "content": content}], 4 + (i * 11) % 48))

    def ask(base: str, job) -> str:
        messages, k = job
        return client(base).chat.completions.create(model="tiny", messages=messages, max_tokens=k,
                                                    temperature=0).choices[0].message.content

    with live_server(Engine(model, max_batch=1)) as base:
        alone = [ask(base, job) for job in jobs]
    engine = Engine(model, max_batch=16)
    with live_server(engine) as base:
        with ThreadPoolExecutor(16) as pool:
            together = list(pool.map(lambda job: ask(base, job), jobs))
        steps = engine.stats.steps
    assert together == alone
    assert steps < sum(4 + (i * 11) % 48 for i in range(16))  # decode steps were shared


def test_errors_have_the_status_type_and_param_and_the_server_serves_on(model, pictures, tmp_path) -> None:
    settings = ServerSettings(model_name="tiny", api_key="sekrit", limits=ContentLimits(max_images=2))
    with live_server(Engine(model), settings) as base:
        url, auth = base + "/v1/chat/completions", {"Authorization": "Bearer sekrit"}

        def post(body, headers=auth, raw=None):
            r = httpx.post(url, headers=headers, content=raw if raw is not None else json.dumps(body), timeout=60)
            return r.status_code, r.json()["error"]

        user = lambda *parts: {"messages": [{"role": "user", "content": list(parts)}]}  # noqa: E731
        assert post({}, headers={})[0] == 401
        assert post({}, headers={"Authorization": "Bearer nope"})[0] == 401
        status, err = post(None, raw=b"{not json")
        assert status == 400 and "not valid JSON" in err["message"]
        status, err = post({"messages": []})
        assert status == 400 and err["param"] == "messages"
        status, err = post(user({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}))
        assert status == 400 and err["param"] == "messages[0].content[0].image_url.url" and "base64" in err["message"]
        status, err = post(user({"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}))
        assert status == 400 and "not a readable image" in err["message"]
        status, err = post(user({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}))
        assert status == 400 and "fetches nothing" in err["message"]
        status, err = post(user({"type": "image_url", "image_url": {"url": str(tmp_path / "x.png")}}))
        assert status == 400 and "--allow-files" in err["message"]
        status, err = post(user(*[image_part(pictures[0])] * 3))
        assert status == 400 and "more than 2 images" in err["message"]
        status, err = post({**user({"type": "text", "text": "hi"}), "max_tokens": 9999})
        assert status == 400 and "context of 512" in err["message"]
        status, err = post(user({"type": "text", "text": "x" * 600}))
        assert status == 400 and "> the model's context of 512 tokens" in err["message"]
        status, err = post({**user({"type": "text", "text": "hi"}), "tools": [{"type": "function"}]})
        assert status == 400 and err["param"] == "tools"
        status, err = post({**user({"type": "text", "text": "hi"}), "temperature": 7})
        assert status == 400 and err["param"] == "temperature"
        ok = client(base, "sekrit").chat.completions.create(model="tiny", max_tokens=3, temperature=0,
                                                            messages=[{"role": "user", "content": "still there?"}])
        assert ok.choices[0].finish_reason in ("stop", "length")


def test_full_queue_is_429_and_a_slow_request_is_504(model) -> None:
    engine = Engine(model, max_queue=1)  # never started: the first request waits in the queue
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with live_server(engine, ServerSettings(model_name="tiny", timeout=1.0), start_engine=False) as base:
        url = base + "/v1/chat/completions"
        waiting = threading.Thread(target=lambda: httpx.post(url, json=body, timeout=30), daemon=True)
        waiting.start()
        deadline = time.monotonic() + 10
        while engine.queue_length < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        r = httpx.post(url, json=body, timeout=30)
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_exceeded"
        engine.start()  # the queued request has expired by now: its client gets 504
        waiting.join(timeout=30)
    engine = Engine(model)
    with live_server(engine, ServerSettings(model_name="tiny", timeout=1e-6)) as base:
        r = httpx.post(base + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 504 and "--timeout" in r.json()["error"]["message"]


def test_a_client_that_disconnects_mid_stream_frees_its_rows(model) -> None:
    engine = Engine(model, max_batch=2)
    with live_server(engine) as base:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 400, "temperature": 0,
                "stream": True}
        with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            first = [next(lines) for _ in range(3)]
            assert first[0].startswith("data: ")
            assert engine.running == 1
        deadline = time.monotonic() + 10
        while engine.running and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.running == 0 and engine.stats.completion_tokens < 400
        ok = client(base).chat.completions.create(model="tiny", max_tokens=2, temperature=0,
                                                  messages=[{"role": "user", "content": "next"}])
        assert ok.choices[0].message.content is not None


@pytest.mark.slow
def test_the_shipped_demo_model_over_the_api_answers_follows_up_and_draws() -> None:
    """`mmhub serve default` as a user meets it: easy-VQA test images sent as data URIs are answered correctly,
    a follow-up turn about the earlier image too, and a drawing request returns its image as an extra part."""
    from mmhub import weights
    from mmhub.data.easy_vqa import SOURCE, facts_from_pixels
    from mmhub.errors import WeightsNotFoundError
    from mmhub.loading import load

    try:
        root = weights.resolve(SOURCE)
    except WeightsNotFoundError:
        pytest.skip(f"easy-VQA is not here; `mmhub weights fetch {SOURCE}` gets it")
    from PIL import Image

    paths = sorted((root / "test" / "images").glob("*.png"))[:6]
    assert paths, f"no test images under {root}"
    model = load("default")
    if model.signal_tokens is None:
        pytest.skip("the default model here does not draw")
    with live_server(Engine(model, max_batch=8), ServerSettings(model_name="default")) as base:
        c = client(base)

        def ask(messages: list) -> str:
            out = c.chat.completions.create(model="default", messages=messages, max_tokens=16, temperature=0)
            return out.choices[0].message.content.lower()

        with ThreadPoolExecutor(6) as pool:
            colours = list(pool.map(lambda p: ask([{"role": "user", "content": [
                image_part(Image.open(p).convert("RGB")), {"type": "text", "text": "What colour is the shape?"}]}]),
                paths))
        facts = [facts_from_pixels(p) for p in paths]  # (shape, colour) read off the pixels
        assert [a.split()[0].strip(".") for a in colours] == [colour for _, colour in facts], (colours, facts)
        shape = facts[0][0]
        first = [{"role": "user", "content": [image_part(Image.open(paths[0]).convert("RGB")),
                                              {"type": "text", "text": "What colour is the shape?"}]},
                 {"role": "assistant", "content": colours[0]},
                 {"role": "user", "content": f"Is the shape in that picture a {shape}?"}]
        assert ask(first).startswith("yes")
        other = next(s for s in ("circle", "rectangle", "triangle") if s != shape)
        follow_up = {"role": "user", "content": f"Is the shape in that picture a {other}?"}
        assert ask(first[:2] + [follow_up]).startswith("no")
        drawn = c.chat.completions.create(model="default", max_tokens=24, temperature=0,
                                          messages=[{"role": "user", "content": "Draw a blue circle."}])
        message = drawn.choices[0].message
        parts = (message.model_extra or {}).get("mmhub_media")
        assert message.content and parts and parts[0]["image_url"]["url"].startswith("data:image/png;base64,")


def test_the_command_checks_flags_and_serves_the_demo_page_on_the_same_engine(tmp_path) -> None:
    import argparse

    from fastapi.testclient import TestClient

    from mmhub.errors import InputError
    from mmhub.serve.cli import add_arguments, build_server

    p = argparse.ArgumentParser()
    add_arguments(p)
    with pytest.raises(InputError, match="--max-batch 0: must be >= 1"):
        build_server(p.parse_args(["llava-1.5:tiny", "--max-batch", "0"]))
    with pytest.raises(InputError, match="--device 'gpu9' is not a device"):
        build_server(p.parse_args(["llava-1.5:tiny", "--device", "gpu9"]))
    with pytest.raises(InputError, match="--allow-files .*: not a folder"):
        build_server(p.parse_args(["llava-1.5:tiny", "--allow-files", str(tmp_path / "nope")]))
    app, engine = build_server(p.parse_args(["llava-1.5:tiny", "--ui", "--max-tokens", "4"]))
    try:
        with TestClient(app) as http:
            assert http.get("/ui/").status_code == 200
            assert http.get("/health").json()["batching"] == engine.mode
            out = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                           "temperature": 0}).json()
            assert out["usage"]["completion_tokens"] <= 4
        served = app.state.mmhub_pool.get("preset:llava-1.5:tiny")
        assert served.engine() is engine and served.model is engine.model  # one model, one queue
    finally:
        engine.stop()


def test_the_readme_client_snippet_runs_against_a_live_server(model, pictures, tmp_path, monkeypatch, capsys) -> None:
    """The README's five-line `openai` call, as printed there, against a server on a free port."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"```python\n(import base64, openai\n.*?)```", readme, re.S)
    assert block, "the README's serve snippet is missing"
    pictures[0].save(tmp_path / "shape.png")
    monkeypatch.chdir(tmp_path)
    with live_server(Engine(model), ServerSettings(model_name="default", default_max_tokens=5)) as base:
        code = block.group(1).replace("http://127.0.0.1:8000", base)
        assert code != block.group(1)
        exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip()


def test_input_audio_parts_reach_a_model_that_reads_audio(tmp_path) -> None:
    """x-llm:tiny reads audio: a base64 WAV part is decoded to 16 kHz and counted in the prompt; a model without an
    audio encoder refuses the part by name."""
    import base64
    import io
    import wave

    import numpy as np

    from mmhub.loading import load

    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.sin(np.arange(8000) / 5) * 8000).astype("<i2").tobytes())
    part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(buf.getvalue()).decode(), "format": "wav"}}
    model = load("x-llm:tiny")
    with live_server(Engine(model), ServerSettings(model_name="x")) as base:
        c = client(base)
        heard = c.chat.completions.create(model="x", max_tokens=3, temperature=0, messages=[
            {"role": "user", "content": [part, {"type": "text", "text": "what is it?"}]}])
        plain = c.chat.completions.create(model="x", max_tokens=3, temperature=0, messages=[
            {"role": "user", "content": [{"type": "text", "text": "what is it?"}]}])
        assert heard.usage.prompt_tokens > plain.usage.prompt_tokens + 1  # the clip's tokens, not one placeholder
        bad = {**part, "input_audio": {"data": base64.b64encode(b"RIFF0000WAVEjunk").decode(), "format": "wav"}}
        r = httpx.post(base + "/v1/chat/completions", timeout=60,
                       json={"messages": [{"role": "user", "content": [bad]}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content[0].input_audio.data"
    with live_server(Engine(load("llava-1.5:tiny")), ServerSettings(model_name="v")) as base:
        body = {"messages": [{"role": "user", "content": [part]}]}
        r = httpx.post(base + "/v1/chat/completions", timeout=60, json=body)
        assert r.status_code == 400 and "does not read audio" in r.json()["error"]["message"]


def test_local_files_are_read_only_inside_the_allowed_folder(model, pictures, tmp_path) -> None:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    pictures[0].save(allowed / "a.png")
    pictures[1].save(outside / "b.png")
    (allowed / "link.png").symlink_to(outside / "b.png")
    settings = ServerSettings(model_name="tiny", limits=ContentLimits(allow_files=allowed))
    with live_server(Engine(model), settings) as base:
        def post(url: str) -> httpx.Response:
            body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}],
                    "max_tokens": 2, "temperature": 0}
            return httpx.post(base + "/v1/chat/completions", json=body, timeout=60)

        assert post(str(allowed / "a.png")).status_code == 200
        assert post("file://" + str(allowed / "a.png")).status_code == 200
        for url in (str(outside / "b.png"), str(allowed / "link.png"), str(allowed / ".." / "outside" / "b.png")):
            r = post(url)
            assert r.status_code == 400 and "not a file inside the allowed folder" in r.json()["error"]["message"]
