"""`build(spec) -> MMModel`: validate, then construct each component from its typed settings.

Components are constructed in a fixed order under the spec's seed, so the same
spec always yields the same random initialisation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmhub.errors import MMHubError, Problem, SpecError
from mmhub.interfaces import BuildContext
from mmhub.model import MMModel
from mmhub.probe import check_encoder_output
from mmhub.registry import Registry, get_registry
from mmhub.spec import Spec
from mmhub.validation import Plan, Slot, plan_source


def build(spec: str | Path | dict[str, Any] | Spec, registry: Registry | None = None,
          trust_remote_code: bool = False) -> MMModel:
    """Assemble an MM-LLM from a spec file, preset name (``llava-1.5:tiny``), dict or `Spec`.

    >>> model = build("llava-1.5:tiny")                                 # doctest: +SKIP
    >>> model.generate(["<image>\\nWhat is this?"], [{"image": [pil_image]}])  # doctest: +SKIP
    """
    if isinstance(spec, (str, Path)) and (Path(spec).expanduser() / "mmhub_spec.json").is_file():
        raise MMHubError(f"{spec} is a saved model folder; build() assembles a spec with fresh weights and would drop "
                         f"its trained ones. Load it with mmhub.load({str(spec)!r}) (or MMModel.from_pretrained).")
    registry = registry or get_registry()
    plan = plan_source(spec, registry, trust_remote_code=trust_remote_code)
    return build_from_plan(plan)


def construct(slot: Slot, ctx: BuildContext) -> Any:
    """One component from its validated settings; a failure inside its constructor (settings the component's own
    library rejects, e.g. a width not divisible by the head count) is a SpecError at the slot, not a traceback."""
    try:
        return slot.info.cls(slot.config, ctx)
    except MMHubError:
        raise
    except (ValueError, TypeError, AssertionError, ZeroDivisionError, RuntimeError, OverflowError, MemoryError) as exc:
        raise SpecError([Problem(slot.path, f"{slot.info.name} (plugin {slot.info.plugin}) could not be built from "
                                            f"these settings: {type(exc).__name__}: {str(exc)[:300]}",
                                 f"check the settings (`mmhub plugins show {slot.info.name}`)")]) from exc


def build_from_plan(plan: Plan) -> MMModel:
    """Construct the components of an already validated plan (`plan_spec` checked it fits in memory)."""
    ctx = plan.ctx
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(plan.spec.seed)
        backbone = construct(plan.backbone, ctx)
        encoders = {m: construct(s, ctx) for m, s in plan.encoders.items() if m not in plan.shared}
        projectors = {m: construct(s, ctx) for m, s in plan.projectors.items()}
        injectors = {n: construct(s, ctx) for n, s in plan.injectors.items()}
        output_projectors = {m: construct(s, ctx) for m, s in plan.output_projectors.items()}
        generators = {m: construct(s, ctx) for m, s in plan.generators.items()}
    for m, owner in plan.shared.items():  # one instance serves several modalities (ImageBind-like)
        encoders[m] = encoders[owner]
    encoders = {m: encoders[m] for m in plan.encoders}  # spec order
    for m, enc in encoders.items():
        want = plan.encoder_facts[m].out_dim
        if enc.out_dim != want:  # a component whose describe() disagrees with itself is a plugin bug
            raise RuntimeError(f"encoder {plan.encoders[m].info.name} described width {want} but built {enc.out_dim}; "
                               f"fix its describe() (plugin {plan.encoders[m].info.plugin})")
        info, facts = plan.encoders[m].info, plan.encoder_facts[m]
        check_encoder_output(enc, m, facts.tokens_for(m), want, f"encoders.{m}",
                             f"encoder {info.name!r} (plugin {info.plugin})")
    model = MMModel(plan, encoders, projectors, backbone, injectors, output_projectors, generators)
    if plan.spec.adapters:  # a saved model that carries LoRA adapters: re-inject them before any weights load
        from mmhub.adapters import inject_adapter

        for slot, lora in plan.spec.adapters.items():
            inject_adapter(model, slot, lora)
    if plan.spec.init_from:  # start from a trained model's weights (e.g. a new output side on a trained MM-LLM)
        from mmhub.checkpoint import init_from_model

        init_from_model(model, plan.spec.init_from, sandbox=plan.sandbox)
    if plan.spec.runtime.weight_layout == "auto":  # strides only: values, keys and saved files are unchanged
        from mmhub.layout import set_decode_layout

        set_decode_layout(model.backbone)
    from mmhub.runtime import runtime_problems

    problems = runtime_problems(plan.spec.runtime)
    if problems:
        raise SpecError([Problem("runtime", p) for p in problems])
    if plan.spec.runtime.compile:
        from mmhub.activation_checkpointing import compile_blocks

        if not compile_blocks(backbone.checkpoint_blocks()):
            raise SpecError([Problem("runtime.compile", f"the {backbone.name!r} backbone offers no blocks to "
                                     "compile (its checkpoint_blocks() is empty); set compile: false")])
    if plan.spec.runtime.activation_checkpointing:
        from mmhub.activation_checkpointing import checkpoint_blocks

        if not checkpoint_blocks(backbone.checkpoint_blocks()):
            raise SpecError([Problem("runtime.activation_checkpointing", f"the {backbone.name!r} backbone offers no "
                                     "blocks to checkpoint (its checkpoint_blocks() is empty); set "
                                     "activation_checkpointing: false")])
    model.requires_grad_(False)  # frozen until a training stage says which parts learn
    model.eval()
    return model
