"""Plugin system: discovery, failures, misspelt hooks, allow-list, duplicates; meta-tests of every hook."""

from __future__ import annotations

import inspect
import re
import sys
import types
from pathlib import Path

import pytest

from mmhub import hookimpl, hookspecs
from mmhub.errors import DuplicateComponentError, UnknownComponentError
from mmhub.plugins import hook_names
from mmhub.projectors.linear import LinearProjector
from mmhub.registry import build_registry

ROOT = Path(__file__).resolve().parents[1]


class RenamedLinear(LinearProjector):
    """A linear projector under another name (a throwaway plugin component)."""

    name = "renamed_linear"


class Good:
    @hookimpl
    def register_projectors(self, register):
        register(RenamedLinear)


def test_throwaway_plugin_registers_with_its_name() -> None:
    reg = build_registry(extra=[("good", Good())])
    info = reg.get("projector", "renamed_linear")
    assert info.plugin == "good" and info.cls is RenamedLinear


def test_misspelt_hook_is_reported_with_a_suggestion() -> None:
    class Typo:
        @hookimpl
        def register_projector(self, register):  # missing "s"
            register(RenamedLinear)

    reg = build_registry(extra=[("typo", Typo())])
    failed = {f.name: f.error for f in reg.failed}
    assert "register_projector" in failed["typo"] and "did you mean 'register_projectors'" in failed["typo"]
    with pytest.raises(UnknownComponentError):
        reg.get("projector", "renamed_linear")
    assert "linear" in reg.names("projector")  # the hub is still up


def test_plugin_whose_hook_raises_is_reported_not_fatal() -> None:
    class Broken:
        @hookimpl
        def register_encoders(self, register):
            raise RuntimeError("boom")

    reg = build_registry(extra=[("broken", Broken())])
    assert any(f.name == "broken" and "RuntimeError: boom" in f.error for f in reg.failed)
    assert "timm" in reg.names("encoder")


def test_plugin_that_fails_to_import_is_reported(monkeypatch) -> None:
    import importlib.metadata as md

    class FakeDist:
        name, version = "broken-dist", "9.9"

    class FakeEP:
        name, group, dist = "broken", "mmhub", FakeDist()

        def load(self):
            raise ImportError("No module named 'does_not_exist'")

    real = md.entry_points
    monkeypatch.setattr(md, "entry_points", lambda group: list(real(group=group)) + [FakeEP()])
    reg = build_registry()
    failed = {f.name: f for f in reg.failed}
    assert failed["broken"].dist == "broken-dist" and "does_not_exist" in failed["broken"].error
    assert "mlp" in reg.names("projector")


def test_allow_list_skips_unlisted_third_party_plugins(monkeypatch) -> None:
    import importlib.metadata as md

    class FakeDist:
        name, version = "other-dist", "1"

    loaded = []

    class FakeEP:
        name, group, dist = "other", "mmhub", FakeDist()

        def load(self):
            loaded.append(1)
            return types.ModuleType("other")

    real = md.entry_points
    monkeypatch.setattr(md, "entry_points", lambda group: list(real(group=group)) + [FakeEP()])
    monkeypatch.setenv("MMHUB_PLUGINS", "")
    reg = build_registry()
    assert "other" in reg.plugins.disabled and not loaded
    assert "timm" in reg.names("encoder")  # built-ins always load
    monkeypatch.setenv("MMHUB_PLUGINS", "other")
    reg = build_registry()
    assert loaded and any(p.name == "other" for p in reg.plugins.loaded)


def test_duplicate_names_raise_unless_override() -> None:
    class Dup:
        @hookimpl
        def register_projectors(self, register):
            register(RenamedLinear)

    with pytest.raises(DuplicateComponentError, match="registered twice.*override=True"):
        build_registry(extra=[("a", Good()), ("b", Dup())])

    class Override:
        @hookimpl
        def register_projectors(self, register):
            register(RenamedLinear, override=True)

    reg = build_registry(extra=[("a", Good()), ("b", Override())])
    assert reg.get("projector", "renamed_linear").plugin == "b"


