"""The output side: signal tokens, output projectors, validation of conditioning shapes, the decoding-side
alignment loss, mmhub's decode loop handing signal states to a generator, training and saving.

The generator here is a small test double (`Palette`: conditioning -> a flat-colour image, text features
from a character embedding), so these tests isolate mmhub's own mechanics; the diffusers generators have
their own tests (tests/test_generators.py) and the zoo presets run end to end in tests/test_presets_output.py.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from mmhub import MMModel
from mmhub.assembly import build
from mmhub.data.base import InMemoryDataset
from mmhub.data.sample import Sample
from mmhub.decoding import pick
from mmhub.errors import InputError, SpecError
from mmhub.interfaces import Generator, GeneratorFacts
from mmhub.registry import get_registry
from mmhub.reply import Reply
from mmhub.signals import group_marker, token_names
from mmhub.train.run import train

COND_LEN, COND_DIM = 5, 12


class Palette(Generator):
    """Test double: a flat image whose colour is read from the conditioning."""

    name = "test_palette"
    example_settings = {}

    @classmethod
    def describe(cls, config, ctx) -> GeneratorFacts:
        return GeneratorFacts("image", COND_LEN, COND_DIM)

    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        self.chars = nn.Embedding(128, COND_DIM)

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        ids = torch.tensor([[ord(c) % 128 for c in (cap + " " * COND_LEN)[:COND_LEN]] for cap in captions])
        return self.chars(ids)

    def generate(self, cond, seed=None, steps=None, guidance_scale=None) -> list[Image.Image]:
        if cond.shape[1:] != (COND_LEN, COND_DIM):
            raise ValueError(f"conditioning {tuple(cond.shape)} != (N, {COND_LEN}, {COND_DIM})")
        return [Image.new("RGB", (8, 8), tuple(int(v) for v in c.mean(0)[:3].sigmoid() * 255)) for c in cond]


@pytest.fixture(scope="module", autouse=True)
def palette_registered():
    reg = get_registry()
    reg.add("generator", Palette, "tests")
    yield
    del reg.components["generator"][Palette.name]


@pytest.fixture
def out_spec(tiny_spec):
    spec = copy.deepcopy(tiny_spec)
    spec.update({"output_projectors": {"image": {"type": "output_transformer", "width": 16, "heads": 2}},
                 "generators": {"image": {"type": "test_palette"}}, "signal_tokens": {"image": 3}})
    spec["stages"] = [{"name": "decode_align", "train": {"output_projectors": "full", "signal_tokens": "full"},
                       "lr": 1e-2, "batch_size": 8, "max_steps": 60, "warmup_ratio": 0.0, "log_every": 10}]
    return spec


def draw_samples(n: int = 8) -> list[Sample]:
    colours = ["red", "blue", "green", "black"]
    out = []
    for i in range(n):
        c = colours[i % 4]
        out.append(Sample(id=str(i), messages=[{"role": "user", "content": f"draw a {c} circle"},
                                               {"role": "assistant",
                                                "content": f"Here is a {c} circle. {group_marker('image')}"}],
                          outputs={"image": [f"a {c} circle"]}))
    return out


def test_signal_tokens_are_added_with_their_own_rows(out_spec) -> None:
    model = build(out_spec)
    names = token_names("image", 3)
    assert names == ["<img_0>", "<img_1>", "<img_2>"]
    ids = [model.tokenizer.convert_tokens_to_ids(n) for n in names]
    assert model.signal_tokens.ids.tolist() == ids
    assert model.signal_tokens.embed.shape == (3, 48) and model.signal_tokens.head.shape == (3, 48)
    enc = model.processor.encode([{"role": "user", "content": "draw"},
                                  {"role": "assistant", "content": "ok <img_out>"}])
    # <img_out> becomes the signal tokens once, in place: right after "ok " and before the turn's end
    end = model.tokenizer.convert_tokens_to_ids("<|im_end|>")
    at = enc.input_ids.index(ids[0])
    assert enc.input_ids[at - 3:at + len(ids) + 1] == [ord("o"), ord("k"), ord(" "), *ids, end]  # byte ids
    assert sum(i in ids for i in enc.input_ids) == len(ids)
    # the text the model returns never shows them, and keeps everything else
    assert model.tokenizer.decode(ids + [ord("a")], skip_special_tokens=True) == "a"
    hidden = torch.randn(2, 48)
    logits = model.head(hidden)
    assert logits.shape == (2, 300 + 3)
    inside = [i for i in ids if i < 300]  # byte tokenizer: the ids fall inside the table and are masked there
    assert bool((logits[:, inside] < -1e30).all())


def test_validation_fills_and_checks_the_conditioning_shape(out_spec) -> None:
    model = build(out_spec)
    cfg = model.plan.output_projectors["image"].config
    assert (cfg.in_dim, cfg.in_len, cfg.out_len, cfg.out_dim) == (48, 3, COND_LEN, COND_DIM)
    bad = copy.deepcopy(out_spec)
    bad["output_projectors"]["image"]["out_dim"] = 1024
    with pytest.raises(SpecError) as exc:
        build(bad)
    text = str(exc.value)
    assert "output_projectors.image.out_dim" in text and "1024" in text and str(COND_DIM) in text
    bad = copy.deepcopy(out_spec)
    del bad["output_projectors"]
    bad["signal_tokens"] = {"audio": 2}
    with pytest.raises(SpecError) as exc:
        build(bad)
    assert "has no output projector" in str(exc.value) and "signal_tokens.audio" in str(exc.value)
    bad = copy.deepcopy(out_spec)
    bad["stages"][0]["train"] = {"signal_tokens": {"lora": {"r": 4}}}
    with pytest.raises(SpecError, match="signal tokens are embedding rows"):
        build(bad)


def test_alignment_loss_reaches_projector_and_signal_rows(out_spec) -> None:
    model = build(out_spec)
    encs = []
    for s in draw_samples(2):
        e = model.processor.encode(s.messages)
        e.outputs = s.outputs
        encs.append(e)
    b = model.processor.collate(encs)
    assert b["outputs"] == {"image": ["a red circle", "a blue circle"]}
    model.train()
    model.requires_grad_(True)
    out = model(b["input_ids"], b["attention_mask"], b["labels"], outputs=b["outputs"])
    assert out.output_loss is not None and float(out.output_loss.detach()) > 0
    out.loss.backward()
    assert model.signal_tokens.embed.grad.abs().sum() > 0 and model.signal_tokens.head.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.output_projectors["image"].parameters())
    with pytest.raises(InputError, match=r"2 image output caption\(s\) but 1 signal group\(s\)"):
        model(b["input_ids"][:1], b["attention_mask"][:1], b["labels"][:1], outputs={"image": ["a red circle", "x"]})


def test_trained_model_emits_signals_and_draws(out_spec, tmp_path) -> None:
    spec = copy.deepcopy(out_spec)
    spec["stages"][0]["train"]["backbone"] = "full"
    summary = train(spec, out=tmp_path / "run", datasets={"decode_align": InMemoryDataset(draw_samples())},
                    progress_bar=False)
    assert summary["decode_align"]["final_loss"] < 1.0
    model = MMModel.from_pretrained(tmp_path / "run" / "decode_align" / "model")
    replies = model.generate(["draw a red circle", "draw a blue circle"], max_new_tokens=24)
    for r in replies:
        assert isinstance(r, Reply) and r.finish_reason in ("stop", "length") and r.token_ids
        assert "<img_" not in r.text and "circle" in r.text
        assert len(r.images) == 1 and r.images[0].size == (8, 8) and r.images == r.media["image"]
    no_media = model.generate(["draw a red circle"], max_new_tokens=24, generate_media=False)[0]
    assert no_media.text == replies[0].text and no_media.media == {}
    # the decode loop is deterministic
    assert model.generate(["draw a red circle"], max_new_tokens=24)[0] == replies[0]
    # streaming: the text grows, and the last value is generate's reply, drawing included
    parts = list(model.stream("draw a red circle", max_new_tokens=24))
    assert parts[-1] == replies[0] and isinstance(parts[-1], Reply) and len(parts[-1].images) == 1
    assert len(parts) > 2 and all(replies[0].text.startswith(p.text) for p in parts)
    assert all(p.finish_reason is None and p.media == {} for p in parts[:-1])
    # served: both prompts share the engine's running batch and get generate's replies, drawings included
    import queue

    from mmhub.serve.engine import Engine, Finished, Request, Sampling

    engine = Engine(model, max_batch=2).start()
    try:
        boxes = [queue.Queue(), queue.Queue()]
        for prompt, box in zip(["draw a red circle", "draw a blue circle"], boxes, strict=True):
            engine.submit(Request([{"role": "user", "content": prompt}], {}, Sampling(max_tokens=24, temperature=0),
                                  box.put))
        served = []
        for box in boxes:
            while not isinstance(ev := box.get(timeout=60), Finished):
                pass
            served.append(ev)
    finally:
        engine.stop()
    for ev, want in zip(served, replies, strict=True):
        assert (ev.text, ev.token_ids, ev.finish_reason) == (want.text, want.token_ids, want.finish_reason)
        assert [im.tobytes() for im in ev.media["image"]] == [im.tobytes() for im in want.images]
    # the demo shows it: saved to files, rendered after the reply's text
    from mmhub.apps import chat

    saved = chat.save_media(parts[-1].media, tmp_path / "shown")
    files = saved.shown
    assert [Path(f).suffix for f in files] == [".png"] and Image.open(files[0]).size == (256, 256)  # enlarged
    assert Image.open(saved.originals[files[0]]).size == (8, 8)
    rendered = chat.render([chat.Turn("user", "draw a red circle"),
                            chat.Turn("assistant", parts[-1].text, files, originals=saved.originals)])
    assert rendered[1]["content"][0] == parts[-1].text and rendered[1]["content"][1]["path"] == files[0]


def test_models_without_an_output_side_return_plain_replies(tiny_spec) -> None:
    model = build(tiny_spec)
    r = model.generate(["hello"], max_new_tokens=4)[0]
    assert isinstance(r, Reply) and r.media == {} and model.signal_tokens is None


def test_nucleus_sampling_keeps_the_top_mass() -> None:
    logits = torch.tensor([[5.0, 4.9, -10.0, -10.0]])
    g = torch.Generator().manual_seed(0)
    picks = {int(pick(logits, True, 1.0, 0.9, g)) for _ in range(50)}
    assert picks <= {0, 1} and len(picks) == 2
    assert int(pick(logits, False, 1.0, 1.0, None)) == 0


def test_demo_saves_video_and_audio_media(tmp_path) -> None:
    import wave

    import numpy as np

    from mmhub.apps import chat
    from mmhub.interfaces import Audio

    frames = [Image.new("RGB", (8, 8), (i * 60, 0, 0)) for i in range(3)]
    tone = Audio(np.sin(np.linspace(0, 100, 1600)).astype(np.float32), 16000)
    files = chat.save_media({"video": [frames], "audio": [tone]}, tmp_path).shown
    assert [Path(f).suffix for f in files] == [".gif", ".wav"]
    assert Image.open(files[0]).n_frames == 3
    with wave.open(files[1]) as fh:
        assert fh.getframerate() == 16000 and fh.getnframes() == 1600


def test_init_from_adds_an_output_side_to_a_trained_model(tiny_spec, out_spec, tmp_path) -> None:
    base = build(tiny_spec)
    with torch.no_grad():
        base.projectors["image"].net[0].weight.add_(1.0)  # "trained" weights that a fresh build would not have
    base.save_pretrained(tmp_path / "base")
    spec = copy.deepcopy(out_spec)
    spec["init_from"] = str(tmp_path / "base")
    grown = build(spec)
    assert torch.equal(grown.projectors["image"].net[0].weight, base.projectors["image"].net[0].weight)
    grown.save_pretrained(tmp_path / "grown")  # a saved model no longer needs the folder it started from
    assert "init_from" not in (tmp_path / "grown" / "mmhub_spec.json").read_text()
    again = MMModel.from_pretrained(tmp_path / "grown")
    assert torch.equal(again.projectors["image"].net[0].weight, base.projectors["image"].net[0].weight)
    bad = copy.deepcopy(spec)
    bad["projectors"]["image"]["depth"] = 1  # the source's projector tensors no longer fit
    with pytest.raises(Exception, match="init_from"):
        build(bad)
    bad["init_from"] = str(tmp_path / "nowhere")
    with pytest.raises(Exception, match="init_from: model folder .*nowhere does not exist"):
        build(bad)


def test_a_model_grown_from_a_shipped_folder_stores_only_what_it_changed(tiny_spec, out_spec, tmp_path,
                                                                         monkeypatch) -> None:
    from safetensors.torch import load_file

    import mmhub.checkpoint as ckpt

    monkeypatch.setattr(ckpt, "PACKAGE_ROOT", tmp_path)  # stands in for the installed package's folder
    base = build(tiny_spec)
    with torch.no_grad():
        base.projectors["image"].net[0].weight.add_(1.0)
    base.save_pretrained(tmp_path / "demo_model" / "base")
    spec = copy.deepcopy(out_spec)
    spec["init_from"] = "mmhub:demo_model/base"
    grown = build(spec)  # its output side and signal rows are new (random), the rest comes from the base
    grown.save_pretrained(tmp_path / "grown")
    saved = load_file(str(tmp_path / "grown" / "model.safetensors"))
    assert not any(k.startswith("projectors.") for k in saved)  # the shipped folder restores these
    assert any(k.startswith("output_projectors.") for k in saved) and any(k.startswith("signal_tokens.") for k in saved)
    again = MMModel.from_pretrained(tmp_path / "grown")
    for k, v in grown.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    # the folder it leans on must stay as it was
    with torch.no_grad():
        base.projectors["image"].net[0].weight.add_(1.0)
    base.save_pretrained(tmp_path / "demo_model" / "base")
    with pytest.raises(Exception, match="whose weights changed since"):
        MMModel.from_pretrained(tmp_path / "grown")
    import shutil

    shutil.rmtree(tmp_path / "demo_model" / "base")
    with pytest.raises(Exception, match="which is missing"):
        MMModel.from_pretrained(tmp_path / "grown")


def test_a_model_grown_from_a_layered_folder_gets_every_base_below_it(tiny_spec, out_spec, tmp_path,
                                                                       monkeypatch) -> None:
    """base <- mid (saved on top of base) <- top: growing from mid brings base's weights too (it used to bring
    only mid's own tensors, leaving base's trained projector at its fresh initialisation)."""
    import mmhub.checkpoint as ckpt

    monkeypatch.setattr(ckpt, "PACKAGE_ROOT", tmp_path)
    base = build(tiny_spec)
    with torch.no_grad():
        base.projectors["image"].net[0].weight.add_(1.0)
    base.save_pretrained(tmp_path / "demo_model" / "base")
    spec = copy.deepcopy(out_spec)
    spec["init_from"] = "mmhub:demo_model/base"
    mid = build(spec)
    mid.save_pretrained(tmp_path / "demo_model" / "mid")
    spec["init_from"] = "mmhub:demo_model/mid"
    top = build(spec)
    assert torch.equal(top.projectors["image"].net[0].weight, base.projectors["image"].net[0].weight)
    for k, v in mid.state_dict().items():
        assert torch.equal(v, top.state_dict()[k]), k
    with torch.no_grad():
        top.projectors["image"].net[0].weight.add_(0.5)
    top.save_pretrained(tmp_path / "top")
    again = MMModel.from_pretrained(tmp_path / "top")
    for k, v in top.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_easy_vqa_draw_samples_and_task_guard(tiny_spec) -> None:
    from mmhub.data import load_dataset
    from mmhub.evaluation.runner import get_task

    data = load_dataset({"type": "easy_vqa", "task": "draw", "limit": 3})
    s = data[0]
    caption = s.outputs["image"][0]
    assert s.messages[1]["content"] == f"Here is {caption}. <img_out>" and caption in s.messages[0]["content"]
    first = load_dataset({"type": "easy_vqa", "task": "draw", "limit": 1, "draw_reply": "{marker} {caption}"})[0]
    assert first.messages[1]["content"] == f"<img_out> {caption}"
    with pytest.raises(InputError, match="needs a model with an image generator"):
        get_task("easy_vqa_draw").run(build(tiny_spec))


def test_a_placeholder_past_the_vocabulary_never_masks_a_signal_token(out_spec) -> None:
    """Regression (the SmolLM2 draw model drew 0% because of it): when the tokenizer fills the backbone's table,
    ``<image>`` gets the id just past it, the same number as the first signal column; suppressing the placeholder
    must not mask ``<img_0>``."""
    probe = build(out_spec)
    n_tok = len(probe.tokenizer) - 1 - len(probe.signal_tokens)  # the tokenizer's size before <image> and <img_*>
    spec = copy.deepcopy(out_spec)
    spec["backbone"]["config"] = dict(spec["backbone"]["config"], vocab_size=n_tok)
    model = build(spec)
    sig = model.signal_tokens
    image_id = model.processor.placeholder_ids["image"]
    assert image_id == sig.base_vocab  # the colliding layout
    plain = sig.logits
    bonus = torch.zeros(sig.base_vocab + len(sig))
    bonus[sig.base_vocab] = 1e4  # make <img_0> the model's certain choice
    sig.logits = lambda hidden, base: plain(hidden, base) + bonus.to(hidden.dtype)
    assert int(model.head(torch.randn(1, sig.head.shape[1])).argmax(-1)) == sig.base_vocab  # column V = <img_0>
    reply = model.generate(["draw"], max_new_tokens=4)[0]
    assert len(reply.media.get("image", [])) >= 1, f"no image drawn; reply {reply.text!r}"
