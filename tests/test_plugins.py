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
from mmhub.registry import KIND_TABLE, build_registry

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
    # only mmhub's group: other libraries (triton) list their own entry points through the same function
    monkeypatch.setattr(md, "entry_points",
                        lambda **kw: list(real(**kw)) + [FakeEP()] if kw.get("group") == "mmhub" else real(**kw))
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
    # only mmhub's group: other libraries (triton) list their own entry points through the same function
    monkeypatch.setattr(md, "entry_points",
                        lambda **kw: list(real(**kw)) + [FakeEP()] if kw.get("group") == "mmhub" else real(**kw))
    monkeypatch.setenv("MMHUB_PLUGINS", "")
    reg = build_registry()
    assert "other" in reg.plugins.disabled and not loaded
    assert "timm" in reg.names("encoder")  # built-ins always load
    monkeypatch.setenv("MMHUB_PLUGINS", "other")
    reg = build_registry()
    assert loaded and any(p.name == "other" for p in reg.plugins.loaded)


def test_duplicate_names_keep_the_first_and_list_the_second_as_failed() -> None:
    class Dup:
        @hookimpl
        def register_projectors(self, register):
            register(RenamedLinear)

    reg = build_registry(extra=[("a", Good()), ("b", Dup())])  # no exception: the hub stays up
    assert reg.get("projector", "renamed_linear").plugin == "a"
    failed = [f for f in reg.failed if f.name == "b"]
    assert failed and re.search("registered twice.*override=True", failed[0].error)
    assert "'a' (distribution (in process))" in failed[0].error and "linear" in reg.names("projector")
    with pytest.raises(DuplicateComponentError, match="registered twice.*override=True"):
        reg.add("projector", RenamedLinear, "c")  # registering directly still refuses

    class Override:
        @hookimpl
        def register_projectors(self, register):
            register(RenamedLinear, override=True)

    reg = build_registry(extra=[("a", Good()), ("b", Override())])
    assert reg.get("projector", "renamed_linear").plugin == "b"


class ClaimsMlp(LinearProjector):
    """A third-party projector that takes the built-in name `mlp`."""

    name = "mlp"


@pytest.mark.parametrize("override", [False, True])
def test_a_builtin_name_is_never_replaced_by_a_third_party(override: bool) -> None:
    class Clash:
        @hookimpl
        def register_projectors(self, register):
            register(ClaimsMlp, override=override)
            register(RenamedLinear)

    reg = build_registry(extra=[("clash", Clash())])
    assert reg.get("projector", "mlp").plugin == "mmhub.projectors"
    assert reg.get("projector", "renamed_linear").plugin == "clash"  # the rest of the plugin still loads
    error = next(f.error for f in reg.failed if f.name == "clash")
    assert "distribution mmhub" in error and "(in process)" in error and "never replaced" in error
    assert ("not even with override=True" in error) == override and "rename it" in error


def _fake_ep(monkeypatch, *plugins: tuple[str, str, object]) -> None:
    """Add entry points (entry-point name, distribution name, module or error to raise) to group ``mmhub``."""
    import importlib.metadata as md

    def ep(name: str, dist: str, obj: object) -> object:
        class FakeDist:
            version = "1.0"

        FakeDist.name = dist

        class FakeEP:
            group = "mmhub"

            def load(self):
                if isinstance(obj, BaseException):
                    raise obj
                return obj

        FakeEP.name, FakeEP.dist = name, FakeDist()
        return FakeEP()

    real = md.entry_points
    fakes = [ep(*p) for p in plugins]
    # only mmhub's group: other libraries (triton) list their own entry points through the same function
    monkeypatch.setattr(md, "entry_points",
                        lambda **kw: list(real(**kw)) + fakes if kw.get("group") == "mmhub" else real(**kw))


def _module_registering(name: str, cls: type) -> types.ModuleType:
    module = types.ModuleType(name)

    @hookimpl
    def register_projectors(register):
        register(cls)

    module.register_projectors = register_projectors
    return module


def test_two_third_party_plugins_clash_the_first_sorted_wins_naming_both_distributions(monkeypatch) -> None:
    _fake_ep(monkeypatch, ("zeta", "zeta-dist", _module_registering("zeta", RenamedLinear)),
             ("alpha", "alpha-dist", _module_registering("alpha", RenamedLinear)))
    reg = build_registry()
    assert reg.get("projector", "renamed_linear").plugin == "alpha"
    error = next(f for f in reg.failed if f.name == "zeta")
    assert error.dist == "zeta-dist" and "alpha-dist" in error.error and "zeta-dist" in error.error


def test_plugin_calling_sys_exit_at_import_or_in_a_hook_is_reported(monkeypatch) -> None:
    class ExitsInHook:
        @hookimpl
        def register_projectors(self, register):
            sys.exit(3)

    _fake_ep(monkeypatch, ("quitter", "quitter-dist", SystemExit(1)))
    reg = build_registry(extra=[("exits", ExitsInHook())])
    failed = {f.name: f for f in reg.failed}
    assert "SystemExit" in failed["quitter"].error and failed["quitter"].dist == "quitter-dist"
    assert "SystemExit" in failed["exits"].error and "mlp" in reg.names("projector")


def test_allow_list_typo_names_unknown_and_known_plugins(monkeypatch) -> None:
    _fake_ep(monkeypatch, ("other", "other-dist", types.ModuleType("other")))
    monkeypatch.setenv("MMHUB_PLUGINS", "othr")
    with pytest.warns(UserWarning, match="MMHUB_PLUGINS") as caught:
        reg = build_registry()
    text = str(caught[0].message)
    assert "'othr' (did you mean 'other'?)" in text and "installed third-party plugins: other" in text
    assert reg.plugins.warnings == [text]


