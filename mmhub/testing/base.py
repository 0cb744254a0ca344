"""`ComponentTests`: the checks every component kind shares, as pytest test methods on a base class.

A per-kind subclass (`EncoderTests`, `ProjectorTests`, ...) says how to build inputs and how to
call the component; a plugin author subclasses that with ``component = TheClass`` (and optionally
``settings``) in a ``Test*`` class, and pytest collects one test per property. The instance under
test, its inputs and its output are built once per test class and shared by its tests.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from mmhub import weights as weight_sources
from mmhub.checkpoint import _dedupe
from mmhub.interfaces import BuildContext, Component
from mmhub.registry import Registry, get_registry
from mmhub.testing.samples import torch_threads

UNKNOWN_SETTING = "not_a_setting_of_this_component"


@dataclass
class Case:
    """One component under test: settings, build context, described facts, instance, inputs and output."""

    config: Any
    ctx: BuildContext
    facts: Any
    module: torch.nn.Module
    inputs: Any
    out: torch.Tensor  # with its autograd graph, when the forward has one
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def cast_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """`value` with `fn` applied to every tensor inside it (through lists, tuples, dicts and dataclasses)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (list, tuple)):
        return type(value)(cast_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: cast_tensors(v, fn) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: cast_tensors(getattr(value, f.name), fn)
                                             for f in dataclasses.fields(value) if f.init})
    return value


def accelerators() -> list[str]:
    """Non-CPU devices torch can use here (cuda, mps, xpu)."""
    found = ["cuda"] if torch.cuda.is_available() else []
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        found.append("xpu")
    return found


def component_under_test(test_cls: type, interface: type) -> type:
    """The ``component`` class attribute of a test class, checked to be set and of the right interface."""
    cls = getattr(test_cls, "component", None)
    if cls is None:
        raise TypeError(f"{test_cls.__name__} sets no `component`: add `component = YourClass` "
                        f"(the {interface.__name__} class under test) to the class body")
    if not (isinstance(cls, type) and issubclass(cls, interface)):
        raise TypeError(f"{test_cls.__name__}.component is {cls!r}, not a subclass of {interface.__module__}."
                        f"{interface.__name__}; use the tester class of its kind")
    return cls


def check_docstrings(cls: type) -> None:
    """The class and its module have docstrings (the class's first line is shown by `mmhub plugins`)."""
    doc = (cls.__doc__ or "").strip()
    assert doc, f"{cls.__name__}: the class needs a docstring (its first line is shown by `mmhub plugins`)"
    module = sys.modules.get(cls.__module__)
    assert module is not None and (module.__doc__ or "").strip(), \
        f"{cls.__name__}: its module {cls.__module__} needs a docstring saying what it is for"


def check_rejects_unknown_setting(config_cls: Any, settings: dict[str, Any], name: str) -> None:
    """Validating `settings` plus one unknown key fails with an error that names the key."""
    with pytest.raises(ValidationError) as exc:
        config_cls.model_validate({**settings, UNKNOWN_SETTING: 1})
    assert UNKNOWN_SETTING in str(exc.value), f"{name}: the error for an unknown setting does not name it: {exc.value}"


