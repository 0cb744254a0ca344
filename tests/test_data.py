"""mmhub.data: every format on small files, easy-VQA, webdataset streaming, skip-and-count, pre-flight."""

from __future__ import annotations

import collections
import csv
import io
import json
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mmhub
from mmhub import hookimpl
from mmhub.data import (
    Dataset,
    DatasetConfig,
    InMemoryDataset,
    MixtureDataset,
    Sample,
    load_dataset,
    load_media,
    preflight,
    robust,
)
from mmhub.data.easy_vqa import COLORS, SHAPES, EasyVQAConfig, EasyVQADataset, facts_from_pixels, question_type
from mmhub.data.webdataset import expand_braces
from mmhub.errors import InputError, SpecError, UnknownComponentError
from mmhub.media import load_image
from mmhub.registry import build_registry

from conftest import need_easy_vqa

# -- small files ------------------------------------------------------------------------------


def png(path: Path, color=(200, 30, 30), size=(24, 24)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path.name


def png_bytes(color=(0, 0, 255)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, format="PNG")
    return buf.getvalue()


def wav_bytes(n: int = 1600, rate: int = 16000) -> bytes:
    pcm = (np.sin(np.arange(n) / 5.0) * 8000).astype("<i2").tobytes()
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(pcm)) + pcm
    return b"RIFF" + struct.pack("<I", len(body)) + body


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# -- LLaVA JSON --------------------------------------------------------------------------------
def test_llava_json_images_placeholders_and_roles(tmp_path: Path) -> None:
    for name in ("a.png", "b.png", "c.png"):
        png(tmp_path / "imgs" / name)
    records = [
        {"id": "one", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                                                          {"from": "gpt", "value": "Red."}]},
        {"id": "two", "image": ["a.png", "b.png"], "conversations": [
            {"from": "system", "value": "Be brief."}, {"from": "human", "value": "Compare <image> and <image>."},
            {"from": "gpt", "value": "Same."}, {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]},
        {"id": "no-marker", "image": "c.png", "conversations": [{"from": "human", "value": "Describe it."},
                                                                 {"from": "gpt", "value": "A square."}]},
        {"id": "text", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"id": "bad", "image": "a.png", "conversations": [{"from": "human", "value": "<image> <image>"},
                                                          {"from": "gpt", "value": "?"}]},
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    ds = load_dataset({"path": "data.json", "image_folder": "imgs"}, base_dir=tmp_path)  # format sniffed
    assert ds.name == "llava_json" and len(ds) == 5
    s = ds[0]
    assert s.id == "one" and s.messages == [{"role": "user", "content": "<image>\nWhat colour?"},
                                            {"role": "assistant", "content": "Red."}]
    assert s.media == {"image": [str(tmp_path / "imgs" / "a.png")]} and not s.problems()
    two = ds[1]
    assert [m["role"] for m in two.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert len(two.media["image"]) == 2 and two.placeholder_counts() == {"image": 2}
    # LLaVA's rule: a record with an image but no <image> gets it prepended to the first human turn
    assert ds[2].messages[0]["content"] == "<image>\nDescribe it." and not ds[2].problems()
    assert ds[3].media == {} and not ds[3].problems()
    with pytest.raises(InputError, match="2 <image> placeholder\\(s\\) but 1 image"):
        ds[4]
    loaded = load_media(ds[1])
    assert all(isinstance(im, Image.Image) for im in loaded.media["image"])


# -- ShareGPT -----------------------------------------------------------------------------------
def test_sharegpt_several_media_and_two_modalities(tmp_path: Path) -> None:
    png(tmp_path / "p1.png")
    png(tmp_path / "p2.png", (0, 200, 0))
    (tmp_path / "s.wav").write_bytes(wav_bytes())
    records = [
        {"messages": [{"role": "user", "content": "<image><image>Which is greener? And what is <audio>?"},
                      {"role": "assistant", "content": "The second; a tone."}],
         "images": ["p1.png", "p2.png"], "audios": ["s.wav"]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}], "system": "Be kind."},
        {"messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "x"}], "images": []},
    ]
    (tmp_path / "sg.json").write_text(json.dumps(records))
    ds = load_dataset(str(tmp_path / "sg.json"))
    assert ds.name == "sharegpt" and len(ds) == 3
    s = ds[0]
    assert s.placeholder_counts() == {"audio": 1, "image": 2} and not s.problems()
    assert s.media["image"] == [str(tmp_path / "p1.png"), str(tmp_path / "p2.png")]
    loaded = load_media(s)
    assert [im.getpixel((0, 0)) for im in loaded.media["image"]] == [(200, 30, 30), (0, 200, 0)]
    assert loaded.media["audio"][0][:4] == b"RIFF"
    assert ds[1].messages[0] == {"role": "system", "content": "Be kind."}
    with pytest.raises(InputError, match="1 <image> placeholder\\(s\\) but 0 image"):
        ds[2]
    write_jsonl(tmp_path / "sg.jsonl", records[:2])
    dsl = load_dataset(str(tmp_path / "sg.jsonl"))
    assert dsl.name == "sharegpt" and dsl[0].media == s.media


# -- captions -----------------------------------------------------------------------------------
def test_captions_jsonl_and_csv_with_configurable_keys_and_prompt(tmp_path: Path) -> None:
    png(tmp_path / "media" / "x.png")
    (tmp_path / "media" / "y.wav").write_bytes(wav_bytes())
    write_jsonl(tmp_path / "caps.jsonl", [{"image": "x.png", "caption": "a red square "}])
    ds = load_dataset(str(tmp_path / "caps.jsonl"), base_dir=tmp_path)
    assert ds.name == "captions"
    with pytest.raises(InputError):  # media_folder defaults to the file's folder, where x.png is not
        load_media(ds[0])
    ds = load_dataset({"type": "captions", "path": "caps.jsonl", "media_folder": "media"}, base_dir=tmp_path)
    assert ds[0].messages == [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "a red square"}]
    with open(tmp_path / "caps.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "text"])
        w.writerow(["y.wav", "a short tone"])
    ds = load_dataset({"path": "caps.csv", "media_folder": "media", "modality": "audio", "media_key": "file",
                       "caption_key": "text", "prompt": "{placeholder}\nWhat do you hear?"}, base_dir=tmp_path)
    s = ds[0]
    assert s.messages[0]["content"] == "<audio>\nWhat do you hear?" and s.messages[1]["content"] == "a short tone"
    assert s.media == {"audio": [str(tmp_path / "media" / "y.wav")]} and not s.problems()


# -- preference --------------------------------------------------------------------------------
def test_preference_jsonl(tmp_path: Path) -> None:
    png(tmp_path / "q.png")
    write_jsonl(tmp_path / "pref.jsonl", [
        {"prompt": "What shape is this?", "images": ["q.png"], "chosen": "A square.", "rejected": "A circle."},
        {"prompt": [{"role": "system", "content": "Short answers."}, {"role": "user", "content": "2+2?"}],
         "chosen": {"role": "assistant", "content": "4"}, "rejected": "5"},
        {"prompt": "no rejected", "chosen": "x"},
    ])
    ds = load_dataset(str(tmp_path / "pref.jsonl"))
    assert ds.name == "preference" and len(ds) == 3
    s = ds[0]
    assert s.is_preference and s.chosen == "A square." and s.rejected == "A circle." and not s.problems()
    assert s.messages == [{"role": "user", "content": "<image>\nWhat shape is this?"}]
    assert s.conversation(s.chosen)[-1] == {"role": "assistant", "content": "A square."}
    assert [m["role"] for m in ds[1].messages] == ["system", "user"] and ds[1].chosen == "4" and ds[1].media == {}
    with pytest.raises(InputError, match="no rejected text"):
        ds[2]


# -- webdataset --------------------------------------------------------------------------------
def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def wds_shards(folder: Path, n_shards: int = 3, per_shard: int = 10) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for s in range(n_shards):
        samples = []
        for k in range(per_shard):
            key = f"s{s}_{k:03d}"
            files = {"png": png_bytes((s * 60, k * 20, 90))}
            if k % 3 == 0:
                files["txt"] = f"caption {key}".encode()
            elif k % 3 == 1:
                files["json"] = json.dumps({"caption": f"caption {key}", "score": k}).encode()
            else:  # two modalities in one sample, with a conversation
                files["wav"] = wav_bytes()
                files["json"] = json.dumps({"messages": [{"role": "user", "content": "<image> <audio> what?"},
                                                         {"role": "assistant", "content": key}]}).encode()
            samples.append((key, files))
        out.append(write_shard(folder / f"shard-{s:03d}.tar", samples))
    return out


def test_webdataset_streams_every_sample_deterministically(tmp_path: Path) -> None:
    wds_shards(tmp_path / "wds")
    ds = load_dataset("wds/shard-{000..002}.tar", base_dir=tmp_path)
    assert ds.name == "webdataset" and ds.streaming and len(ds) == 30
    with pytest.raises(TypeError, match="streaming"):
        ds[0]
    natural = list(ds)
    assert [s.id for s in natural] == [f"s{s}_{k:03d}" for s in range(3) for k in range(10)]
    first, conv = natural[0], natural[2]
    assert first.messages == [{"role": "user", "content": "<image>"},
                              {"role": "assistant", "content": "caption s0_000"}]
    assert load_image(first.media["image"][0]).getpixel((0, 0)) == (0, 0, 90)  # bytes decode
    assert set(conv.media) == {"image", "audio"} and not conv.problems() and natural[1].meta["score"] == 1
    shuffled = load_dataset({"path": str(tmp_path / "wds" / "*.tar"), "shuffle_buffer": 8, "seed": 3})
    a, b = [s.id for s in shuffled], [s.id for s in shuffled]
    assert a == b and sorted(a) == sorted(s.id for s in natural) and a != [s.id for s in natural]
    shuffled.set_epoch(1)
    c = [s.id for s in shuffled]
    assert c != a and sorted(c) == sorted(a)
    other = load_dataset({"path": str(tmp_path / "wds" / "*.tar"), "shuffle_buffer": 8, "seed": 4})
    assert [s.id for s in other] != a
    assert expand_braces("x-{0..2}-{a,b}.tar") == ["x-0-a.tar", "x-0-b.tar", "x-1-a.tar", "x-1-b.tar",
                                                   "x-2-a.tar", "x-2-b.tar"]


def test_webdataset_reads_lazily_and_splits_shards_across_workers(tmp_path: Path) -> None:
    import torch.utils.data

    shards = wds_shards(tmp_path / "w", n_shards=4, per_shard=3)
    ds = load_dataset({"path": [str(p) for p in shards]})
    stream = iter(ds)
    assert next(stream).id == "s0_000"  # the first sample arrives before later shards are opened
    shards[3].unlink()  # a shard vanishing later only hurts when the stream reaches it
    assert [s.id for s in islice_n(stream, 2)] == ["s0_001", "s0_002"]
    write_shard(shards[3], [("s3_000", {"png": png_bytes(), "txt": b"c"})])
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, collate_fn=lambda s: s)
    ids = sorted(s.id for s in loader)
    assert len(ids) == 10 and len(set(ids)) == 10


