"""Training data from the Train tab: uploads checked like chat uploads (sizes, zip bombs, escaping paths, links),
stored atomically, read by the same datasets and pre-flight as `mmhub train`; stage settings put into the spec."""

from __future__ import annotations

import copy
import io
import json
import stat
import zipfile
from pathlib import Path

import pytest
import yaml
from PIL import Image

from mmhub.apps.train_data import (
    DataLimits,
    data_format,
    extract_media,
    preflight_data,
    read_records,
    set_stage_data,
    stage_upload,
)
from mmhub.data import load_dataset
from mmhub.errors import InputError

from conftest import TINY_SPEC


def _png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, "PNG")
    return buf.getvalue()


def _zip(path: Path, entries: dict[str, bytes], links: tuple[str, ...] = ()) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in entries.items():
            z.writestr(name, data)
        for name in links:
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            z.writestr(info, "/etc/passwd")
    return path


def _llava(path: Path, n: int, broken: int | None = None) -> Path:
    rows = [{"id": f"s{i}", "image": f"pics/{i}.png" if i != broken else "pics/missing.png",
             "conversations": [{"from": "human", "value": "<image>\nWhat colour is it?"},
                               {"from": "gpt", "value": ["red", "green", "blue"][i % 3]}]} for i in range(n)]
    path.write_text(json.dumps(rows))
    return path


def test_a_media_zip_unpacks_its_media_and_leaves_the_rest_out(tmp_path: Path) -> None:
    z = _zip(tmp_path / "m.zip", {"pics/0.png": _png((255, 0, 0)), "pics/1.png": _png((0, 255, 0)),
                                  "run.sh": b"rm -rf /", "notes/readme.txt": b"hello"})
    counts = extract_media(z, tmp_path / "out")
    assert counts["extracted"] == 2 and counts["left_out"] == 2
    assert sorted(p.name for p in (tmp_path / "out").rglob("*") if p.is_file()) == ["0.png", "1.png"]