class ComponentTests:
    """Shared checks for a component class: set ``component`` (and optionally ``settings``) in a subclass.

    ``settings`` defaults to the class's ``example_settings``; ``registry`` (default: the installed one)
    resolves weight sources and nested components; ``dtype`` is the floating type the move test converts
    to (float64 by default; bfloat16 works too); ``num_threads`` pins torch's threads during the tests.
    """

    interface: ClassVar[type] = Component
    component: ClassVar[type | None] = None
    settings: ClassVar[dict[str, Any] | None] = None
    registry: ClassVar[Registry | None] = None
    dtype: ClassVar[torch.dtype] = torch.float64
    num_threads: ClassVar[int | None] = None
    needs_gradients: ClassVar[bool] = True  # False: a forward without an autograd graph skips the gradient test

    # -- the per-kind part: subclasses override these --------------------------------------------------
    @classmethod
    def prepare(cls, config: Any, ctx: BuildContext) -> tuple[Any, Any]:
        """(settings filled in as assembly would, described facts)."""
        return config, cls.component.describe(config, ctx)

    @classmethod
    def make(cls, case: Case, seed: int = 0) -> torch.nn.Module:
        """A fresh instance from the case's settings, initialised under `seed`, in eval mode."""
        torch.manual_seed(seed)
        return cls.component(case.config, case.ctx).eval()

    @classmethod
    def make_inputs(cls, case: Case) -> Any:
        raise NotImplementedError

    @classmethod
    def call(cls, module: torch.nn.Module, inputs: Any) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def move(cls, module: torch.nn.Module, **to: Any) -> torch.nn.Module:
        """`module` moved with ``.to(**to)`` (a rig moves its parts)."""
        return module.to(**to)

    @classmethod
    def copy(cls, case: Case) -> torch.nn.Module:
        """An independent copy of the instance under test, to move to another dtype or device."""
        return copy.deepcopy(case.module)

    @classmethod
    def estimated(cls, case: Case) -> torch.nn.Module:
        """The module whose bytes `memory_estimate` predicts (the component itself, not a test rig around it)."""
        return case.module

    @classmethod
    def outputs(cls, case: Case) -> dict[str, torch.Tensor]:
        """Every output the case computed, by label (several for a multi-modality encoder)."""
        return {"output": case.out}

    # -- the shared case ------------------------------------------------------------------------------
    @classmethod
    def case(cls) -> Case:
        """The instance under test, its inputs and output: built on first use, then shared by the class's tests."""
        found = cls.__dict__.get("_case")
        if found is None:
            comp = component_under_test(cls, cls.interface)
            registry = cls.registry or get_registry()
            ctx = BuildContext(resolve=lambda uri: weight_sources.resolve(uri, registry), registry=registry)
            settings = cls.settings if cls.settings is not None else comp.example_settings
            config, facts = cls.prepare(comp.Config.model_validate(settings), ctx)
            found = Case(config, ctx, facts, torch.nn.Module(), None, torch.empty(0))
            found.module = cls.make(found)
            found.inputs = cls.make_inputs(found)
            found.out = cls.call(found.module, found.inputs)
            type.__setattr__(cls, "_case", found)
        return found

    def setup_method(self, method: Any) -> None:
        self._threads = torch_threads(self.num_threads) if self.num_threads else None
        if self._threads is not None:
            self._threads.__enter__()

    def teardown_method(self, method: Any) -> None:
        if self._threads is not None:
            self._threads.__exit__(None, None, None)

    # -- the tests ---------------------------------------------------------------------------------------
    def test_has_docstrings(self) -> None:
        check_docstrings(component_under_test(type(self), self.interface))

    def test_settings_schema(self) -> None:
        comp = component_under_test(type(self), self.interface)
        settings = self.settings if self.settings is not None else comp.example_settings
        assert settings is not None, f"{comp.__name__}: set example_settings (a tiny instance's settings)"
        comp.Config.model_validate(settings)
        check_rejects_unknown_setting(comp.Config, settings, comp.__name__)

    def test_outputs_are_finite(self) -> None:
        for label, out in self.outputs(self.case()).items():
            assert torch.isfinite(out).all(), f"{self.component.name} ({label}): non-finite outputs"

    def test_gradients_are_finite(self) -> None:
        case = self.case()
        params = [(n, p) for n, p in case.module.named_parameters() if p.requires_grad]
        if not params:
            pytest.skip(f"{self.component.name} has no trainable parameters")
        if not case.out.requires_grad:
            if not self.needs_gradients:
                pytest.skip(f"{self.component.name}: its output carries no gradient (computed without autograd)")
            raise AssertionError(f"{self.component.name}: the output has no gradient path to its trainable "
                                 f"parameters (a forward under torch.no_grad or a detach?)")
        loss = case.out.float().square().mean()
        grads = torch.autograd.grad(loss, [p for _, p in params], retain_graph=True, allow_unused=True)
        reached = [(n, g) for (n, _), g in zip(params, grads, strict=True) if g is not None]
        assert reached, f"{self.component.name}: no trainable parameter receives a gradient from the output"
        bad = [n for n, g in reached if not torch.isfinite(g).all()]
        assert not bad, f"{self.component.name}: non-finite gradients in {bad[:5]}"

    def test_save_reload_round_trip(self) -> None:
        case = self.case()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "c.safetensors"
            # tied weights share storage: the checkpoint module's dedupe keeps one copy of each
            unique, _ = _dedupe({k: v.detach() for k, v in case.module.state_dict().items()})
            save_file(unique, str(path))
            fresh = self.make(case, seed=1234)
            loaded = load_file(str(path))
            missing, unexpected = fresh.load_state_dict(loaded, strict=False)
            assert not unexpected, unexpected
            own = fresh.state_dict()
            for k in missing:  # only tied aliases may be absent from the file
                assert any(own[k].data_ptr() == own[j].data_ptr() for j in loaded), f"{k} was not saved"
        with torch.no_grad():
            a, b = self.call(case.module, case.inputs), self.call(fresh, case.inputs)
        assert torch.equal(a, b), f"{self.component.name}: outputs differ after a save/reload round trip"

    def test_memory_estimate(self) -> None:
        """`memory_estimate` (what validation sums to refuse a spec that cannot fit) is unknown or exact: the bytes
        of the built instance's parameters and buffers."""
        case = self.case()
        estimate = self.component.memory_estimate(case.config, case.ctx)
        if estimate is None:
            pytest.skip(f"{self.component.name} gives no memory estimate (it reads weight files or cannot build "
                        "on the meta device)")
        module = self.estimated(case)
        tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
        built = sum(t.numel() * t.element_size() for t in tensors.values())
        assert estimate == built, (f"{self.component.name}: memory_estimate says {estimate:,} bytes but the built "
                                   f"instance holds {built:,}")

    def test_dtype_move(self) -> None:
        case = self.case()
        moved = self.move(self.copy(case), dtype=self.dtype)
        inputs = cast_tensors(case.inputs, lambda t: t.to(self.dtype) if t.is_floating_point() else t)
        with torch.no_grad():
            out = self.call(moved, inputs)
        assert out.dtype == self.dtype, f"{self.component.name}: moved to {self.dtype} but emitted {out.dtype}"
        assert torch.isfinite(out).all(), f"{self.component.name}: non-finite outputs in {self.dtype}"
        if self.dtype == torch.float64:
            ref = case.out.detach().double()
            assert torch.allclose(out, ref, rtol=1e-3, atol=1e-3), \
                f"{self.component.name}: float64 outputs differ from float32 by {(out - ref).abs().max():.3g}"

    def test_device_move(self) -> None:
        devices = accelerators()
        if not devices:
            pytest.skip("no accelerator here (checked cuda, mps, xpu); the other tests ran on cpu")
        case = self.case()
        for device in devices:
            moved = self.move(self.copy(case), device=device)
            with torch.no_grad():
                out = self.call(moved, cast_tensors(case.inputs, lambda t, d=device: t.to(d)))
            assert out.device.type == device, f"{self.component.name}: moved to {device}, output on {out.device}"
            assert torch.allclose(out.cpu(), case.out.detach(), rtol=1e-2, atol=1e-2), \
                f"{self.component.name}: outputs on {device} differ from cpu by " \
                f"{(out.cpu() - case.out).abs().max():.3g}"
