"""The demo's logic without a browser: uploads, prompts, conversation, model choice, assemble, catalog."""

from __future__ import annotations

import struct
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import mmhub
from mmhub.apps import assemble, catalog, chat
from mmhub.apps.demo import model_key
from mmhub.apps.models import DEFAULT, LoadedModel, ModelPool, model_choices
from mmhub.apps.uploads import Limits, check_prompt, modality_of, read_upload
from mmhub.errors import InputError
from mmhub.plugins import FailedPlugin

LIMITS = Limits()


@pytest.fixture(scope="module")
def loaded(registry) -> LoadedModel:
    """The shipped CI-sized default model: small, trained, and sure of easy-VQA colours."""
    from mmhub.apps.models import load

    return load(DEFAULT)


@pytest.fixture
def red_circle(tmp_path) -> Path:
    img = Image.new("RGB", (64, 64), (255, 255, 255))
    yy, xx = np.mgrid[:64, :64]
    arr = np.asarray(img).copy()
    arr[(yy - 32) ** 2 + (xx - 30) ** 2 < 15 ** 2] = (255, 0, 0)
    path = tmp_path / "circle.png"
    Image.fromarray(arr).save(path)
    return path


def _wav(path: Path, samples: np.ndarray, rate: int = 16000) -> Path:
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()
    header = (b"RIFF" + struct.pack("<I", 36 + len(pcm)) + b"WAVEfmt "
              + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16))
    path.write_bytes(header + b"data" + struct.pack("<I", len(pcm)) + pcm)
    return path


# -- uploads and prompts ---------------------------------------------------------------------------
def test_image_upload_is_decoded_to_rgb(red_circle):
    modality, item = read_upload(red_circle, ["image"], LIMITS)
    assert modality == "image" and item.mode == "RGB" and item.size == (64, 64)


