"""Datasets: the `Dataset` interface every format implements, mixtures, and `load_dataset`.

A dataset format is a `Dataset` subclass registered through the ``register_datasets`` hook
(the built-in formats live in `mmhub.data.plugin`). It has a ``name`` (what ``type:`` refers
to), a pydantic ``Config`` of its settings (unknown settings are errors), the ``modalities``
it can produce and either random access (``__len__`` + ``__getitem__``, deterministic) or,
for shards that are read as a stream, ``streaming = True`` and ``__iter__``
(`StreamingDataset`).

`load_dataset` accepts:

* a dict ``{type: NAME, ...settings}``; without ``type`` the format is sniffed from ``path``;
* a path string (sniffing, see `sniff_format`): ``.json`` -> ``sharegpt`` when the head of the
  file has ``"messages"``/``"images"``/``"audios"``/``"videos"`` keys, else ``llava_json``;
  ``.jsonl`` -> ``preference`` when the first record has ``chosen`` and ``rejected``, ``nlf``
  when it has ``refined`` and ``critique`` (or ``rounds``), ``sharegpt`` when it has
  ``messages``/``conversations``, else ``captions``; ``.csv`` -> ``captions``; ``.tar`` files,
  globs (``shards/*.tar``) and brace ranges (``shard-{000..009}.tar``) -> ``webdataset``;
* a list of those: a `MixtureDataset`. Each element may carry ``weight`` (default 1): the
  element contributes ``round(weight * len)`` samples per pass, whole repeats first and a
  fixed (seeded) subset for the fractional part, so 2 means every sample twice and 0.5 a
  fixed half. Mixtures are map-style only: a streaming element in a list is an error.

Relative paths in settings are taken from `base_dir` (default: the current directory).
An empty dataset is an `InputError` naming its source.
"""

from __future__ import annotations

import bisect
import csv
import json
import random
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence

import torch.utils.data
from pydantic import BaseModel, ConfigDict, ValidationError

from mmhub.data.sample import Sample, placeholder
from mmhub.errors import InputError, Problem, SpecError


class SampleError(InputError):
    """One sample cannot be used: ``reason`` (missing_file, unreadable_media, malformed_record, ...) and ``file``."""

    def __init__(self, message: str, reason: str = "malformed_record", file: str | None = None,
                 sample_id: str | None = None):
        super().__init__(message)
        self.reason, self.file, self.sample_id = reason, file, sample_id


class DatasetConfig(BaseModel):
    """Settings of a dataset format (subclass it; unknown settings are errors)."""

    model_config = ConfigDict(extra="forbid")


class Dataset(torch.utils.data.Dataset, ABC):
    """A map-style dataset of `Sample`s: ``len(ds)``, ``ds[i]`` (random access, deterministic), ``iter(ds)``."""

    name: ClassVar[str]
    Config: ClassVar[type[DatasetConfig]] = DatasetConfig
    modalities: ClassVar[tuple[str, ...]] = ()
    streaming: ClassVar[bool] = False

    def __init__(self, config: DatasetConfig | None = None, base_dir: Path | None = None):
        self.config = config if config is not None else self.Config()
        self.base_dir = Path(base_dir).expanduser() if base_dir is not None else Path.cwd()

    def resolve(self, path: str | Path) -> Path:
        """A setting's path: ``mmhub:REL`` inside the installed mmhub package (data shipped with recipes),
        ``~`` expanded, other relative paths taken from ``base_dir``."""
        if str(path).startswith("mmhub:"):
            return Path(__file__).resolve().parents[1] / str(path)[len("mmhub:"):]
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.base_dir / p

    @property
    def source(self) -> str:
        """Where the samples come from, for messages (the format and its file)."""
        path = getattr(self.config, "path", None)
        return f"{self.name} dataset {path}" if path else f"{self.name} dataset"

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __getitem__(self, index: int) -> Sample: ...

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip().splitlines()
        return doc[0] if doc else cls.__name__

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.source}>"