def islice_n(it, n):
    return [next(it) for _ in range(n)]


# -- mixtures and load_dataset errors ------------------------------------------------------------
def test_mixture_weights_and_errors(tmp_path: Path) -> None:
    png(tmp_path / "x.png")
    write_jsonl(tmp_path / "a.jsonl", [{"image": "x.png", "caption": f"a{i}"} for i in range(10)])
    write_jsonl(tmp_path / "b.jsonl", [{"image": "x.png", "caption": f"b{i}"} for i in range(4)])
    mix = load_dataset([{"path": "a.jsonl", "weight": 0.5}, {"path": "b.jsonl", "weight": 2}], base_dir=tmp_path)
    assert isinstance(mix, MixtureDataset) and len(mix) == 5 + 8
    caps = [mix[i].messages[1]["content"] for i in range(len(mix))]
    assert caps[5:] == [f"b{i}" for i in range(4)] * 2 and len(set(caps[:5])) == 5
    again = load_dataset([{"path": "a.jsonl", "weight": 0.5}, {"path": "b.jsonl", "weight": 2}], base_dir=tmp_path)
    assert [again[i].messages[1]["content"] for i in range(13)] == caps
    wds_shards(tmp_path / "w", 1, 3)
    with pytest.raises(InputError, match="streaming; mixtures take map-style"):
        load_dataset([str(tmp_path / "a.jsonl"), str(tmp_path / "w" / "shard-000.tar")])
    with pytest.raises(UnknownComponentError, match="Did you mean 'llava_json'"):
        load_dataset({"type": "llava_jsn", "path": "a.json"})
    with pytest.raises(SpecError, match="unknown setting 'imagefolder'.*did you mean 'image_folder'"):
        load_dataset({"type": "llava_json", "path": "a.json", "imagefolder": "x"})
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(InputError, match="captions dataset .*empty.jsonl has no samples"):
        load_dataset("empty.jsonl", base_dir=tmp_path)
    with pytest.raises(SpecError, match="cannot tell the format"):
        load_dataset("data.parquet")
    with pytest.raises(InputError, match="does not exist"):
        load_dataset(str(tmp_path / "nope.json"))