def test_non_image_renamed_png_gets_a_message(tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("this is a text file, not a picture\n" * 10)
    with pytest.raises(InputError, match=r"'notes.png' is not a readable image.*upload a PNG"):
        read_upload(fake, ["image"], LIMITS)


def test_fifty_megabyte_image_names_size_and_limit(tmp_path):
    big = tmp_path / "huge.png"
    with open(big, "wb") as fh:  # a 50 MB file (sparse): refused by size before any decoding
        fh.truncate(50_000_000)
    with pytest.raises(InputError, match=r"'huge.png' is 50.0 MB; this demo takes files up to 20 MB.*--max-upload-mb"):
        read_upload(big, ["image"], LIMITS)


def test_oversized_pixels_are_refused_before_decoding(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("RGB", (4000, 3000)).save(path)
    with pytest.raises(InputError, match=r"4000x3000 = 12,000,000 pixels.*up to 1,000,000"):
        read_upload(path, ["image"], Limits(max_image_pixels=1_000_000))


def test_zero_length_audio_gets_a_message(tmp_path):
    empty_file = tmp_path / "empty.wav"
    empty_file.write_bytes(b"")
    with pytest.raises(InputError, match=r"'empty.wav' is empty \(0 bytes\)"):
        read_upload(empty_file, ["audio"], LIMITS)
    no_samples = _wav(tmp_path / "silent.wav", np.zeros(0))
    with pytest.raises(InputError, match=r"'silent.wav'.*(zero samples|0 samples)"):
        read_upload(no_samples, ["audio"], LIMITS)


def test_audio_upload_is_16k_mono(tmp_path):
    path = _wav(tmp_path / "tone.wav", 0.3 * np.sin(np.linspace(0, 2000, 8000)), rate=8000)
    modality, wave = read_upload(path, ["audio"], LIMITS)
    assert modality == "audio" and wave.dtype == np.float32 and wave.shape == (16000,)


def test_modality_the_model_does_not_read(tmp_path):
    path = _wav(tmp_path / "a.wav", np.zeros(1600))
    with pytest.raises(InputError, match=r"'a.wav' is audio, but the loaded model takes image"):
        read_upload(path, ["image"], LIMITS)
    with pytest.raises(InputError, match=r"'doc.pdf' is not a file type this demo reads"):
        modality_of("doc.pdf")


def test_long_prompt_gets_a_message():
    with pytest.raises(InputError, match=r"10,000 characters; this demo takes at most 4,000"):
        check_prompt("x" * 10_000, LIMITS)
    assert check_prompt("  what colour?  ", LIMITS) == "what colour?"


# -- conversation -------------------------------------------------------------------------------------
def test_user_turn_and_prompt_place_one_placeholder_per_item(loaded, red_circle):
    turn = chat.user_turn("<image> what color is the shape?", [{"path": str(red_circle)}], loaded, LIMITS)
    assert turn.text == "what color is the shape?" and len(turn.media["image"]) == 1
    messages, media = chat.prompt_for([turn, chat.Turn("assistant", "red"), chat.Turn("user", "and the shape?")],
                                      loaded)
    assert messages == [{"role": "user", "content": "<image>\nwhat color is the shape?"},
                        {"role": "assistant", "content": "red"}, {"role": "user", "content": "and the shape?"}]
    assert len(media["image"]) == 1


def test_empty_and_too_many_files_are_refused(loaded, red_circle):
    with pytest.raises(InputError, match="the message is empty"):
        chat.user_turn("  ", [], loaded, LIMITS)
    with pytest.raises(InputError, match="5 files attached; this demo takes at most 4"):
        chat.user_turn("hi", [str(red_circle)] * 5, loaded, LIMITS)


def test_streamed_reply_ends_with_what_generate_returns(loaded):
    # easy-VQA test image 0 (a red triangle); the real-weights default calls the hand-drawn circle above brown
    from mmhub.data.easy_vqa import EasyVQAConfig, EasyVQADataset

    image = EasyVQADataset(EasyVQAConfig(split="test", task="qa")).image_path(0)
    turn = chat.user_turn("what color is the shape?", [image], loaded, LIMITS)
    parts = list(chat.reply([turn], loaded, chat.Settings(max_new_tokens=8)))
    expected = loaded.model.generate(["<image>\nwhat color is the shape?"], [{"image": [turn.media["image"][0]]}],
                                     max_new_tokens=8)[0]
    assert parts and parts[-1] == expected and expected.text == "red"


def test_stream_grows_token_by_token():
    model = mmhub.build("llava-1.5:tiny")
    parts = list(model.stream("hello", max_new_tokens=12))
    final = model.generate(["hello"], max_new_tokens=12)[0]
    assert parts[-1] == final
    assert all(b.text.startswith(a.text.rstrip()) or len(b.text) >= len(a.text)
               for a, b in zip(parts, parts[1:], strict=False))


def test_reply_needs_a_user_turn_and_valid_settings(loaded):
    with pytest.raises(InputError, match="nothing to answer"):
        list(chat.reply([], loaded, chat.Settings()))
    with pytest.raises(InputError, match="max new tokens must be within 1..2048, got 0"):
        chat.Settings(max_new_tokens=0).generate_kwargs()
    assert chat.Settings(temperature=0.7, top_p=0.9).generate_kwargs()["do_sample"] is True


def test_render_and_undo(red_circle):
    turns = [chat.Turn("user", "q1", [str(red_circle)]), chat.Turn("assistant", "a1"), chat.Turn("user", "q2"),
             chat.Turn("assistant", "a2")]
    shown = chat.render(turns)
    assert shown[0] == {"role": "user", "content": [{"path": str(red_circle), "alt_text": "circle.png"}, "q1"]}
    assert shown[1] == {"role": "assistant", "content": "a1"}
    assert [t.text for t in chat.undo(turns)] == ["q1", "a1"]
    assert chat.undo([chat.Turn("user", "only")]) == []


def test_drawings_show_enlarged_with_the_original_for_download(tmp_path):
    rng = np.random.default_rng(0)
    drawn = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))  # noise: any smoothing shows
    wide = Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8))  # 300x200: larger than the display
    small_wide = Image.new("RGB", (64, 32), (0, 0, 255))
    saved = chat.save_media({"image": [drawn, wide, small_wide]}, tmp_path)
    assert [Path(p).name for p in saved.shown] == ["image-0.png", "image-1.png", "image-2.png"]
    shown = np.asarray(Image.open(saved.shown[0]))
    assert shown.shape == (256, 256, 3)  # 256 px on the longer side, each pixel a 4x4 block (nearest-neighbour)
    assert np.array_equal(shown, np.repeat(np.repeat(np.asarray(drawn), 4, axis=0), 4, axis=1))
    original = saved.originals[saved.shown[0]]
    assert Path(original).name == "image-0-original.png"
    assert np.array_equal(np.asarray(Image.open(original)), np.asarray(drawn))
    assert np.array_equal(np.asarray(Image.open(saved.shown[1])), np.asarray(wide))  # never shrunk nor enlarged
    assert Image.open(saved.shown[2]).size == (256, 128)  # the aspect is kept
    # the chat shows the enlarged copy, then a download link (not a second picture) to the original
    turns = [chat.Turn("user", "draw"), chat.Turn("assistant", "Here.", saved.shown[:1], originals=saved.originals)]
    content = chat.render(turns)[1]["content"]
    assert content[:2] == ["Here.", {"path": saved.shown[0], "alt_text": "image-0.png"}]
    link = content[2]["file"]
    assert link["path"] == original and link["orig_name"] == "image-0-original.png"
    assert "image" not in link["mime_type"]  # gradio picks the component by mime type: a file link
    import gradio as gr

    assert gr.Chatbot().postprocess(chat.render(turns))  # a message the Chatbot takes


