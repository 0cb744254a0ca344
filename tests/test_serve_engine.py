"""The serving engine: continuous batching gives every request what it gets alone; stops, choices, cancels, limits."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch

from mmhub import build
from mmhub.serve import kv
from mmhub.serve.engine import Delta, Engine, EngineError, Failed, Finished, QueueFull, Request, Sampling


class Collect:
    """A request's events, and a wait until it has finished."""

    def __init__(self, n: int = 1) -> None:
        self.events: list[Any] = []
        self.n = n
        self.finished: dict[int, Finished] = {}
        self.failed: Failed | None = None
        self.done = threading.Event()

    def __call__(self, ev: Any) -> None:
        self.events.append(ev)
        if isinstance(ev, Finished):
            self.finished[ev.choice] = ev
        if isinstance(ev, Failed):
            self.failed = ev
        if isinstance(ev, Failed) or len(self.finished) == self.n:
            self.done.set()

    def wait(self, timeout: float = 120) -> Collect:
        assert self.done.wait(timeout), "the engine did not finish the request"
        return self

    def streamed(self, choice: int = 0) -> str:
        return "".join(ev.text for ev in self.events if isinstance(ev, Delta) and ev.choice == choice)


def _prompts(model: Any, images: list[Any]) -> list[tuple[list[dict[str, str]], dict[str, list[Any]]]]:
    ph = model.processor.placeholders["image"]
    return [
        ([{"role": "user", "content": f"{ph}\ndescribe"}], {"image": [images[0]]}),
        ([{"role": "user", "content": "a much longer question with no image at all, " * 3}], {}),
        ([{"role": "user", "content": f"{ph}\n{ph}\ncompare"}], {"image": [images[1], images[2]]}),
        ([{"role": "user", "content": f"{ph}\nwhat?"}, {"role": "assistant", "content": "a thing"},
          {"role": "user", "content": "and the colour?"}], {"image": [images[3]]}),
        ([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}], {}),
        ([{"role": "user", "content": f"{ph}\nx"}], {"image": [images[2]]}),
    ]


@pytest.fixture
def model(tiny_spec):
    torch.manual_seed(0)
    return build(tiny_spec).eval()


def test_continuous_batching_answers_equal_each_request_alone(model, images) -> None:
    prompts = _prompts(model, images) * 2
    limits = [5, 40, 12, 33, 3, 21, 17, 8, 29, 1, 40, 9]
    alone = [model.generate([m], [media], max_new_tokens=k)[0] for (m, media), k in zip(prompts, limits, strict=True)]
    engine = Engine(model, max_batch=4).start()
    peak = {"rows": 0}
    watch = threading.Event()

    def watcher() -> None:
        while not watch.is_set():
            peak["rows"] = max(peak["rows"], engine.running)
            time.sleep(0.001)

    threading.Thread(target=watcher, daemon=True).start()
    try:
        outs = []
        for (messages, media), k in zip(prompts, limits, strict=True):
            c = Collect()
            engine.submit(Request(messages, media, Sampling(max_tokens=k, temperature=0), c))
            outs.append(c)
            time.sleep(0.003)  # arrivals spread over the decode steps: rows join a running batch
        for c, want, k in zip(outs, alone, limits, strict=True):
            got = c.wait().finished[0]
            assert got.text == want.text, (k, got.text, want.text)
            assert got.finish_reason == want.finish_reason
            assert got.completion_tokens == len(want.token_ids) and got.token_ids == want.token_ids
            assert c.streamed() == got.text  # the deltas add up to the final text
    finally:
        watch.set()
        engine.stop()
    assert peak["rows"] > 1  # requests really shared the batch
    assert engine.stats.steps < sum(len(a.token_ids) for a in alone)
    assert engine.stats.prompt_tokens > sum(len(m[0][-1]["content"]) for m in prompts) // 4  # media tokens counted


def test_stop_strings_cut_the_text_and_finish_with_stop(model, images) -> None:
    messages, media = _prompts(model, images)[0]
    full = model.generate([messages], [media], max_new_tokens=30)[0].text
    assert len(full) > 6, full
    stop = full[4:6]
    engine = Engine(model).start()
    try:
        c = Collect()
        engine.submit(Request(messages, media, Sampling(max_tokens=30, temperature=0, stop=(stop,)), c))
        got = c.wait().finished[0]
    finally:
        engine.stop()
    assert got.finish_reason == "stop"
    assert got.text == full[:full.index(stop)].strip()
    assert stop not in c.streamed()  # nothing past the stop was ever sent


def test_n_choices_with_a_seed_are_reproducible_and_differ(model, images) -> None:
    messages, media = _prompts(model, images)[2]
    engine = Engine(model, max_batch=4).start()
    try:
        runs = []
        for _ in range(2):
            c = Collect(n=2)
            engine.submit(Request(messages, media, Sampling(max_tokens=12, temperature=1.0, seed=7), c, n=2))
            runs.append(c.wait())
    finally:
        engine.stop()
    first = [runs[0].finished[i].text for i in range(2)]
    assert first == [runs[1].finished[i].text for i in range(2)]
    assert first[0] != first[1]