class StreamingDataset(Dataset, torch.utils.data.IterableDataset):
    """A dataset read as a stream (shards): ``iter(ds)`` in a deterministic order per epoch, no random access.

    Subclasses implement `iter_items`, which yields `Sample`s and, in place of a sample that cannot be
    read, the `SampleError` saying why (so a robust reader can skip it and go on); ``iter(ds)`` raises
    on the first such error. ``set_epoch(e)`` selects the epoch whose order the next pass follows.
    """

    streaming: ClassVar[bool] = True
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @abstractmethod
    def iter_items(self) -> Iterator[Sample | SampleError]: ...

    def __iter__(self) -> Iterator[Sample]:
        n = 0
        for item in self.iter_items():
            if isinstance(item, SampleError):
                raise item
            n += 1
            yield item
        if n == 0:
            raise InputError(f"{self.source} has no samples")

    def __getitem__(self, index: int) -> Sample:
        raise TypeError(f"{self.source} is streaming: iterate over it (for s in ds) instead of indexing")


class InMemoryDataset(Dataset):
    """Samples already in memory (tests, small hand-made sets)."""

    name = "in_memory"

    def __init__(self, samples: Sequence[Sample], source: str = "in-memory samples"):
        super().__init__()
        self.samples, self._source = list(samples), source

    @property
    def source(self) -> str:
        return self._source

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]


class MixtureDataset(Dataset):
    """Several map-style datasets as one; each contributes ``round(weight * len)`` samples (see the module doc)."""

    name = "mixture"

    def __init__(self, datasets: Sequence[Dataset], weights: Sequence[float] | None = None, seed: int = 0):
        super().__init__()
        weights = list(weights) if weights is not None else [1.0] * len(datasets)
        if len(weights) != len(datasets) or not datasets:
            raise InputError(f"a mixture needs one weight per dataset and at least one dataset "
                             f"(got {len(datasets)} datasets, {len(weights)} weights)")
        for ds in datasets:
            if ds.streaming:
                raise InputError(f"{ds.source} is streaming; mixtures take map-style datasets only "
                                 f"(train on the shards alone, or list their samples in a JSON/JSONL file)")
        self.datasets, self.weights, self.seed = list(datasets), weights, seed
        self._index: list[list[int]] = []  # per dataset: which of its samples, in order
        for k, (ds, w) in enumerate(zip(self.datasets, weights, strict=True)):
            if w < 0:
                raise InputError(f"mixture weight {w} of {ds.source} is negative; use 0 to leave it out")
            n = len(ds)
            whole, frac = divmod(w, 1.0)
            picks = list(range(n)) * int(whole)
            extra = round(frac * n)
            if extra:
                picks += sorted(random.Random(seed * 1_000_003 + k).sample(range(n), extra))
            self._index.append(picks)
        self._ends = []
        total = 0
        for picks in self._index:
            total += len(picks)
            self._ends.append(total)

    @property
    def source(self) -> str:
        return "mixture of " + ", ".join(f"{ds.source} (weight {w:g})"
                                         for ds, w in zip(self.datasets, self.weights, strict=True))

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getitem__(self, index: int) -> Sample:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a mixture of {len(self)} samples")
        k = bisect.bisect_right(self._ends, index)
        start = self._ends[k - 1] if k else 0
        return self.datasets[k][self._index[k][index - start]]


# -- reading records ------------------------------------------------------------------------
def read_json_list(path: Path, what: str) -> list[Any]:
    """A JSON file holding a list of records (an InputError naming the file otherwise)."""
    if not path.is_file():
        raise InputError(f"{what} file {path} does not exist")
    try:
        with open(path, "rb") as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{what} file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, list):
        raise InputError(f"{what} file {path} holds a JSON {type(data).__name__}; expected a list of records")
    return data