def test_unknown_name_mentions_plugins_that_failed_to_load() -> None:
    class Broken:
        @hookimpl
        def register_encoders(self, register):
            raise RuntimeError("boom")

    reg = build_registry(extra=[("broken", Broken())])
    with pytest.raises(UnknownComponentError) as exc:
        reg.get("encoder", "fancy_encoder")
    assert "may be in one of them: broken ((in process)): register_encoders raised RuntimeError: boom" in str(exc.value)


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
            register("my-model", "tiny",
                     {"name": "m", "backbone": {"type": "hf_causal_lm", "config": {"model_type": "llama"}}},
                     io="T -> T")

    from mmhub import weights

    reg = build_registry(extra=[("lab", Lab())])
    assert weights.resolve("lab:w.bin", reg) == target
    assert reg.preset("my-model").plugin == "lab" and reg.preset("my-model:tiny").io == "T -> T"


# -- one test per hook: each registers a throwaway entry through that hook --------------
def _through(hook: str, *args: object) -> object:
    """Build a registry from one plugin whose `hook` calls ``register(*args)``; return the entry it added."""
    plugin = types.SimpleNamespace()
    setattr(plugin, hook, hookimpl(lambda register: register(*args)))
    reg = build_registry(extra=[("through", plugin)], entry_points=False)
    assert not reg.failed, reg.failed
    kind = next(k for k in KIND_TABLE if k.hook == hook)
    (entry,) = reg.entries[kind.key].values()
    assert entry.plugin == "through"
    return entry


def _renamed(cls: type, name: str) -> type:
    return type(f"Renamed{cls.__name__}", (cls,), {"name": name, "__doc__": cls.__doc__})


def test_hook_register_encoders() -> None:
    from mmhub.encoders.timm_encoder import TimmEncoder

    assert _through("register_encoders", _renamed(TimmEncoder, "my_timm")).name == "my_timm"


def test_hook_register_projectors() -> None:
    assert _through("register_projectors", RenamedLinear).cls is RenamedLinear


def test_hook_register_backbones() -> None:
    from mmhub.backbones.hf_causal_lm import HFCausalLM

    assert _through("register_backbones", _renamed(HFCausalLM, "my_lm")).kind == "backbone"


def test_hook_register_injectors() -> None:
    from mmhub.backbones.gated_xattn import GatedCrossAttention

    assert _through("register_injectors", _renamed(GatedCrossAttention, "my_xattn")).kind == "injector"


def test_hook_register_output_projectors() -> None:
    from mmhub.projectors.output import OUTPUT_PROJECTORS

    assert _through("register_output_projectors", _renamed(OUTPUT_PROJECTORS[0], "my_out")).kind == "output_projector"


def test_hook_register_generators() -> None:
    from mmhub.generators.pixel_diffusion import PixelDiffusionGenerator

    assert _through("register_generators", _renamed(PixelDiffusionGenerator, "my_gen")).kind == "generator"


def test_hook_register_weight_sources(tmp_path) -> None:
    entry = _through("register_weight_sources", "lab", lambda rest: tmp_path / rest)
    assert entry.scheme == "lab" and entry.resolver("x") == tmp_path / "x"


def test_hook_register_presets() -> None:
    entry = _through("register_presets", "my-model", "tiny", {"name": "m"})
    assert entry.key == "my-model:tiny" and entry.status == "complete"


def test_hook_register_datasets() -> None:
    from mmhub.data.captions import CaptionsDataset

    assert _through("register_datasets", _renamed(CaptionsDataset, "my_captions")).name == "my_captions"


def test_hook_register_eval_tasks() -> None:
    from mmhub.evaluation.easy_vqa import EasyVQATask

    assert _through("register_eval_tasks", _renamed(EasyVQATask, "my_task")).name == "my_task"


def test_hook_register_importers() -> None:
    from mmhub.importers.llava import LlavaImporter

    entry = _through("register_importers", _renamed(LlavaImporter, "my_llava"))
    assert entry.name == "my_llava" and entry.metadata()["model_types"] == ["llava"]
    plugin = types.SimpleNamespace(register_importers=hookimpl(lambda register: register(dict)))
    reg = build_registry(extra=[("bad", plugin)], entry_points=False)
    assert "not a subclass of mmhub.importers.Importer" in str(reg.failed)


# -- meta-tests: every hook is documented and tested -------------------------------------
HOOKS = hook_names()


def test_every_hookspec_is_one_row_of_the_kind_table() -> None:
    assert HOOKS == sorted(k.hook for k in KIND_TABLE)
    from mmhub.interfaces import KINDS as COMPONENT_KINDS

    assert tuple(k.key for k in KIND_TABLE if k.component) == COMPONENT_KINDS


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
def test_every_hook_is_in_the_docs_hook_table(hook: str) -> None:
    docs = ROOT / "docs" / "plugins.md"
    if not docs.is_file():
        pytest.skip("docs/plugins.md does not exist yet; its hook table is checked once it does")
    assert f"`{hook}`" in docs.read_text(), f"{hook} is missing from the hook table in docs/plugins.md"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_test_of_its_own(hook: str) -> None:
    tests = "".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    assert f"def test_hook_{hook}(" in tests, f"no test_hook_{hook}: add a test that registers through {hook}"