def test_a_cancelled_request_leaves_and_the_others_finish(model, images) -> None:
    prompts = _prompts(model, images)
    alone = model.generate([prompts[1][0]], [prompts[1][1]], max_new_tokens=40)[0].text
    engine = Engine(model, max_batch=4).start()
    try:
        gone, kept = Collect(), Collect()
        doomed = Request(*prompts[0], Sampling(max_tokens=200, temperature=0), gone)
        engine.submit(doomed)
        engine.submit(Request(*prompts[1], Sampling(max_tokens=40, temperature=0), kept))
        time.sleep(0.05)
        doomed.cancelled.set()
        assert gone.wait().failed is not None and gone.failed.error.status == 499
        assert kept.wait().finished[0].text == alone
    finally:
        engine.stop()


def test_a_request_cancelled_during_a_step_still_gets_its_error(model, images) -> None:
    """The cancel lands after the step's cancel check and before its rows are settled: the request must still be
    failed with 499, not leave the batch silently (its client would wait forever)."""
    prompts = _prompts(model, images)
    engine = Engine(model, max_batch=4)
    gone, kept = Collect(), Collect()
    doomed = Request(*prompts[0], Sampling(max_tokens=200, temperature=0), gone)
    settle = engine._settle

    def cancel_mid_step(row: Any) -> bool:
        if row.request is doomed:
            doomed.cancelled.set()
        return settle(row)

    engine._settle = cancel_mid_step  # type: ignore[method-assign]
    engine.submit(doomed)
    engine.submit(Request(*prompts[1], Sampling(max_tokens=8, temperature=0), kept))
    engine.start()
    try:
        assert gone.wait(30).failed is not None and gone.failed.error.status == 499
        assert kept.wait(30).finished
    finally:
        engine.stop()


def test_limits_queue_full_too_many_choices_and_context_budget(model, images) -> None:
    engine = Engine(model, max_batch=2, max_queue=1)  # not started: requests stay queued
    engine.submit(Request(*_prompts(model, images)[0], Sampling(), Collect()))
    with pytest.raises(QueueFull, match="queue is full"):
        engine.submit(Request(*_prompts(model, images)[0], Sampling(), Collect()))
    with pytest.raises(EngineError, match="n=3 choices need 3 batch rows"):
        engine.submit(Request(*_prompts(model, images)[0], Sampling(), Collect(), n=3))
    engine = Engine(model).start()
    try:
        c = Collect()
        engine.submit(Request(*_prompts(model, images)[0], Sampling(max_tokens=500, temperature=0), c))
        err = c.wait().failed.error
        ok = Collect()
        engine.submit(Request(*_prompts(model, images)[4], Sampling(max_tokens=3, temperature=0), ok))
        assert ok.wait().finished[0].finish_reason in ("stop", "length")  # the engine serves on
    finally:
        engine.stop()
    assert err.status == 400 and "> the model's context of 512 tokens" in str(err)


def test_kv_join_pads_left_and_select_trims() -> None:
    from transformers import DynamicCache

    def cache(b: int, length: int, fill: float) -> Any:
        c = DynamicCache()
        c.update(torch.full((b, 2, length, 4), fill), torch.full((b, 2, length, 4), -fill), 0)
        return c

    a, b = cache(2, 3, 1.0), cache(1, 5, 2.0)
    mask = kv.join(a, torch.ones(2, 3, dtype=torch.long), b, torch.ones(1, 5, dtype=torch.long))
    k = a.layers[0].keys
    assert k.shape == (3, 2, 5, 4) and mask.tolist() == [[0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert float(k[0, :, :2].abs().sum()) == 0 and bool((k[2] == 2).all())
    mask = kv.select_rows(a, mask, [0, 1])
    mask = kv.trim_left(a, mask)
    assert a.layers[0].keys.shape == (2, 2, 3, 4) and mask.tolist() == [[1, 1, 1], [1, 1, 1]]
    assert bool((a.layers[0].keys == 1).all())


def test_models_that_cannot_share_a_batch_are_served_one_at_a_time_with_the_same_answers(images) -> None:
    from mmhub.loading import load

    model = load("flamingo:tiny")  # gated cross-attention injectors inside the backbone
    engine = Engine(model, max_batch=4).start()
    assert engine.mode == "serial" and engine.mode_reason == "injectors inside the backbone"
    ph = model.processor.placeholders["image"]
    prompts = [([{"role": "user", "content": f"{ph}\nwhat is it?"}], {"image": [images[i]]}) for i in range(3)]
    try:
        outs = []
        for messages, media in prompts:
            c = Collect()
            engine.submit(Request(messages, media, Sampling(max_tokens=6, temperature=0), c))
            outs.append(c)
        got = [c.wait().finished[0] for c in outs]
    finally:
        engine.stop()
    want = [model.generate([m], [media], max_new_tokens=6)[0] for m, media in prompts]
    assert [g.text for g in got] == [w.text for w in want]
    assert all(c.streamed() == g.text for c, g in zip(outs, got, strict=True))
    assert all(c.failed is None for c in outs) and outs[0].events  # prompt tokens counted before decoding