def test_uploaded_images_are_shown_as_they_are(loaded, red_circle):
    turn = chat.user_turn("what colour?", [str(red_circle)], loaded, LIMITS)
    assert turn.originals == {}
    assert chat.render([turn])[0]["content"] == [{"path": str(red_circle), "alt_text": "circle.png"}, "what colour?"]


# -- models ----------------------------------------------------------------------------------------
def test_model_choices_and_keys(tmp_path, registry):
    choices = dict((k, label) for label, k in model_choices())
    assert DEFAULT in choices and "preset:llava-1.5:tiny" in choices
    assert model_key(None) == DEFAULT and model_key("llava-1.5") == "preset:llava-1.5:tiny"
    with pytest.raises(InputError, match="is not an mmhub model folder"):
        model_key(str(tmp_path))
    with pytest.raises(InputError, match="neither a model folder nor a preset"):
        model_key("no-such-thing")


def test_default_model_says_which_it_is(loaded):
    from mmhub.demo_model import find_default

    found = find_default()
    assert loaded.label == f"default: {found.name}"
    assert ("fallback" in loaded.note) == found.fallback
    assert loaded.modalities == ["image"]


def test_pool_loads_once_and_keeps_the_last_few():
    calls = []

    def loader(key: str) -> LoadedModel:
        calls.append(key)
        return LoadedModel(key, key, "", model=None)

    pool = ModelPool(capacity=2, loader=loader)
    threads = [threading.Thread(target=pool.get, args=("a",)) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    pool.get("b"), pool.get("a"), pool.get("c")
    assert calls == ["a", "b", "c"] and pool.loaded_keys() == ["a", "c"]


def test_folder_model_loads(tmp_path):
    from mmhub.apps.models import load

    model = mmhub.build("llava-1.5:tiny")
    model.save_pretrained(tmp_path / "m")
    loaded = load(f"folder:{tmp_path / 'm'}")
    assert loaded.modalities == ["image"] and "loaded from" in loaded.note
    with pytest.raises(InputError, match="not an mmhub model folder"):
        load(f"folder:{tmp_path}")


# -- assemble ---------------------------------------------------------------------------------------
def test_form_to_spec_validates_and_builds():
    text = assemble.form_to_yaml("vlm", "image", "open_clip", assemble.example_yaml("encoder", "open_clip"),
                                 "mlp", assemble.example_yaml("projector", "mlp"), "hf_causal_lm",
                                 assemble.example_yaml("backbone", "hf_causal_lm"), "chatml")
    spec = yaml.safe_load(text)
    assert spec["encoders"]["image"]["type"] == "open_clip"
    assert spec["projectors"]["image"] == {"type": "mlp", "depth": 2}
    ok, message = assemble.validate(text)
    assert ok and message.startswith("**Valid**: vlm: image: open_clip -> mlp")
    rows, summary = assemble.build(text)
    assert [r[0] for r in rows] == ["encoders.image", "projectors.image", "backbone"]
    assert summary.startswith("**Built** vlm") and all(r[2] > 0 for r in rows)
    rows_again, _, picture = assemble.build_and_draw(text)
    assert rows_again == rows and Image.open(picture).format == "PNG" and picture.endswith("vlm.png")


def test_invalid_specs_are_reported_not_raised():
    ok, message = assemble.validate("name: x\nbackbone: {type: hf_causal_lmm}\n")
    assert not ok and "hf_causal_lmm" in message and "hf_causal_lm" in message  # names the slot and suggests the fix
    ok, message = assemble.validate("name: [unclosed\n")
    assert not ok and "not valid YAML/JSON at line 2" in message
    rows, message = assemble.build("name: x\nbackbone: {type: hf_causal_lm}\n")
    assert rows == [] and "Invalid spec" in message
    with pytest.raises(Exception, match="settings must be a mapping"):
        assemble.form_to_yaml("x", "image", "timm", "- a list", "mlp", "", "hf_causal_lm", "", "auto")


def test_preset_into_the_spec_box_and_download(tmp_path):
    text = assemble.preset_yaml("blip-2:tiny")
    assert assemble.validate(text)[0]
    path = Path(assemble.save(text, str(tmp_path)))
    assert path.name.endswith(".yaml") and yaml.safe_load(path.read_text())["backbone"]["type"] == "hf_seq2seq_lm"
    assert assemble.names("encoder", "audio") and "timm" not in assemble.names("encoder", "audio")


# -- plugins tab -------------------------------------------------------------------------------------
def test_catalog_lists_builtins_and_failures(registry):
    rows = catalog.component_rows()
    named = {(r[0], r[1]) for r in rows}
    assert {("encoder", "timm"), ("projector", "qformer"), ("backbone", "hf_causal_lm"),
            ("dataset", "easy_vqa"), ("eval task", "easy_vqa")} <= named
    assert all(len(r) == len(catalog.COMPONENT_COLUMNS) for r in rows)
    assert any(r[0] == "mmhub.encoders" for r in catalog.plugin_rows())
    # the summary states what the registry holds: either no failure or how many failed, never both
    clean = replace(registry, plugins=replace(registry.plugins, failed=[]))
    assert catalog.summary(clean).endswith(". No plugin failed to load.")
    bad = FailedPlugin("bad_plugin", "bad-dist", "ImportError: no module named nope")
    broken = replace(registry, plugins=replace(registry.plugins, failed=[bad]))
    text = catalog.summary(broken)
    assert text.endswith(". **1 plugin(s) failed to load** (below).") and "No plugin failed" not in text
    assert catalog.failed_rows(broken) == [["bad_plugin", "bad-dist", "ImportError: no module named nope"]]
    n = len(registry.failed)  # the installed plugins: the text follows their count
    expected = f"**{n} plugin(s) failed to load** (below)." if n else "No plugin failed to load."
    assert catalog.summary().endswith(expected)


def test_app_builds(loaded):
    from mmhub.apps.ui import build_app

    pool = ModelPool(loader=lambda key: loaded)
    app = build_app(pool)
    assert app.title == "mmhub demo"


@pytest.mark.parametrize("modalities, types, sources", [
    (["image"], ["image"], ["upload"]),
    (["image", "audio"], ["image", ".wav", ".wave"], ["upload"]),
    (["audio"], [".wav", ".wave"], ["upload"]),
    ([], None, []),
])
def test_uploads_offered_only_for_what_the_model_reads(modalities, types, sources):
    from types import SimpleNamespace

    from mmhub.apps.ui import _input_box

    box = _input_box(LoadedModel("k", "k", "", model=SimpleNamespace(modalities=modalities)))
    assert box["file_types"] == types and box["sources"] == sources
    assert ("text only" in box["placeholder"]) == (not modalities)
