"""Training data from the Train tab: a registered dataset, or an uploaded LLaVA-JSON / ShareGPT file + a media zip.

An upload is checked before it is written where a run can read it, with the chat uploads' style of message (which
file, what is wrong with the numbers, what to do):

* the data file: ``.json`` or ``.jsonl``, at most ``max_data_mb``, a list of records in LLaVA's format
  (``conversations`` from human/gpt with an ``image`` name) or ShareGPT's (``messages`` or ``conversations`` with
  ``images`` / ``audios`` / ``videos`` lists); the format is read from the first record;
* the zip of media: at most ``max_upload_mb`` as uploaded, at most ``max_zip_members`` entries and
  ``max_unzipped_mb`` once unpacked, no entry more than ``max_ratio`` times its compressed size (zip bombs; the
  bytes actually written are counted too, never the headers' word alone), no entry whose path is absolute, holds
  ``..`` or a drive, and no symbolic link; only media files (images, audio, video by suffix) are unpacked, every
  other entry is counted and left out. Nothing from an upload is ever executed or unpickled.

`stage_upload` writes the checked files under ``RUNS/uploads/NAME/`` (atomically: a failed upload leaves nothing)
and returns the stage's ``data:`` block; `dataset_block` gives it for a registered dataset; `set_stage_data`
puts a data block (and the stage settings of the form) into a spec's YAML; `preflight_data` runs the CLI's
pre-flight (`mmhub.data.preflight`) on it with the spec's own processor before a run starts.
"""

from __future__ import annotations

import json
import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import yaml

from mmhub.apps.uploads import AUDIO_SUFFIXES, IMAGE_SUFFIXES
from mmhub.errors import InputError

MEDIA_SUFFIXES = IMAGE_SUFFIXES | AUDIO_SUFFIXES | {".mp4", ".webm", ".avi", ".mov", ".mkv", ".npy", ".gif"}
DATA_SUFFIXES = {".json", ".jsonl"}


@dataclass(frozen=True)
class DataLimits:
    """What the Train tab accepts as training data (set from `mmhub demo` flags)."""

    max_data_mb: float = 50.0
    max_upload_mb: float = 200.0
    max_unzipped_mb: float = 1000.0
    max_zip_members: int = 20_000
    max_ratio: float = 200.0


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MB"


def _check_size(path: Path, limit_mb: float, what: str) -> None:
    size = path.stat().st_size
    if size > limit_mb * 2**20:
        raise InputError(f"{what} '{path.name}' is {_mb(size)}, over the {limit_mb:g} MB limit; upload a smaller "
                         f"file (or start the demo with a higher limit)")


def read_records(path: Path, limits: DataLimits = DataLimits()) -> list[dict[str, Any]]:
    """The data file's records (a JSON list, or JSON lines); the first problem is an InputError naming the line."""
    if path.suffix.lower() not in DATA_SUFFIXES:
        raise InputError(f"'{path.name}' is not a data file this tab reads; upload LLaVA-JSON or ShareGPT as "
                         f"{' or '.join(sorted(DATA_SUFFIXES))}")
    _check_size(path, limits.max_data_mb, "the data file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"'{path.name}' is not UTF-8 text (byte {exc.start}); save it as UTF-8 JSON") from None
    if path.suffix.lower() == ".jsonl":
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise InputError(f"'{path.name}' line {n}: not JSON ({exc.msg}, column {exc.colno})") from None
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"'{path.name}' is not JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") \
                from None
    if not isinstance(records, list) or not records:
        raise InputError(f"'{path.name}' must hold a non-empty list of records (LLaVA-JSON or ShareGPT), not "
                         f"{type(records).__name__ if not isinstance(records, list) else 'an empty list'}")
    return records


def data_format(records: list[Any], name: str = "the data file") -> str:
    """``llava_json`` or ``sharegpt``, read from the first record that is an object."""
    first = next((r for r in records if isinstance(r, dict)), None)
    if first is None:
        raise InputError(f"{name}: no record is a JSON object; each record needs 'conversations' or 'messages'")
    if "messages" in first or any(k in first for k in ("images", "audios", "videos")):
        return "sharegpt"
    if "conversations" in first:
        return "llava_json"
    raise InputError(f"{name}: the first record has keys {sorted(first)[:8]}; LLaVA-JSON records have "
                     f"'conversations' (and 'image'), ShareGPT records 'messages' or 'conversations' with "
                     f"'images'")