def test_register_datasets_hook_adds_a_format(tmp_path: Path) -> None:
    class CountConfig(DatasetConfig):
        n: int = 3

    class Counting(Dataset):
        """Text-only samples counting up (a throwaway plugin format)."""

        name = "counting"
        Config = CountConfig

        def __len__(self):
            return self.config.n

        def __getitem__(self, i):
            return Sample(id=str(i), messages=[{"role": "user", "content": f"{i}+1?"},
                                               {"role": "assistant", "content": str(i + 1)}])

    class Lab:
        @hookimpl
        def register_datasets(self, register):
            register(Counting)

    class NotADataset:
        @hookimpl
        def register_datasets(self, register):
            register(dict)

    reg = build_registry(extra=[("lab", Lab()), ("bad", NotADataset())])
    assert reg.dataset("counting").plugin == "lab" and "easy_vqa" in reg.datasets
    assert any(f.name == "bad" and "not a subclass of mmhub.data.Dataset" in f.error for f in reg.failed)
    ds = load_dataset({"type": "counting", "n": 4}, registry=reg)
    assert len(ds) == 4 and ds[3].messages[1]["content"] == "4"


# -- skip and count ---------------------------------------------------------------------------
def bad_caption_set(folder: Path, good: int) -> tuple[Path, Path, Path]:
    for i in range(good):
        png(folder / f"g{i}.png", (i % 255, 10, 10), (8, 8))
    corrupt = folder / "corrupt.png"
    corrupt.write_bytes(png_bytes()[:40])  # a PNG cut short
    missing = folder / "missing.png"
    records = [{"image": f"g{i}.png", "caption": f"c{i}"} for i in range(good)]
    records.insert(good // 3, {"image": "corrupt.png", "caption": "bad"})
    records.insert(2 * good // 3, {"image": "missing.png", "caption": "gone"})
    return write_jsonl(folder / "caps.jsonl", records), corrupt, missing


def test_robust_skips_and_counts_bad_media(tmp_path: Path) -> None:
    path, corrupt, missing = bad_caption_set(tmp_path, good=200)
    ds = load_dataset(str(path))
    with pytest.raises(InputError, match="cannot be read"):
        load_media(ds[200 // 3])
    with pytest.raises(InputError, match=f"{missing}"):
        load_media(ds[2 * 200 // 3])
    safe = robust(ds)  # 2 bad of 202 <= 1% of 202
    got = [s.messages[1]["content"] for s in safe]
    assert got == [f"c{i}" for i in range(200)] and all(isinstance(s.media["image"][0], Image.Image) for s in safe)
    assert safe.skipped == {"unreadable_media": 1, "missing_file": 1}
    files = {e["reason"]: e["file"] for e in safe.report()["examples"]}
    assert files == {"unreadable_media": str(corrupt), "missing_file": str(missing)}
    assert safe[200 // 3].messages[1]["content"] == f"c{200 // 3}"  # a bad index gives the next good sample
    assert safe.skipped == {"unreadable_media": 1, "missing_file": 1}  # known bad samples are not counted twice


def test_robust_over_the_cap_raises_with_counts(tmp_path: Path) -> None:
    path, corrupt, missing = bad_caption_set(tmp_path, good=18)
    with pytest.raises(InputError) as exc:
        list(robust(load_dataset(str(path)), max_bad_fraction=0.05))  # 2 bad of 20 > 1
    msg = str(exc.value)
    assert "2 of 20 samples" in msg and "missing_file: 1, unreadable_media: 1" in msg
    assert str(corrupt) in msg and str(missing) in msg and exc.value.skips["skipped"] == 2
    with open(path, "a") as fh:
        fh.write("{not json\n")
    safe = robust(load_dataset(str(path)), max_bad_fraction=0.2)
    assert len(list(safe)) == 18 and safe.skipped == {"unreadable_media": 1, "missing_file": 1, "malformed_record": 1}


def test_robust_stream_skips_bad_shard_samples(tmp_path: Path) -> None:
    samples = [(f"k{i:03d}", {"png": png_bytes(), "txt": b"fine"}) for i in range(300)]
    samples[10] = ("k010", {"png": b"\x89PNG broken", "txt": b"bad image"})
    samples[20] = ("k020", {"png": png_bytes()})  # no caption
    write_shard(tmp_path / "a.tar", samples)
    safe = robust(load_dataset(str(tmp_path / "a.tar")))
    assert len(list(safe)) == 298 and safe.skipped == {"unreadable_media": 1, "malformed_record": 1}
    with pytest.raises(InputError, match="malformed_record: 1, unreadable_media: 1"):
        list(robust(load_dataset(str(tmp_path / "a.tar")), max_bad_fraction=0.001))


# -- pre-flight -------------------------------------------------------------------------------
def test_preflight_counts_masked_mismatched_and_too_long(tiny_spec, images) -> None:
    model = mmhub.build(tiny_spec)
    ctx, per_item = model.plan.backbone_facts.context_length, model.plan.tokens_per_item("image")
    img = images[0]

    def qa(i: int, q: str = "What is it?", a: str = "A cat.") -> Sample:
        return Sample(id=f"s{i}", messages=[{"role": "user", "content": f"<image>\n{q}"},
                                            {"role": "assistant", "content": a}], media={"image": [img]})

    samples = [qa(i) for i in range(20)]
    samples.append(Sample(id="masked", messages=[{"role": "user", "content": "<image>\nNo reply."}],
                          media={"image": [img]}))
    samples.append(Sample(id="mismatch", messages=[{"role": "user", "content": "<image><image> two?"},
                                                   {"role": "assistant", "content": "one"}], media={"image": [img]}))
    # text alone fits the context; only its media tokens push it over
    base = len(model.processor.encode(qa(0, q="").messages, {"image": [img]}).input_ids)
    long = qa(99, q="x" * (ctx - base - 1))
    assert len(model.processor.encode(long.messages, {"image": [img]}).input_ids) <= ctx
    samples.append(Sample(id="long", messages=long.messages, media=long.media))
    samples.append(Sample(id="pref", messages=[{"role": "user", "content": "<image>\nShape?"}], media={"image": [img]},
                          chosen="square", rejected="circle"))
    ds = InMemoryDataset(samples, "hand-made samples")
    report = preflight(model, ds, max_bad_fraction=0.2)
    assert report.checked == 24 and report.bad_samples == 3
    assert report.problems == {"all_masked": 1, "placeholder_mismatch": 1, "too_long": 1}
    assert [e["id"] for e in report.examples["too_long"]] == ["long"] and per_item > 1
    assert report.longest == ctx - 2 + per_item and report.longest > ctx  # the <image> token becomes per_item tokens
    assert json.loads(json.dumps(report.to_dict()))["problems"]["too_long"] == 1
    assert "all_masked: 1" in str(report) and "sample 20 (masked)" in str(report)
    with pytest.raises(InputError) as exc:
        preflight(model, ds)  # 3 of 24 > 1%
    msg = str(exc.value)
    assert "3 of 24" in msg and "all_masked: 1, placeholder_mismatch: 1, too_long: 1" in msg and "(mismatch)" in msg
    assert exc.value.report.problems == report.problems
    sub = preflight(model, ds, n=5, max_bad_fraction=1.0, seed=1)
    assert sub.checked == 5 and sub.to_dict()["checked"] == 5


def test_preflight_reports_unreadable_media(tiny_spec, tmp_path: Path) -> None:
    path, corrupt, missing = bad_caption_set(tmp_path, good=8)
    model = mmhub.build(tiny_spec)
    report = preflight(model, load_dataset(str(path)), max_bad_fraction=0.5)
    assert report.problems == {"missing_file": 1, "unreadable_media": 1} and report.checked == 10
    assert str(missing) in report.examples["missing_file"][0]["detail"]


# -- easy-VQA ---------------------------------------------------------------------------------
@need_easy_vqa
def test_easy_vqa_sizes_and_question_types() -> None:
    counts = {}
    for split in ("train", "test"):
        qa = load_dataset({"type": "easy_vqa", "split": split})
        caps = load_dataset({"type": "easy_vqa", "split": split, "task": "caption"})
        counts[split] = (len(qa), len(caps))
        images = {int(p.stem) for p in (qa.folder / "images").glob("*.png")}
        assert set(caps.image_ids) == images
        types = collections.Counter(question_type(a) for _, a, _ in qa.questions)
        assert set(types) == {"shape", "color", "yes_no"}
        assert types["yes_no"] == {"train": 28407, "test": 7136}[split]  # the dataset README's numbers
    assert counts == {"train": (38575, 4000), "test": (9673, 1000)}
    qa = load_dataset({"type": "easy_vqa", "split": "train", "limit": 3})
    s = qa[0]
    assert len(qa) == 3 and s.messages == [{"role": "user", "content": "<image>\nwhat is the blue shape?"},
                                           {"role": "assistant", "content": "rectangle"}]
    assert s.meta == {"answer": "rectangle", "question": "what is the blue shape?", "question_type": "shape",
                      "image_id": 0, "synthetic": False}
    assert Path(s.media["image"][0]).name == "0.png" and load_image(s.media["image"][0]).size == (64, 64)
    assert qa[1].meta["question_type"] == "color" and qa[2].meta["question_type"] == "yes_no"
    with pytest.raises(SpecError, match="split"):
        load_dataset({"type": "easy_vqa", "split": "val"})


@need_easy_vqa
def test_easy_vqa_caption_for_every_image() -> None:
    ds = EasyVQADataset(EasyVQAConfig(split="train", task="caption"))
    caps = [ds[i].messages[1]["content"] for i in range(len(ds))]
    assert len(caps) == 4000
    for cap in caps:
        article, color, shape = cap.split()
        assert article == "a" and color in COLORS and shape in SHAPES
    assert caps[0] == "a blue rectangle"  # "what is the blue shape?" -> rectangle
    open_by_questions = [i for i, (sh, co) in ds.facts.items() if sh is None or co is None]
    assert 0 < len(open_by_questions) < 500  # 422 of 4,000 need the pixel reading for shape or colour
    assert [ds[i].messages[1]["content"] for i in range(5)] == caps[:5]  # deterministic
    prompt = EasyVQADataset(EasyVQAConfig(split="test", task="caption", caption_prompt="Describe the image.", limit=2))
    assert prompt[0].messages[0]["content"] == "<image>\nDescribe the image." and len(prompt) == 2


@need_easy_vqa
def test_easy_vqa_pixel_reading_agrees_with_the_answers() -> None:
    ds = EasyVQADataset(EasyVQAConfig(split="test", task="caption"))
    checked = 0
    for image_id, (shape, color) in ds.facts.items():
        if shape is not None and color is not None:
            assert facts_from_pixels(ds.image_path(image_id)) == (shape, color), image_id
            checked += 1
    assert checked == 888  # the other 112 test images are left open by their questions


@need_easy_vqa
def test_easy_vqa_balanced_yes_no_questions() -> None:
    from mmhub.data.easy_vqa import yes_no_templates

    plain = EasyVQADataset(EasyVQAConfig(split="test", task="qa"))
    ds = EasyVQADataset(EasyVQAConfig(split="test", task="qa", balanced_yes_no=4))
    assert len(ds) == len(plain) + 4 * 1000 and ds.original == len(plain)
    assert ds[0].messages == plain[0].messages and ds[0].meta["synthetic"] is False
    templates = yes_no_templates(plain.questions)
    assert ("is there not a {color} shape?", "color", True) in templates and len(templates) == 16
    extra = [ds[i] for i in range(ds.original, len(ds))]
    assert all(s.meta["synthetic"] and s.meta["question_type"] == "yes_no" for s in extra)
    present = 0
    for s in extra:  # every answer follows from the image's shape and colour
        shape, color = ds.full_facts(s.meta["image_id"])
        q = s.meta["question"]
        asked_true = f" {color} " in f" {q} " or f" {shape}" in f" {q}"
        negated = " not " in f" {q} " or " no " in f" {q} "
        assert s.meta["answer"] == ("yes" if asked_true != negated else "no"), q
        present += asked_true
    assert 0.45 < present / len(extra) < 0.55  # the asked value is true half of the time
    again = EasyVQADataset(EasyVQAConfig(split="test", task="qa", balanced_yes_no=4))
    assert [again[i].messages for i in range(ds.original, ds.original + 20)] == [s.messages for s in extra[:20]]


def _wording_prior(questions: list[list]) -> float:
    """The accuracy of answering each yes/no question with its wording's most frequent answer (no picture)."""
    from collections import Counter, defaultdict

    by_text: dict[str, Counter] = defaultdict(Counter)
    for q, a, _ in questions:
        by_text[q][a] += 1
    return sum(max(c.values()) for c in by_text.values()) / len(questions)


@need_easy_vqa
def test_easy_vqa_yes_no_balanced_replaces_the_splits_own_in_place() -> None:
    """``yes_no: balanced``: the same images and question types in the same order; each yes/no answer follows from
    the image; and the wording alone no longer tells it (82.5% of the split's own, near chance here)."""
    plain = EasyVQADataset(EasyVQAConfig(split="test", task="qa"))
    ds = EasyVQADataset(EasyVQAConfig(split="test", task="qa", yes_no="balanced"))
    assert len(ds) == len(plain) and [q[2] for q in ds.questions] == [q[2] for q in plain.questions]
    assert [question_type(q[1]) for q in ds.questions] == [question_type(q[1]) for q in plain.questions]
    assert all(a == b for a, b in zip(ds.questions, plain.questions, strict=True) if b[1] not in ("yes", "no"))
    yes_no = [q for q in ds.questions if q[1] in ("yes", "no")]
    for q, answer, image_id in yes_no:
        shape, color = ds.full_facts(image_id)
        asked_true = f" {color} " in f" {q} " or f" {shape}" in f" {q}"
        negated = " not " in f" {q} " or " no " in f" {q} "
        assert answer == ("yes" if asked_true != negated else "no"), q
    own = [q for q in plain.questions if q[1] in ("yes", "no")]
    assert _wording_prior(own) > 0.8 and _wording_prior(yes_no) < 0.6
    assert ds.questions == EasyVQADataset(EasyVQAConfig(split="test", task="qa", yes_no="balanced")).questions


@need_easy_vqa
def test_easy_vqa_negated_false_drops_the_questions_about_absence() -> None:
    """``negated: false`` drops exactly the yes/no questions that ask about absence (half of the balanced ones):
    everything else stays, in order, and what is left is still balanced."""
    from mmhub.data.easy_vqa import is_negated

    cfg = {"split": "test", "task": "qa", "yes_no": "balanced", "balanced_yes_no": 2}
    every = EasyVQADataset(EasyVQAConfig(**cfg)).questions
    kept = EasyVQADataset(EasyVQAConfig(**cfg, negated=False)).questions
    assert kept == [q for q in every if q[1] not in ("yes", "no") or not is_negated(q[0])]
    dropped = [q for q in every if q not in kept]
    assert dropped and all(" not " in f" {q[0]} " or " no " in f" {q[0]} " for q in dropped)
    assert 0.35 < len(dropped) / sum(q[1] in ("yes", "no") for q in every) < 0.65
    yes_no = [q[1] for q in kept if q[1] in ("yes", "no")]
    assert 0.4 < yes_no.count("yes") / len(yes_no) < 0.6
    assert [is_negated(q) for q in ("is there not a red shape?", "does the image contain no circle?",
                                    "is there a red shape?", "Is there NOT a circle?")] == [True, True, False, True]