def read_jsonl_lines(path: Path, what: str) -> list[tuple[int, str]]:
    """(line number, text) of every non-blank line; each is parsed when its sample is read."""
    if not path.is_file():
        raise InputError(f"{what} file {path} does not exist")
    with open(path, encoding="utf-8") as fh:
        return [(n, line) for n, line in enumerate(fh, 1) if line.strip()]


def parse_jsonl_line(path: Path, lineno: int, line: str) -> dict[str, Any]:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        raise SampleError(f"{path}:{lineno} is not valid JSON ({exc})", "malformed_record",
                          f"{path}:{lineno}") from None
    if not isinstance(rec, dict):
        raise SampleError(f"{path}:{lineno} is a JSON {type(rec).__name__}, not an object", "malformed_record",
                          f"{path}:{lineno}")
    return rec


def read_csv_rows(path: Path, what: str) -> list[dict[str, str]]:
    if not path.is_file():
        raise InputError(f"{what} file {path} does not exist")
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
            "bot": "assistant", "system": "system"}


def convert_turns(turns: Any, where: str, file: str | None = None) -> list[dict[str, str]]:
    """``[{from, value}]`` (LLaVA/ShareGPT) or ``[{role, content}]`` (OpenAI style) -> mmhub messages."""
    if not isinstance(turns, list) or not turns:
        raise SampleError(f"{where} has no conversation turns", "malformed_record", file)
    out = []
    for k, t in enumerate(turns):
        if not isinstance(t, dict):
            raise SampleError(f"{where}: turn {k} is a {type(t).__name__}, not an object", "malformed_record", file)
        role = t.get("role", t.get("from"))
        content = t.get("content", t.get("value"))
        if role not in ROLE_MAP:
            raise SampleError(f"{where}: turn {k} has role {role!r}; mmhub takes {', '.join(sorted(ROLE_MAP))}",
                              "malformed_record", file)
        if not isinstance(content, str):
            raise SampleError(f"{where}: turn {k} has no text ({type(content).__name__})", "malformed_record", file)
        out.append({"role": ROLE_MAP[role], "content": content})
    return out


def media_path(folder: Path, item: Any) -> Any:
    """A media item from a record: relative file names are joined to `folder`; other items pass through."""
    if isinstance(item, str):
        p = Path(item).expanduser()
        return str(p if p.is_absolute() else folder / p)
    return item


def prepend_missing_placeholders(messages: list[dict[str, str]], media: dict[str, list[Any]], where: str,
                                 file: str | None = None) -> None:
    """LLaVA's rule: a modality with items but no placeholder at all gets one ``<m>\\n`` per item prepended
    to the first user turn; any other mismatch of counts is a malformed record."""
    text = "".join(m["content"] for m in messages)
    for mod, items in media.items():
        mark, n = placeholder(mod), text.count(placeholder(mod))
        if n == len(items):
            continue
        if n == 0:
            first = next((m for m in messages if m["role"] == "user"), None)
            if first is None:
                raise SampleError(f"{where} has {len(items)} {mod} item(s) but no user turn to put {mark} in",
                                  "malformed_record", file)
            first["content"] = (mark + "\n") * len(items) + first["content"]
        else:
            raise SampleError(f"{where} has {n} {mark} placeholder(s) but {len(items)} {mod} item(s)",
                              "malformed_record", file)


# -- load_dataset ---------------------------------------------------------------------------
_GLOB = re.compile(r"[*?\[]|\{[^}]*(\.\.|,)[^}]*\}")