@pytest.mark.parametrize("entries,links,message", [
    ({"../evil.png": b"x"}, (), r"entry '../evil.png' climbs out with '..'"),
    ({"/abs/evil.png": b"x"}, (), r"entry '/abs/evil.png' is absolute"),
    ({"C:\\evil.png": b"x"}, (), r"holds a backslash or a drive"),
    ({}, ("pics/link.png",), r"entry 'pics/link.png' is a symbolic link"),
    ({"bomb.png": b"\0" * (8 << 20)}, (), r"entry 'bomb.png' unpacks to 8.0 MB from 0.0 MB \(\d+x, over 200x\): a zip "
                                          r"bomb is refused"),
], ids=["dotdot", "absolute", "drive", "symlink", "bomb"])
def test_hostile_zips_are_refused_and_write_nothing(tmp_path: Path, entries, links, message) -> None:
    z = _zip(tmp_path / "m.zip", {"pics/ok.png": _png((1, 2, 3)), **entries}, links)
    with pytest.raises(InputError, match=message):
        extract_media(z, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_zip_limits_state_the_numbers(tmp_path: Path) -> None:
    z = _zip(tmp_path / "m.zip", {f"p/{i}.png": _png((i, 0, 0)) for i in range(5)})
    with pytest.raises(InputError, match=r"has 5 entries, over the 3 limit"):
        extract_media(z, tmp_path / "a", DataLimits(max_zip_members=3))
    with pytest.raises(InputError, match=r"unpacks to 0.0 MB, over the 1e-05 MB limit"):
        extract_media(z, tmp_path / "b", DataLimits(max_unzipped_mb=0.00001))
    with pytest.raises(InputError, match=r"the media zip 'm.zip' is 0.0 MB, over the 1e-06 MB limit"):
        extract_media(z, tmp_path / "c", DataLimits(max_upload_mb=0.000001))
    (tmp_path / "not.zip").write_bytes(b"PK nope")
    with pytest.raises(InputError, match=r"'not.zip' is not a readable zip"):
        extract_media(tmp_path / "not.zip", tmp_path / "d")


def test_data_files_are_read_and_their_format_recognised(tmp_path: Path) -> None:
    llava = read_records(_llava(tmp_path / "a.json", 2))
    assert data_format(llava) == "llava_json"
    assert data_format([{"messages": [], "images": ["x.png"]}]) == "sharegpt"
    assert data_format([{"conversations": [], "images": []}]) == "sharegpt"
    (tmp_path / "b.jsonl").write_text('{"messages": []}\n{oops\n')
    with pytest.raises(InputError, match=r"'b.jsonl' line 2: not JSON"):
        read_records(tmp_path / "b.jsonl")
    (tmp_path / "c.json").write_text('{"a": 1}')
    with pytest.raises(InputError, match=r"must hold a non-empty list of records"):
        read_records(tmp_path / "c.json")
    (tmp_path / "d.yaml").write_text("- a")
    with pytest.raises(InputError, match=r"'d.yaml' is not a data file this tab reads"):
        read_records(tmp_path / "d.yaml")
    with pytest.raises(InputError, match=r"the first record has keys \['question'\]"):
        data_format([{"question": "?"}])


def _spec_with(data: dict) -> str:
    spec = copy.deepcopy(TINY_SPEC)
    spec["stages"] = [{"name": "align", "train": {"projectors": "full"}, "data": data, "max_steps": 2}]
    return yaml.safe_dump(spec)


def test_an_upload_is_stored_read_by_the_dataset_and_preflighted(tmp_path: Path) -> None:
    """A LLaVA-JSON file + zip lands under runs/uploads/NAME, loads as the llava_json dataset, and the pre-flight
    of the CLI counts the broken row (a missing picture) and, over the stage's allowance, refuses with its names."""
    pics = {f"pics/{i}.png": _png((40 * i, 0, 0)) for i in range(6)}
    block, said = stage_upload(_llava(tmp_path / "d.json", 6, broken=4), _zip(tmp_path / "m.zip", pics),
                               tmp_path / "runs", "my data")
    assert block["type"] == "llava_json" and Path(block["image_folder"]).is_dir()
    assert "stored 6 llava_json records and 6 media files" in said
    assert len(load_dataset(block)) == 6
    with pytest.raises(InputError, match=r"(?s)missing_file.*missing.png"):
        preflight_data(_spec_with(block))
    tolerant = yaml.safe_load(_spec_with(block))
    tolerant["stages"][0]["max_bad_fraction"] = 0.5
    report = preflight_data(yaml.safe_dump(tolerant))
    assert report.startswith("stage align: 1 of 6 samples checked would be skipped") and "missing_file: 1" in report
    with pytest.raises(InputError, match=r"an upload named 'mydata' exists already"):
        stage_upload(tmp_path / "d.json", None, tmp_path / "runs", "my data")
    with pytest.raises(InputError, match=r"a zip bomb is refused"):  # a failed upload leaves no folder behind
        stage_upload(tmp_path / "d.json", _zip(tmp_path / "b.zip", {"b.png": b"\0" * (4 << 20)}),
                     tmp_path / "runs", "other")
    assert sorted(p.name for p in (tmp_path / "runs" / "uploads").iterdir()) == ["mydata"]


def test_stage_settings_go_into_the_spec(tmp_path: Path) -> None:
    spec = copy.deepcopy(TINY_SPEC)
    spec["stages"] = [{"name": "align", "train": {"projectors": "full"}},
                      {"name": "instruct", "train": {"backbone": {"lora": {"r": 8, "alpha": 16}}}}]
    text = yaml.safe_dump(spec)
    out = yaml.safe_load(set_stage_data(text, {"type": "easy_vqa"}, "instruct",
                                        {"lr": 1e-3, "max_steps": 7, "batch_size": 4, "lora_r": 2}))
    align, instruct = out["stages"]
    assert "data" not in align and "lr" not in align
    assert instruct["data"] == {"type": "easy_vqa"} and instruct["lr"] == 1e-3 and instruct["max_steps"] == 7
    assert instruct["batch_size"] == 4 and instruct["train"]["backbone"]["lora"] == {"r": 2, "alpha": 16}
    every = yaml.safe_load(set_stage_data(text, None, None, {"max_steps": 3, "lr": ""}))
    assert [s["max_steps"] for s in every["stages"]] == [3, 3] and "lr" not in every["stages"][0]
    with pytest.raises(InputError, match=r"stage 'x' is not in the spec \(its stages: align, instruct\)"):
        set_stage_data(text, None, "x")
    with pytest.raises(InputError, match=r"stage 'align' trains no LoRA adapter"):
        set_stage_data(text, None, "align", {"lora_r": 4})
