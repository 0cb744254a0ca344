"""Components registered by reference (``"module:Class"``): known by name at once, imported on first use.

Discovery and ``mmhub validate`` must not import the model code of components a spec does not use
(transformers' modeling modules, timm, open_clip); the subprocess tests read ``sys.modules`` after the
fact, so an eager import added to any plugin fails them.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from mmhub import hookimpl
from mmhub.classref import ClassRef
from mmhub.errors import PluginError, SpecError
from mmhub.registry import KIND_TABLE, build_registry

ROOT = Path(__file__).resolve().parents[1]

# modules only the components a tiny LLaVA spec (hf_vision -> linear -> hf_causal_lm) does NOT use pull in
NOT_FOR_LLAVA = ("timm", "open_clip", "diffusers", "transformers.models.mllama.modeling_mllama",
                 "transformers.models.idefics.modeling_idefics", "transformers.models.whisper.modeling_whisper",
                 "mmhub.encoders.mllama_vision", "mmhub.encoders.timm_encoder", "mmhub.encoders.open_clip_encoder",
                 "mmhub.encoders.imagebind", "mmhub.backbones.gated_xattn", "mmhub.backbones.mllama_xattn",
                 "mmhub.projectors.c_abstractor", "mmhub.projectors.qformer", "mmhub.generators.stable_diffusion",
                 "mmhub.importers.mllama", "mmhub.importers.blip2")


def _modules_after(code: str) -> list[str]:
    """Run `code` in a fresh interpreter and return the names in ``sys.modules`` afterwards."""
    script = code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_discovering_the_plugins_imports_no_component_module() -> None:
    mods = set(_modules_after("from mmhub.registry import build_registry\nreg = build_registry()\n"
                              "assert not reg.failed, reg.failed\nassert 'timm' in reg.names('encoder')"))
    component_mods = {m for m in mods if m.split(".")[:2] in (["mmhub", "encoders"], ["mmhub", "projectors"],
                                                              ["mmhub", "backbones"], ["mmhub", "generators"])
                      and not m.endswith(".plugin") and m.count(".") == 2}
    assert not component_mods, f"discovery imported component modules: {sorted(component_mods)}"
    assert not {"timm", "open_clip", "transformers.modeling_utils"} & mods


def test_validate_imports_only_what_the_spec_uses() -> None:
    mods = set(_modules_after("from mmhub.cli import main\nassert main(['validate', 'llava:tiny']) == 0"))
    assert "mmhub.encoders.hf_vision_encoder" in mods and "mmhub.projectors.linear" in mods  # what it does use
    eager = sorted(m for m in NOT_FOR_LLAVA if m in mods)
    assert not eager, f"`mmhub validate llava:tiny` imported modules its components do not need: {eager}"


def test_every_builtin_reference_loads_the_class_it_names() -> None:
    reg = build_registry()
    assert not reg.failed, reg.failed
    by_reference = 0
    for kind in KIND_TABLE:
        for key, entry in reg.entries[kind.key].items():
            source = getattr(entry, "source", None)
            if not isinstance(source, ClassRef):
                continue
            by_reference += 1
            cls = entry.cls
            assert cls.name == key and f"{cls.__module__}:{cls.__qualname__}" == source.ref
            if kind.component:
                assert cls.kind == kind.key
    assert by_reference >= 60  # every built-in component, dataset, eval task and importer


@pytest.fixture
def lazy_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An importable module (not yet imported) holding a linear projector named ``lazy_linear``."""
    name = f"lazy_plugin_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("""
        from mmhub.projectors.linear import LinearProjector

        class LazyLinear(LinearProjector):
            \"\"\"A linear projector registered by reference.\"\"\"
            name = "lazy_linear"
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def _plugin(hook: str, *args: object, **kwargs: object) -> object:
    plugin = types.SimpleNamespace()
    setattr(plugin, hook, hookimpl(lambda register: register(*args, **kwargs)))
    return plugin