def test_unknown_name_lists_close_matches_and_registered() -> None:
    reg = build_registry()
    with pytest.raises(UnknownComponentError) as exc:
        reg.get("projector", "mpl")
    msg = str(exc.value)
    registered = msg.split("Registered projectors: ")[1]
    assert "did you mean 'mlp'" in msg.lower() and "linear, mlp" in registered
    assert isinstance(exc.value, KeyError)


def test_registering_a_non_component_or_wrong_kind_is_an_error() -> None:
    class WrongKind:
        @hookimpl
        def register_encoders(self, register):
            register(RenamedLinear)

    reg = build_registry(extra=[("wrong", WrongKind())])
    assert any("through the encoder hook, but it is a projector" in f.error for f in reg.failed)


def test_output_side_hooks_register_and_are_listed() -> None:
    from torch import nn

    from mmhub.interfaces import Generator, OutputProjector

    class TinyOut(OutputProjector):
        """A linear output projector (test double)."""

        name = "test_out"

        def __init__(self, config, ctx):
            super().__init__(config, ctx)
            self.proj = nn.Linear(4, 4)

    class TinyGen(Generator):
        """Returns its conditioning as an 'image' (test double)."""

        name = "test_gen"

    class OutputSide:
        @hookimpl
        def register_output_projectors(self, register):
            register(TinyOut)

        @hookimpl
        def register_generators(self, register):
            register(TinyGen)

    reg = build_registry(extra=[("outside", OutputSide())])
    assert reg.get("output_projector", "test_out").plugin == "outside"
    assert reg.get("generator", "test_gen").plugin == "outside"


def test_weight_source_and_preset_hooks(tmp_path) -> None:
    target = tmp_path / "w.bin"
    target.write_bytes(b"x")

    class Lab:
        @hookimpl
        def register_weight_sources(self, register):
            def resolve_lab(rest):
                """Files on the lab share."""
                return tmp_path / rest

            register("lab", resolve_lab)

        @hookimpl
        def register_presets(self, register):
            register("my-model", "tiny", {"name": "m", "backbone": {"type": "hf_causal_lm", "config": {"model_type": "llama"}}},
                     io="T -> T")

    from mmhub import weights

    reg = build_registry(extra=[("lab", Lab())])
    assert weights.resolve("lab:w.bin", reg) == target
    assert reg.preset("my-model").plugin == "lab" and reg.preset("my-model:tiny").io == "T -> T"


# -- meta-tests: every hook is documented and tested -------------------------------------
HOOKS = hook_names()


def test_hook_list_is_what_the_design_names() -> None:
    assert HOOKS == sorted(["register_encoders", "register_projectors", "register_backbones", "register_injectors",
                            "register_output_projectors", "register_generators", "register_weight_sources",
                            "register_presets", "register_datasets", "register_eval_tasks"])


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_docstring_and_register_argument(hook: str) -> None:
    fn = getattr(hookspecs, hook)
    assert (fn.__doc__ or "").strip(), f"{hook} has no docstring"
    assert list(inspect.signature(fn).parameters) == ["register"]


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented_in_the_plugin_guide(hook: str) -> None:
    guide = (ROOT / "plugins" / "mmhub-example-plugin" / "README.md").read_text()
    assert f"`{hook}`" in guide, f"{hook} is missing from the plugin guide"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_exercised_by_a_test_or_a_builtin(hook: str) -> None:
    tests = "".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py") if p.name != "test_plugins.py")
    used_by_test = re.search(rf"def {hook}\(", tests) is not None or re.search(rf"def {hook}\(", Path(__file__).read_text().split("# -- meta-tests")[0])
    reg = build_registry()
    used_by_builtin = {
        "register_encoders": bool(reg.components["encoder"]), "register_projectors": bool(reg.components["projector"]),
        "register_backbones": bool(reg.components["backbone"]), "register_injectors": bool(reg.components["injector"]),
        "register_weight_sources": bool(reg.weight_sources),
        "register_presets": bool(reg.presets),
        "register_datasets": bool(reg.datasets), "register_eval_tasks": bool(reg.eval_tasks),
    }.get(hook, False)
    assert used_by_test or used_by_builtin, f"no test implements {hook}"
