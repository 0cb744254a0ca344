"""`InjectorTests`: an injector attached to a tiny random Llama must change its outputs with a media context
and nothing without one (see `mmhub.testing.base.ComponentTests` for the shared checks)."""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch

from mmhub.interfaces import BuildContext, Component, InjectionContext, Injector
from mmhub.registry import get_registry
from mmhub.testing.base import Case, ComponentTests

SEQ_LEN = 8


class InjectorRig(torch.nn.Module):
    """An injector attached to its own tiny backbone; only the injector's tensors are in the state dict."""

    def __init__(self, injector: Component, backbone: Component):
        super().__init__()
        self.inj = injector
        object.__setattr__(self, "backbone", backbone)  # not a submodule: its weights are not the injector's
        injector.attach(backbone)


class InjectorTests(ComponentTests):
    """An injector on a tiny random ``hf_causal_lm`` backbone, with a context of 2 items of 3 tokens each."""

    interface: ClassVar[type] = Injector

    @classmethod
    def prepare(cls, config: Any, ctx: BuildContext) -> tuple[Any, Any]:
        bcls = (cls.registry or get_registry()).get("backbone", "hf_causal_lm").cls
        bconfig = bcls.Config.model_validate(bcls.example_settings)
        bfacts = bcls.describe(bconfig, ctx)
        facts = cls.component.describe(config, ctx, bfacts)
        fill = (("dim", bfacts.hidden_size), ("num_layers", bfacts.num_layers))
        config = config.model_copy(update={k: v for k, v in fill if k in type(config).model_fields})
        torch.manual_seed(0)
        cls._base = (bcls(bconfig, ctx).eval(), bfacts)
        return config, facts

    @classmethod
    def make(cls, case: Case, seed: int = 0) -> torch.nn.Module:
        base = case.extra.setdefault("base", cls._base)[0]
        torch.manual_seed(seed)
        rig = InjectorRig(cls.component(case.config, case.ctx).eval(), copy.deepcopy(base)).eval()
        gen = torch.Generator().manual_seed(seed)
        # move off any identity initialisation (zero gates, copied experts): the checks need effect
        with torch.no_grad():
            for p in rig.inj.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
        return rig

    @classmethod
    def estimated(cls, case: Case) -> torch.nn.Module:
        return case.module.inj  # the rig also holds the backbone copy the injector is attached to

    @classmethod
    def make_inputs(cls, case: Case) -> Any:
        g = torch.Generator().manual_seed(0)
        hidden = case.extra["base"][1].hidden_size
        ids = torch.randint(3, 200, (1, SEQ_LEN), generator=g)
        index = torch.tensor([[-1, -1, 0, 0, 0, 1, 1, 1]])
        media = {m: torch.randn(1, 2, 3, hidden, generator=g) for m in case.facts.context_modalities}
        positions = torch.tensor([[False, True, True, True, False, False, False, False]])
        context = InjectionContext(media, {m: torch.ones(1, 2, dtype=torch.bool) for m in media},
                                   {m: index for m in media}, positions)
        return ids, context

    @classmethod
    def call(cls, module: torch.nn.Module, inputs: Any) -> torch.Tensor:
        ids, context = inputs
        module.inj.context = context
        try:
            return module.backbone(module.backbone.embed(ids), torch.ones_like(ids))
        finally:
            module.inj.context = None

    @classmethod
    def move(cls, module: torch.nn.Module, **to: Any) -> torch.nn.Module:
        module.backbone.to(**to)
        return module.to(**to)

    @classmethod
    def copy(cls, case: Case) -> torch.nn.Module:
        return cls.make(case)  # a deep copy would keep hooks bound to the original injector

    def test_describe_matches_forward(self) -> None:
        case = self.case()
        want = (1, SEQ_LEN, case.extra["base"][1].hidden_size)
        assert case.out.shape == want, f"{self.component.name}: hidden states {tuple(case.out.shape)} != {want}"

    def test_context_changes_outputs(self) -> None:
        case = self.case()
        base, ids = case.extra["base"][0], case.inputs[0]
        with torch.no_grad():
            plain = base(base.embed(ids), torch.ones_like(ids))
        assert not torch.allclose(case.out.detach(), plain), \
            f"{self.component.name}: with a media context, the injector changed nothing"

    def test_no_context_changes_nothing(self) -> None:
        case = self.case()
        base, ids, rig = case.extra["base"][0], case.inputs[0], case.module
        with torch.no_grad():  # context cleared: the hooks are inert
            plain = rig.backbone(rig.backbone.embed(ids), torch.ones_like(ids))
            want = base(base.embed(ids), torch.ones_like(ids))
        assert torch.equal(plain, want), \
            f"{self.component.name}: with no context set, the backbone must compute exactly what it did without it"