def sniff_format(path: str | Sequence[str], base_dir: Path | None = None) -> str:
    """The format name of a data file from its extension and content (see the module docstring)."""
    if not isinstance(path, str):
        paths = list(path)
        if paths and all(str(p).endswith(".tar") for p in paths):
            return "webdataset"
        raise SpecError([Problem("data.path", f"a list of paths must be .tar shards, got {paths!r}",
                                 "give one file, or list several datasets as a mixture")])
    if path.endswith(".tar") or _GLOB.search(path):
        return "webdataset"
    p = Path(path).expanduser()
    p = p if p.is_absolute() or base_dir is None else Path(base_dir) / p
    suffix = p.suffix.lower()
    if suffix not in (".json", ".jsonl", ".csv"):
        raise SpecError([Problem("data.path", f"cannot tell the format of {path!r} from its extension",
                                 "use .json (LLaVA/ShareGPT), .jsonl/.csv (captions, preference), .tar shards, "
                                 "or give type: explicitly")])
    if not p.is_file():
        raise InputError(f"data file {p} does not exist")
    if suffix == ".csv":
        return "captions"
    with open(p, encoding="utf-8", errors="replace") as fh:
        if suffix == ".json":
            head = fh.read(65536)
            return "sharegpt" if re.search(r'"(messages|images|audios|videos)"\s*:', head) else "llava_json"
        first = next((line for line in fh if line.strip()), "")
    try:
        rec = json.loads(first) if first else {}
    except json.JSONDecodeError:
        raise InputError(f"{p}: the first line is not valid JSON, so the format cannot be told") from None
    if isinstance(rec, dict) and "chosen" in rec and "rejected" in rec:
        return "preference"
    if isinstance(rec, dict) and "refined" in rec and ("critique" in rec or "rounds" in rec):
        return "nlf"
    if isinstance(rec, dict) and ("messages" in rec or "conversations" in rec):
        return "sharegpt"
    return "captions"


def load_dataset(spec: dict[str, Any] | str | Path | Sequence[Any], base_dir: str | Path | None = None,
                 registry: Any = None) -> Dataset:
    """A dataset from a spec: ``{type: NAME, ...settings}``, a path (format sniffed) or a list of them (a mixture)."""
    base = Path(base_dir).expanduser() if base_dir is not None else None
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise InputError("the data list is empty; give at least one dataset")
        parts, weights = [], []
        for element in spec:
            element = dict(element) if isinstance(element, dict) else {"path": str(element)}
            weights.append(float(element.pop("weight", 1.0)))
            parts.append(load_dataset(element, base, registry))
        mix = MixtureDataset(parts, weights)
        if len(mix) == 0:
            raise InputError(f"the {mix.source} has no samples (every weight is 0?)")
        return mix
    if isinstance(spec, (str, Path)):
        spec = {"path": str(spec)}
    if not isinstance(spec, dict):
        raise SpecError([Problem("data", f"a dataset is a dict, a path or a list; got a {type(spec).__name__}",
                                 "write {type: NAME, ...settings} or a file path")])
    settings = dict(spec)
    if "weight" in settings:
        raise SpecError([Problem("data.weight", "weight only applies to the elements of a mixture (a list)",
                                 "put the dataset in a list, or remove weight")])
    kind = settings.pop("type", None)
    if kind is None:
        if "path" not in settings:
            raise SpecError([Problem("data.type", "is required when no path is given",
                                     "add type: NAME (`mmhub plugins`)")])
        kind = sniff_format(settings["path"], base)
    if registry is None:
        from mmhub.registry import get_registry

        registry = get_registry()
    info = registry.dataset(str(kind))
    cls = info.cls
    try:
        config = cls.Config.model_validate(settings)
    except ValidationError as exc:
        from mmhub.spec import problems_from_validation

        raise SpecError(problems_from_validation(exc, prefix="data", fields=cls.Config.model_fields),
                        f"{info.name} dataset settings") from None
    ds = cls(config, base)
    if not ds.streaming and len(ds) == 0:  # a stream says so when a pass yields nothing (no up-front scan)
        raise InputError(f"{ds.source} has no samples; check the file (and its settings: {settings})")
    return ds


__all__ = ["Sample", "SampleError", "Dataset", "DatasetConfig", "StreamingDataset", "InMemoryDataset",
           "MixtureDataset", "load_dataset", "sniff_format"]