def _bad_member_path(name: str) -> str | None:
    if "\\" in name or PureWindowsPath(name).drive:
        return "holds a backslash or a drive"
    p = PurePosixPath(name)
    if p.is_absolute():
        return "is absolute"
    if ".." in p.parts:
        return "climbs out with '..'"
    return None


def extract_media(zip_path: Path, dest: Path, limits: DataLimits = DataLimits()) -> dict[str, int]:
    """Unpack the zip's media files into `dest` after the checks in the module docstring; returns counts
    (``extracted``, ``left_out``, ``bytes``). Raises InputError naming the entry and the numbers."""
    _check_size(zip_path, limits.max_upload_mb, "the media zip")
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(f"'{zip_path.name}' is not a readable zip ({exc}); upload the images as a .zip") from None
    with archive:
        entries = archive.infolist()
        if len(entries) > limits.max_zip_members:
            raise InputError(f"'{zip_path.name}' has {len(entries):,} entries, over the {limits.max_zip_members:,} "
                             f"limit; split the data or raise the limit")
        declared = sum(e.file_size for e in entries)
        if declared > limits.max_unzipped_mb * 2**20:
            raise InputError(f"'{zip_path.name}' unpacks to {_mb(declared)}, over the {limits.max_unzipped_mb:g} MB "
                             f"limit; upload fewer or smaller media files")
        for e in entries:
            why = _bad_member_path(e.filename)
            if why:
                raise InputError(f"'{zip_path.name}': entry '{e.filename}' {why}; zip the media with paths "
                                 f"relative to one folder")
            if stat.S_ISLNK(e.external_attr >> 16):
                raise InputError(f"'{zip_path.name}': entry '{e.filename}' is a symbolic link; zip the files "
                                 f"themselves")
            if e.file_size > max(e.compress_size, 1) * limits.max_ratio and e.file_size > 2**20:
                raise InputError(f"'{zip_path.name}': entry '{e.filename}' unpacks to {_mb(e.file_size)} from "
                                 f"{_mb(e.compress_size)} ({e.file_size / max(e.compress_size, 1):.0f}x, over "
                                 f"{limits.max_ratio:g}x): a zip bomb is refused")
        counts = {"extracted": 0, "left_out": 0, "bytes": 0}
        budget = int(limits.max_unzipped_mb * 2**20)
        for e in entries:
            if e.is_dir():
                continue
            if PurePosixPath(e.filename).suffix.lower() not in MEDIA_SUFFIXES:
                counts["left_out"] += 1
                continue
            target = dest.joinpath(*PurePosixPath(e.filename).parts)
            if not target.resolve().is_relative_to(dest.resolve()):
                raise InputError(f"'{zip_path.name}': entry '{e.filename}' would be written outside the upload "
                                 f"folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(e) as src, open(target, "wb") as out:
                while chunk := src.read(1 << 20):
                    counts["bytes"] += len(chunk)
                    if counts["bytes"] > budget:  # the headers lied: count what is really written
                        raise InputError(f"'{zip_path.name}' unpacks to more than {limits.max_unzipped_mb:g} MB "
                                         f"(its headers said {_mb(declared)}): refused")
                    out.write(chunk)
            counts["extracted"] += 1
    return counts


def stage_upload(data_file: str | Path, media_zip: str | Path | None, runs_dir: Path, name: str,
                 limits: DataLimits = DataLimits()) -> tuple[dict[str, Any], str]:
    """Check and store an uploaded data file (+ media zip) under ``runs_dir/uploads/name``; returns the stage's
    ``data:`` block and a line saying what was stored. A failed upload leaves nothing behind."""
    from mmhub.apps.train_runs import run_name

    data_file = Path(data_file)
    records = read_records(data_file, limits)
    kind = data_format(records, f"'{data_file.name}'")
    folder = runs_dir / "uploads" / run_name(name)
    if folder.exists():
        raise InputError(f"an upload named '{folder.name}' exists already ({folder}); choose another name")
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        shutil.copyfile(data_file, work / f"data{data_file.suffix.lower()}")
        counts = {"extracted": 0, "left_out": 0, "bytes": 0}
        if media_zip:
            counts = extract_media(Path(media_zip), work / "media", limits)
        work.rename(folder)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    path = str(folder / f"data{data_file.suffix.lower()}")
    media = str(folder / "media")
    block = {"type": kind, "path": path, **({"image_folder": media} if kind == "llava_json" else
                                           {"media_folder": media})}
    said = (f"stored {len(records):,} {kind} records and {counts['extracted']:,} media files "
            f"({_mb(counts['bytes'])}) in {folder}" + (f"; {counts['left_out']} other entries left out"
                                                      if counts["left_out"] else ""))
    return block, said


def dataset_names(registry: Any = None) -> list[str]:
    """The registered dataset plugins' names."""
    from mmhub.registry import get_registry

    return sorted((registry or get_registry()).datasets)


def dataset_block(name: str, registry: Any = None) -> dict[str, Any]:
    """The ``data:`` block of a registered dataset plugin with its default settings (``{"type": name}``)."""
    from mmhub.registry import get_registry

    (registry or get_registry()).dataset(name)  # an unknown name raises, listing the registered ones
    return {"type": name}


def set_stage_data(spec_text: str, data: dict[str, Any] | None = None, stage: str | None = None,
                   settings: dict[str, Any] | None = None) -> str:
    """The spec YAML with `data` as the ``data:`` block and `settings` (``lr``, ``max_steps``, ``batch_size``,
    ``lora_r``) set on stage `stage` (every stage when None). ``lora_r`` changes the rank of every LoRA the stage
    trains. Comments are not kept (the YAML is re-written)."""
    try:
        spec = yaml.safe_load(spec_text) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"the spec is not YAML: {exc}") from None
    stages = spec.get("stages") if isinstance(spec, dict) else None
    if not stages:
        raise InputError("the spec has no stages: load a recipe or preset first, or add a stages: list")
    names = [s.get("name") for s in stages]
    if stage and stage not in names:
        raise InputError(f"stage {stage!r} is not in the spec (its stages: {', '.join(map(str, names))})")
    settings = {k: v for k, v in (settings or {}).items() if v not in (None, "")}
    for s in stages:
        if stage and s.get("name") != stage:
            continue
        if data is not None:
            s["data"] = dict(data)
        for key in ("lr", "max_steps", "batch_size"):
            if key in settings:
                s[key] = settings[key]
        if "lora_r" in settings:
            rank = int(settings["lora_r"])
            found = _set_lora_rank(s.get("train") or {}, rank)
            if not found:
                raise InputError(f"stage {s.get('name')!r} trains no LoRA adapter, so it has no rank to set; "
                                 f"give a slot `lora: {{r: {rank}}}` under train:")
    return yaml.safe_dump(spec, sort_keys=False)