def test_a_plugin_registers_by_reference_and_the_module_loads_on_first_use(lazy_module: str) -> None:
    reg = build_registry(extra=[("lazy", _plugin("register_projectors", f"{lazy_module}:LazyLinear",
                                                 name="lazy_linear"))], entry_points=False)
    assert not reg.failed, reg.failed
    info = reg.get("projector", "lazy_linear")
    assert info.plugin == "lazy" and lazy_module not in sys.modules
    assert info.cls.name == "lazy_linear" and lazy_module in sys.modules
    assert info.cls is sys.modules[lazy_module].LazyLinear
    assert info.metadata()["class"] == f"{lazy_module}.LazyLinear"


@pytest.mark.parametrize(("args", "kwargs", "message"), [
    (("mmhub.projectors.linear:LinearProjector",), {}, "by reference without a name"),
    (("not a reference",), {"name": "x"}, "not a class reference"),
])
def test_a_reference_without_a_name_or_malformed_is_refused_at_registration(args, kwargs, message) -> None:
    reg = build_registry(extra=[("bad", _plugin("register_projectors", *args, **kwargs))], entry_points=False)
    errors = {f.name: f.error for f in reg.failed}
    assert message in errors["bad"]


@pytest.mark.parametrize(("hook", "ref", "name", "message"), [
    ("register_projectors", "no_such_module_for_mmhub:Thing", "ghost", "ModuleNotFoundError"),
    ("register_projectors", "mmhub.projectors.linear:NoSuchClass", "ghost", "AttributeError"),
    ("register_projectors", "mmhub.projectors.linear:LinearProjector", "not_linear", "class's `name` is 'linear'"),
    ("register_encoders", "mmhub.projectors.linear:LinearProjector", "linear_enc", "but it is a projector"),
    ("register_datasets", "mmhub.projectors.linear:LinearProjector", "linear_data", "not a subclass of mmhub.data"),
])
def test_a_reference_that_does_not_load_fails_on_use_naming_plugin_and_reference(hook, ref, name, message) -> None:
    reg = build_registry(extra=[("shaky", _plugin(hook, ref, name=name))], entry_points=False)
    assert not reg.failed, reg.failed  # nothing is imported while registering
    kind = next(k for k in KIND_TABLE if k.hook == hook)
    entry = reg.entries[kind.key][name]
    with pytest.raises(PluginError) as err:
        _ = entry.cls
    assert "'shaky'" in str(err.value) and ref in str(err.value) and message in str(err.value)


def test_validate_reports_a_component_that_does_not_load_at_its_spec_path() -> None:
    from mmhub.validation import plan_source

    reg = build_registry(extra=[("shaky", _plugin("register_projectors", "no_such_module_for_mmhub:Thing",
                                                  name="ghost"))])
    spec = copy.deepcopy(reg.preset("llava:tiny").spec)
    spec["projectors"]["image"]["type"] = "ghost"
    with pytest.raises(SpecError) as err:
        plan_source(spec, registry=reg)
    (problem,) = [p for p in err.value.problems if p.path == "projectors.image.type"]
    assert "could not be loaded" in problem.message and "no_such_module_for_mmhub" in problem.message
    assert "shaky" in problem.fix


def test_listing_names_a_component_that_does_not_load_as_failed() -> None:
    from mmhub.listing import listing

    reg = build_registry(extra=[("shaky", _plugin("register_projectors", "no_such_module_for_mmhub:Thing",
                                                  name="ghost"))], entry_points=False)
    out = listing(reg)
    assert "ghost" not in [p["name"] for p in out["projectors"]]
    assert any(f["name"] == "shaky" and "no_such_module_for_mmhub" in f["error"] for f in out["failed"])


def test_a_model_built_from_lazily_registered_components_deep_copies(tiny_spec) -> None:
    """A DPO reference policy and a merged export deep-copy the model, which reaches the registry's entries: a
    class reference (with its lock) must survive that (it raised "cannot pickle '_thread.lock' object")."""
    import torch

    from mmhub import build
    from mmhub.adapters import merged_copy

    model = build(tiny_spec)
    twin = merged_copy(model)
    for (k, a), (_, b) in zip(model.state_dict().items(), twin.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
