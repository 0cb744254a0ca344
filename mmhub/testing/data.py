"""`DatasetTests` and `EvalTaskTests`: tester classes for dataset formats and evaluation tasks.

A dataset test class gives ``component`` (the `mmhub.data.Dataset` subclass), ``records`` (good records,
written to ``file_name``: ``.json`` as a list, ``.jsonl`` one per line, ``.csv`` with a header),
``bad_record`` (one record the format must report) and optionally ``settings`` (besides ``path``).
"""

from __future__ import annotations

import csv
import inspect
import json
from pathlib import Path
from typing import Any, ClassVar

import pytest

from mmhub.data.base import Dataset, SampleError
from mmhub.data.sample import Sample
from mmhub.evaluation.base import EvalTask
from mmhub.testing.base import (
    check_docstrings,
    check_rejects_unknown_setting,
    component_under_test,
)

RUN_KEYWORDS = ("split", "limit", "blind", "batch_size", "max_new_tokens", "on_result")


def write_records(path: Path, records: list[Any]) -> None:
    """`records` to `path`, in the layout its suffix says (.json, .jsonl or .csv)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps(records))
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif path.suffix == ".csv":
        keys = list(dict.fromkeys(k for r in records for k in r))
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, keys)
            writer.writeheader()
            writer.writerows(records)
    else:
        raise AssertionError(f"no record writer for {path.name}; use .json, .jsonl or .csv, or override write()")


class DatasetTests:
    """Shared checks for a dataset format: records become `Sample`s with unique ids, a bad record is reported."""

    component: ClassVar[type | None] = None
    records: ClassVar[list[Any]] = []
    bad_record: ClassVar[Any] = None
    file_name: ClassVar[str] = "data.jsonl"
    settings: ClassVar[dict[str, Any]] = {}

    def write(self, folder: Path, records: list[Any]) -> dict[str, Any]:
        """Write `records` into `folder`; the settings that read them (override for other layouts)."""
        write_records(folder / self.file_name, records)
        return {"path": str(folder / self.file_name), **self.settings}

    def open(self, folder: Path, records: list[Any]) -> Dataset:
        cls = component_under_test(type(self), Dataset)
        return cls(cls.Config.model_validate(self.write(folder, records)), base_dir=folder)

    @staticmethod
    def read_all(ds: Dataset) -> list[Sample]:
        return list(iter(ds)) if ds.streaming else [ds[i] for i in range(len(ds))]

    def test_has_docstrings(self) -> None:
        check_docstrings(component_under_test(type(self), Dataset))

    def test_settings_schema(self, tmp_path: Path) -> None:
        cls = component_under_test(type(self), Dataset)
        settings = self.write(tmp_path, self.records)
        cls.Config.model_validate(settings)
        check_rejects_unknown_setting(cls.Config, settings, cls.__name__)

    def test_records_become_samples(self, tmp_path: Path) -> None:
        assert self.records, f"{type(self).__name__}: set `records` (a few good records of the format)"
        samples = self.read_all(self.open(tmp_path, self.records))
        name = self.component.name
        assert len(samples) == len(self.records), f"{name}: {len(self.records)} records gave {len(samples)} samples"
        for s in samples:
            assert isinstance(s, Sample), f"{name}: a record gave {type(s).__name__}, not a mmhub Sample"
            assert not s.problems(), f"{name}: sample {s.id}: {s.problems()}"
            assert set(s.media) <= set(self.component.modalities), \
                f"{name}: sample {s.id} has media {sorted(s.media)}; the format declares {self.component.modalities}"
        ids = [s.id for s in samples]
        assert len(set(ids)) == len(ids), f"{name}: sample ids repeat: {ids}"

    def test_bad_record_is_reported(self, tmp_path: Path) -> None:
        assert self.bad_record is not None, f"{type(self).__name__}: set `bad_record` (one the format must reject)"
        ds = self.open(tmp_path, [*self.records, self.bad_record])
        with pytest.raises(SampleError) as exc:
            self.read_all(ds)
        assert self.file_name in str(exc.value), f"{self.component.name}: the error does not name the file: {exc.value}"


class EvalTaskTests:
    """Shared checks for an evaluation task: its settings validate and ``run`` takes mmhub's keywords."""

    component: ClassVar[type | None] = None
    settings: ClassVar[dict[str, Any]] = {}

    def test_has_docstrings(self) -> None:
        check_docstrings(component_under_test(type(self), EvalTask))

    def test_settings_schema(self) -> None:
        cls = component_under_test(type(self), EvalTask)
        config = cls.Config.model_validate(self.settings)
        check_rejects_unknown_setting(cls.Config, self.settings, cls.__name__)
        assert cls(config).config == config

    def test_run_signature(self) -> None:
        cls = component_under_test(type(self), EvalTask)
        params = inspect.signature(cls.run).parameters
        assert list(params)[:2] == ["self", "model"], f"{cls.__name__}.run must take the model first"
        for key in RUN_KEYWORDS:
            p = params.get(key)
            assert p is not None and p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not p.empty, \
                f"{cls.__name__}.run needs the keyword-only argument {key} with a default (see mmhub.evaluation.base)"
