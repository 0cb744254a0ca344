"""WebDataset tar shards, read as a stream.

``path`` is a shard, a list of shards, a glob (``shards/*.tar``) or a brace range
(``shard-{000..099}.tar``, also ``{a,b}``). Inside a shard, the files of one sample sit next
to each other and share a key: the member path up to the first dot of its file name
(``0001.jpg``, ``0001.json``, ``0001.txt``, ``0001.wav``). Per sample:

* media: ``jpg``/``jpeg``/``png``/``webp``/``bmp`` -> one image, ``wav``/``flac``/``mp3`` -> one audio
  item, passed on as the file's bytes (`mmhub.media.load_image` and the audio reader take bytes;
  only WAV audio decodes in mmhub);
* text: ``json`` with ``messages``/``conversations`` (a full conversation; missing placeholders
  are prepended as LLaVA does), else a caption from ``json``'s ``caption``/``text`` or from ``txt``,
  made into ``user: PROMPT`` / ``assistant: caption`` like the captions format.

The stream holds one sample (plus the shuffle buffer) in memory at a time. The order is fixed
by ``seed`` and the epoch (`set_epoch`): with ``shuffle_buffer`` > 0 the shard order is shuffled
and samples pass through a buffer of that many, each output drawn at random from it; with 0 the
order is the shards' own. Under a torch DataLoader with workers, worker k reads shards k, k+W, ...
``len(ds)`` counts sample keys from the tar headers once (no payload is kept).
"""

from __future__ import annotations

import glob
import json
import random
import re
import tarfile
from pathlib import Path
from typing import Any, Iterator

from mmhub.data.base import DatasetConfig, SampleError, StreamingDataset, convert_turns, prepend_missing_placeholders
from mmhub.data.sample import Sample, placeholder
from mmhub.errors import InputError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
AUDIO_EXTS = ("wav", "flac", "mp3")
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> a-000.tar, a-001.tar, a-002.tar; ``{x,y}`` -> x, y (nested and repeated)."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    body, pre, post = m.group(1), pattern[:m.start()], pattern[m.end():]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") else 0
        choices = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        choices = body.split(",")
    return [p for c in choices for p in expand_braces(pre + c + post)]


class WebDatasetConfig(DatasetConfig):
    path: str | list[str]
    shuffle_buffer: int = 0
    seed: int = 0
    prompt: str = "{placeholder}"