def _set_lora_rank(node: Any, rank: int) -> bool:
    found = False
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "lora" and isinstance(value, dict):
                value["r"] = rank
                found = True
            else:
                found = _set_lora_rank(value, rank) or found
    return found


def preflight_data(spec_text: str, stage: str | None = None, n: int = 64) -> str:
    """Build the spec's model and run the CLI's pre-flight (`mmhub.data.preflight`, the same as `mmhub train`'s) on
    each stage's data (or `stage`'s): a paragraph per stage with the samples checked and the problems counted, with
    examples; raises InputError (the pre-flight's own message) when more samples are bad than the stage allows."""
    from mmhub import build
    from mmhub.apps.assemble import validate
    from mmhub.data import load_dataset
    from mmhub.data.preflight import preflight
    from mmhub.spec import Spec, parse_text

    ok, message = validate(spec_text)  # every spec problem, as the Start button reports it
    if not ok:
        raise InputError(message.replace("**", ""))
    spec = Spec.model_validate(parse_text(spec_text, "the spec box"))
    model = build(spec)
    parts = []
    for st in spec.stages:
        if (stage and st.name != stage) or st.data is None:
            continue
        report = preflight(model, load_dataset(st.data), n=n, max_bad_fraction=st.max_bad_fraction, seed=spec.seed)
        parts.append(f"stage {st.name}: {report.bad_samples} of {report.checked} samples checked would be skipped"
                     f"\n{report}")
    return "\n\n".join(parts) or "no stage has data to check"


__all__ = ["DataLimits", "read_records", "data_format", "extract_media", "stage_upload", "dataset_names",
           "dataset_block", "set_stage_data", "preflight_data"]
