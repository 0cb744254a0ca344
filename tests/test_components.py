"""The shared component checks, run on every registered component (built-ins and installed plugins)."""

from __future__ import annotations

from contextlib import nullcontext

import pytest

from mmhub.registry import get_registry
from mmhub.testing import check_component, torch_threads

REG = get_registry()
CASES = [(kind, name) for kind in ("encoder", "projector", "backbone", "injector", "generator") for name in REG.names(kind)]


@pytest.mark.parametrize("kind,name", CASES, ids=[f"{k}:{n}" for k, n in CASES])
def test_component_contract(kind: str, name: str) -> None:
    with torch_threads(1) if kind == "generator" else nullcontext():  # many tiny ops: one thread is faster
        check_component(kind, name)


def test_every_component_has_metadata() -> None:
    for kind, table in REG.components.items():
        for name, info in table.items():
            meta = info.metadata()
            assert meta["plugin"] and meta["doc"], f"{kind} {name} lacks plugin or docs line"
            assert meta["out_dim"] and meta["tokens"], f"{kind} {name} does not say how width/tokens are determined"
            assert info.cls.example_settings is not None


def test_builtins_cover_the_first_components() -> None:
    assert {"timm", "open_clip"} <= set(REG.names("encoder"))
    assert {"linear", "mlp"} <= set(REG.names("projector"))
    assert "hf_causal_lm" in REG.names("backbone")
    assert {i.plugin for i in REG.components["encoder"].values() if i.name in ("timm", "open_clip")} == {"mmhub.encoders"}