def sample_key(name: str) -> tuple[str, str]:
    """(key, extension) of a member path: ``dir/0001.seg.jpg`` -> (``dir/0001``, ``seg.jpg``)."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


class WebDataset(StreamingDataset):
    """WebDataset tar shards (key.jpg/png, key.json/txt, key.wav), streamed with a seeded shuffle buffer."""

    name = "webdataset"
    Config = WebDatasetConfig
    modalities = ("image", "audio")

    def __init__(self, config: WebDatasetConfig, base_dir: Path | None = None):
        super().__init__(config, base_dir)
        patterns = [config.path] if isinstance(config.path, str) else list(config.path)
        shards: list[str] = []
        for pat in patterns:
            for p in expand_braces(pat):
                full = str(self.resolve(p))
                if glob.has_magic(full):
                    found = sorted(glob.glob(full))
                    if not found:
                        raise InputError(f"webdataset pattern {pat!r} matches no file (looked for {full})")
                    shards += found
                elif Path(full).is_file():
                    shards.append(full)
                else:
                    raise InputError(f"webdataset shard {full} does not exist (from {pat!r})")
        if not shards:
            raise InputError(f"webdataset path {config.path!r} names no shard")
        self.shards = shards
        self._len: int | None = None

    @property
    def source(self) -> str:
        first = self.shards[0] if len(self.shards) == 1 else f"{len(self.shards)} shards ({self.shards[0]}, ...)"
        return f"webdataset {first}"

    def __len__(self) -> int:
        if self._len is None:
            keys = 0
            for shard in self.shards:
                try:
                    with tarfile.open(shard) as tf:
                        keys += len({sample_key(m.name)[0] for m in tf.getmembers() if m.isfile()})
                except (tarfile.TarError, OSError) as exc:
                    raise InputError(f"webdataset shard {shard} cannot be read ({type(exc).__name__}: {exc})") from None
            self._len = keys
        return self._len

    def _rng(self) -> random.Random:
        return random.Random(self.config.seed * 1_000_003 + self.epoch)

    def _my_shards(self) -> list[str]:
        shards = list(self.shards)
        if self.config.shuffle_buffer > 0:
            self._rng().shuffle(shards)
        import torch.utils.data

        info = torch.utils.data.get_worker_info()
        return shards[info.id::info.num_workers] if info is not None else shards

    def _groups(self, shard: str) -> Iterator[tuple[str, dict[str, bytes]] | SampleError]:
        """(key, {ext: bytes}) per sample of one shard, streaming; a broken shard yields one error and ends."""
        key, files = None, {}
        try:
            with tarfile.open(shard, mode="r|*") as tf:
                for member in tf:
                    if not member.isfile():
                        continue
                    k, ext = sample_key(member.name)
                    if k != key and key is not None:
                        yield key, files
                        files = {}
                    key = k
                    fh = tf.extractfile(member)
                    files[ext] = fh.read() if fh is not None else b""
        except (tarfile.TarError, OSError, EOFError) as exc:
            yield SampleError(f"webdataset shard {shard} is unreadable after key {key!r} ({type(exc).__name__}: {exc})",
                              "unreadable_shard", shard)
            return
        if key is not None:
            yield key, files

    def make_sample(self, shard: str, key: str, files: dict[str, bytes]) -> Sample:
        where = f"{shard}:{key}"
        media: dict[str, list[Any]] = {}
        for ext, data in sorted(files.items()):
            last = ext.rsplit(".", 1)[-1]
            if last in IMAGE_EXTS:
                media.setdefault("image", []).append(data)
            elif last in AUDIO_EXTS:
                media.setdefault("audio", []).append(data)
        meta: dict[str, Any] = {"source": where, "key": key}
        record: Any = None
        if "json" in files:
            try:
                record = json.loads(files["json"])
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise SampleError(f"{where}.json is not valid JSON ({exc})", "malformed_record", where) from None
        if isinstance(record, dict) and ("messages" in record or "conversations" in record):
            messages = convert_turns(record.get("messages", record.get("conversations")), where, where)
            prepend_missing_placeholders(messages, media, where, where)
        else:
            caption = None
            if isinstance(record, dict):
                caption = record.get("caption", record.get("text"))
                meta.update({k: v for k, v in record.items()
                             if isinstance(v, (str, int, float, bool)) and k != "caption"})
            if caption is None and "txt" in files:
                caption = files["txt"].decode("utf-8", errors="replace")
            if not isinstance(caption, str) or not caption.strip():
                raise SampleError(f"{where} has neither a caption (.txt, or caption in .json) nor a conversation",
                                  "malformed_record", where)
            if not media:
                raise SampleError(f"{where} has a caption but no media file ({', '.join(IMAGE_EXTS + AUDIO_EXTS)})",
                                  "malformed_record", where)
            marks = "".join(placeholder(m) * len(items) for m, items in media.items())
            prompt = self.config.prompt
            user = prompt.replace("{placeholder}", marks) if "{placeholder}" in prompt else f"{marks}\n{prompt}"
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": caption.strip()}]
        return Sample(id=key, messages=messages, media=media, meta=meta)

    def _samples(self) -> Iterator[Sample | SampleError]:
        for shard in self._my_shards():
            for group in self._groups(shard):
                if isinstance(group, SampleError):
                    yield group
                    continue
                try:
                    yield self.make_sample(shard, *group)
                except SampleError as exc:
                    yield exc

    def iter_items(self) -> Iterator[Sample | SampleError]:
        size = self.config.shuffle_buffer
        if size <= 0:
            yield from self._samples()
            return
        rng = self._rng()
        buf: list[Sample | SampleError] = []
        for item in self._samples():
            if len(buf) < size:
                buf.append(item)
                continue
            j = rng.randrange(size)
            out, buf[j] = buf[j], item
            yield out
        rng.shuffle(buf)
        yield from buf
