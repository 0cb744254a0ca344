"""Reading data that may hold bad samples: skip them, count them per reason, stop past a cap.

`robust(dataset, max_bad_fraction=0.01, transform=load_media)` wraps a dataset so that a
sample whose record is malformed or whose media is missing or undecodable is skipped and
counted instead of ending the run. Reasons: ``missing_file``, ``unreadable_media``,
``malformed_record``, ``unreadable_shard`` (a broken tar) and ``failed`` (any other
`InputError`/`OSError`/`ValueError`/`KeyError`/`IndexError` raised by `transform`, e.g. the
processor refusing a sample).

The cap: a map-style dataset of N samples may lose at most ``max_bad_fraction * N``; the
sample that goes past it raises `InputError` with the counts per reason and the first
examples (file and reason). A stream (no N up front) may lose ``max_bad_fraction * max(seen,
1000)`` while it runs, and at the end of a pass ``max_bad_fraction`` of what it saw.

Map-style: ``ds[i]`` returns ``transform(sample i)``, or, when sample i is bad, the next good
one after it (wrapping around), so a sampler's indices stay valid; ``iter(ds)`` yields the
good samples once each. A bad index is remembered and not read again. Counts live in the
wrapper object: under a DataLoader with workers each worker counts its own share.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch.utils.data

from mmhub.data.base import Dataset, SampleError
from mmhub.data.sample import Sample
from mmhub.errors import InputError

CAUGHT = (InputError, OSError, ValueError, KeyError, IndexError)
STREAM_WINDOW = 1000


def _missing(path: Any, what: str) -> None:
    if isinstance(path, (str, Path)) and not Path(path).expanduser().is_file():
        raise SampleError(f"{what} file {path} does not exist", "missing_file", str(path))


def _name(item: Any, sample: Sample) -> str:
    return str(item) if isinstance(item, (str, Path)) else str(sample.meta.get("source", sample.id))


def load_media(sample: Sample) -> Sample:
    """A copy of `sample` whose media are read and checked: images decoded to RGB PIL images, WAV audio read
    into bytes and parsed, point clouds into arrays, videos/other files checked to exist. Raises `SampleError`
    (``missing_file`` / ``unreadable_media``) naming the file."""
    from mmhub.media import load_image

    media: dict[str, list[Any]] = {}
    for mod, items in sample.media.items():
        out = []
        for item in items:
            _missing(item, mod)
            try:
                if mod == "image":
                    out.append(load_image(item))
                elif mod == "audio" and isinstance(item, (str, Path, bytes, bytearray)):
                    from mmhub.encoders.audio_io import read_wav

                    data = Path(item).expanduser().read_bytes() if isinstance(item, (str, Path)) else bytes(item)
                    read_wav(data, _name(item, sample))
                    out.append(data)
                elif mod == "points" and isinstance(item, (str, Path)):
                    from mmhub.encoders.point_encoder import read_points

                    out.append(read_points(item))
                else:
                    if isinstance(item, (list, tuple)) and mod == "video":
                        for frame in item:
                            _missing(frame, "video frame")
                    out.append(item)
            except SampleError:
                raise
            except (InputError, OSError, ValueError) as exc:
                name = _name(item, sample)
                raise SampleError(f"sample {sample.id}: {mod} {name} cannot be read: {exc}", "unreadable_media",
                                  name, sample.id) from None
        media[mod] = out
    return replace(sample, media=media)


def classify(exc: BaseException) -> tuple[str, str | None]:
    """(reason, file) of an error raised while reading a sample."""
    if isinstance(exc, SampleError):
        return exc.reason, exc.file
    if isinstance(exc, FileNotFoundError):
        return "missing_file", exc.filename
    if isinstance(exc, (KeyError, IndexError)):
        return "malformed_record", None
    return "failed", None


@dataclass
class SkipLog:
    """Skipped samples per reason, the first examples, and the cap check."""

    max_bad_fraction: float
    source: str
    total: int | None = None  # known size (map-style); None for streams
    keep: int = 5
    counts: Counter = field(default_factory=Counter)
    examples: list[dict[str, Any]] = field(default_factory=list)
    seen: int = 0

    @property
    def bad(self) -> int:
        return sum(self.counts.values())

    def allowed(self, final: bool = False) -> float:
        if self.total is not None:
            return self.max_bad_fraction * self.total
        return self.max_bad_fraction * (self.seen if final else max(self.seen, STREAM_WINDOW))

    def add(self, index: Any, exc: BaseException, sample_id: str | None = None) -> dict[str, Any]:
        reason, file = classify(exc)
        self.counts[reason] += 1
        record = {"index": index, "id": sample_id or getattr(exc, "sample_id", None), "reason": reason, "file": file,
                  "message": str(exc)}
        if len(self.examples) < self.keep:
            self.examples.append(record)
        self.check()
        return record

    def check(self, final: bool = False) -> None:
        if self.bad > self.allowed(final):
            of = f"{self.total}" if self.total is not None else f"{self.seen} read so far"
            counts = ", ".join(f"{k}: {v}" for k, v in sorted(self.counts.items()))
            shown = "; ".join(f"sample {e['index']}" + (f" ({e['file']})" if e["file"] else "") + f": {e['reason']}: "
                              f"{e['message']}" for e in self.examples[:3])
            err = InputError(f"{self.bad} of {of} samples of {self.source} could not be used ({counts}), more than "
                             f"max_bad_fraction {self.max_bad_fraction}. First examples: {shown}. Fix or remove those "
                             f"samples, or raise max_bad_fraction.")
            err.skips = self.report()  # type: ignore[attr-defined]
            raise err

    def report(self) -> dict[str, Any]:
        return {"source": self.source, "seen": self.seen, "skipped": self.bad, "by_reason": dict(self.counts),
                "examples": list(self.examples), "max_bad_fraction": self.max_bad_fraction}


class RobustDataset:
    """A map-style dataset whose bad samples are skipped and counted (see the module docstring)."""

    def __init__(self, dataset: Dataset, max_bad_fraction: float = 0.01,
                 transform: Callable[[Sample], Any] | None = load_media):
        if dataset.streaming:
            raise TypeError("use RobustStream (or robust()) for a streaming dataset")
        self.dataset, self.transform = dataset, transform or (lambda s: s)
        self.log = SkipLog(max_bad_fraction, dataset.source, total=len(dataset))
        self.bad: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def _try(self, j: int) -> tuple[bool, Any]:
        if j in self.bad:
            return False, None
        self.log.seen += 1
        try:
            return True, self.transform(self.dataset[j])
        except CAUGHT as exc:
            self.bad[j] = self.log.add(j, exc)
            return False, None

    def __getitem__(self, index: int) -> Any:
        n = len(self.dataset)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        for step in range(n):
            ok, value = self._try((index + step) % n)
            if ok:
                return value
        raise InputError(f"no sample of {self.dataset.source} could be used: {self.log.report()}")

    def __iter__(self) -> Iterator[Any]:
        for j in range(len(self.dataset)):
            ok, value = self._try(j)
            if ok:
                yield value

    @property
    def skipped(self) -> dict[str, int]:
        return dict(self.log.counts)

    def report(self) -> dict[str, Any]:
        return self.log.report()


class RobustStream(torch.utils.data.IterableDataset):
    """A streaming dataset whose bad samples are skipped and counted (see the module docstring)."""

    streaming = True

    def __init__(self, dataset: Any, max_bad_fraction: float = 0.01,
                 transform: Callable[[Sample], Any] | None = load_media):
        self.dataset, self.transform = dataset, transform or (lambda s: s)
        self.log = SkipLog(max_bad_fraction, dataset.source)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        good = 0
        for k, item in enumerate(self.dataset.iter_items()):
            self.log.seen += 1
            if isinstance(item, SampleError):
                self.log.add(k, item)
                continue
            try:
                value = self.transform(item)
            except CAUGHT as exc:
                self.log.add(k, exc, item.id)
                continue
            good += 1
            yield value
        if good == 0:
            raise InputError(f"{self.dataset.source} gave no usable sample ({self.log.report()})")
        self.log.check(final=True)

    @property
    def skipped(self) -> dict[str, int]:
        return dict(self.log.counts)

    def report(self) -> dict[str, Any]:
        return self.log.report()


def robust(dataset: Any, max_bad_fraction: float = 0.01,
           transform: Callable[[Sample], Any] | None = load_media) -> RobustDataset | RobustStream:
    """Wrap `dataset` so bad samples are skipped and counted, with the ``max_bad_fraction`` cap."""
    cls = RobustStream if getattr(dataset, "streaming", False) else RobustDataset
    return cls(dataset, max_bad_fraction=max_bad_fraction, transform=transform)
