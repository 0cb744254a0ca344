"""The shared tester classes (`mmhub.testing`), run on every registered component (built-ins and installed
plugins), on the built-in file dataset formats and on every registered evaluation task."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from mmhub.data.captions import CaptionsDataset
from mmhub.data.llava_json import LlavaJsonDataset
from mmhub.data.nlf import NLFDataset
from mmhub.data.preference import PreferenceDataset
from mmhub.data.sharegpt import ShareGPTDataset
from mmhub.registry import get_registry
from mmhub.testing import (
    TESTS_BY_KIND,
    DatasetTests,
    EncoderTests,
    EvalTaskTests,
    ProjectorTests,
)

REG = get_registry()


def _camel(kind: str) -> str:
    return "".join(part.title() for part in kind.split("_"))


# one generated Test<Kind>_<name> class per registered component, e.g. TestEncoder_timm
for _kind, _table in REG.components.items():
    for _name, _info in _table.items():
        _cls_name = f"Test{_camel(_kind)}_{_name}"
        globals()[_cls_name] = type(_cls_name, (TESTS_BY_KIND[_kind],),
                                    {"component": _info.cls, "registry": REG, "__module__": __name__})
for _name, _info in REG.eval_tasks.items():
    _cls_name = f"TestEvalTask_{_name}"
    globals()[_cls_name] = type(_cls_name, (EvalTaskTests,), {"component": _info.cls, "__module__": __name__})

TURNS = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."}]


class TestDataset_llava_json(DatasetTests):
    component = LlavaJsonDataset
    file_name = "data.json"
    records: ClassVar[list[dict[str, Any]]] = [{"id": "a", "image": "a.png", "conversations": TURNS},
               {"id": "b", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}]
    bad_record: ClassVar[dict[str, Any]] = {"id": "bad", "image": "a.png",
                                            "conversations": [{"from": "human", "value": "<image> <image>"},
                                                              {"from": "gpt", "value": "?"}]}


class TestDataset_sharegpt(DatasetTests):
    component = ShareGPTDataset
    records: ClassVar[list[dict[str, Any]]] = [{"id": "a", "messages": [{"role": "user", "content": "<image>Which?"},
                                        {"role": "assistant", "content": "That."}], "images": ["p.png"]},
               {"id": "b",
                "conversations": TURNS[:0] + [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}]
    bad_record: ClassVar[dict[str, Any]] = {"id": "bad", "messages": [{"role": "user", "content": "<image>"},
                                                                      {"role": "assistant", "content": "x"}],
                                            "images": []}


class TestDataset_captions(DatasetTests):
    component = CaptionsDataset
    file_name = "caps.csv"
    records: ClassVar[list[dict[str, Any]]] = [{"image": "x.png", "caption": "a red square"},
                                               {"image": "y.png", "caption": "a blue circle"}]
    bad_record: ClassVar[dict[str, Any]] = {"image": "z.png", "caption": ""}


class TestDataset_preference(DatasetTests):
    component = PreferenceDataset
    records: ClassVar[list[dict[str, Any]]] = [{"prompt": "What shape?", "images": ["q.png"], "chosen": "A square.",
                                                "rejected": "A circle."},
                                               {"prompt": "2+2?", "chosen": "4", "rejected": "5"}]
    bad_record: ClassVar[dict[str, Any]] = {"prompt": "no rejected", "chosen": "x"}


class TestDataset_nlf(DatasetTests):
    component = NLFDataset
    records: ClassVar[list[dict[str, Any]]] = [
        {"id": "a", "prompt": "What shape?", "images": ["s.png"], "response": "A circle.",
         "critique": "Look at the corners.", "refinement": "Count them.", "refined": "A triangle."},
        {"id": "b", "prompt": "2+2?", "rounds": [{"response": "5", "critique": "Add again."}], "refined": "4"}]
    bad_record: ClassVar[dict[str, Any]] = {"id": "bad", "prompt": "no refined reply", "response": "x",
                                            "critique": "y"}


# formats whose records are not a single file of records: tested in tests/test_data.py
COVERED_ELSEWHERE = {"webdataset": "tar shards", "easy_vqa": "its own data folder",
                     "easy_vqa_varied": "easy-VQA's data folder (tests/test_easy_vqa_grammar.py)",
                     "replay": "a saved model and another dataset (tests/test_replay.py)"}


def test_every_dataset_format_has_a_tester_class() -> None:
    tested = {cls.component.name for cls in globals().values()
              if isinstance(cls, type) and issubclass(cls, DatasetTests)
              and cls.component is not None}
    missing = set(REG.datasets) - tested - set(COVERED_ELSEWHERE)
    assert not missing, f"dataset formats without a DatasetTests class here: {sorted(missing)}"


def test_every_component_has_metadata() -> None:
    for kind, table in REG.components.items():
        for name, info in table.items():
            meta = info.metadata()
            assert meta["plugin"] and meta["doc"], f"{kind} {name} lacks plugin or docs line"
            assert meta["out_dim"] and meta["tokens"], f"{kind} {name} does not say how width/tokens are determined"
            example = info.cls.example_settings
            assert isinstance(example, dict), f"{kind} {name}: example_settings is {type(example).__name__}, not a dict"
            info.cls.Config.model_validate(example)  # a tiny instance's settings: valid settings of this component


def test_builtins_cover_the_first_components() -> None:
    assert {"timm", "open_clip"} <= set(REG.names("encoder"))
    assert {"linear", "mlp"} <= set(REG.names("projector"))
    assert "hf_causal_lm" in REG.names("backbone")
    builtin = {i.plugin for i in REG.components["encoder"].values() if i.name in ("timm", "open_clip")}
    assert builtin == {"mmhub.encoders"}


class _Shifted(REG.get("encoder", "timm").cls):
    """Test double: the timm encoder, but its describe() promises one token more than it emits."""

    @classmethod
    def describe(cls, config, ctx):
        facts = super().describe(config, ctx)
        return type(facts)(out_dim=facts.out_dim, tokens_per_item=facts.tokens_per_item + 1)


def test_tester_classes_name_a_missing_or_wrong_component_and_catch_a_lying_describe() -> None:
    class Unset(EncoderTests):
        pass

    with pytest.raises(TypeError, match="Unset sets no `component`: add `component = YourClass`"):
        Unset.case()

    class WrongKind(ProjectorTests):
        component = REG.get("encoder", "timm").cls

    with pytest.raises(TypeError, match="not a subclass of mmhub.interfaces.Projector"):
        WrongKind.case()

    class Lying(EncoderTests):
        component = _Shifted

    with pytest.raises(AssertionError, match=r"described \(2, (\d+), \d+\) but emitted \(2, (?!\1)\d+"):
        Lying().test_describe_matches_forward()
