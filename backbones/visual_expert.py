"""CogVLM's visual experts: separate copies of chosen LM weights that process the media tokens.

In every block, the attention (QKV, output) and MLP linears get an expert copy; at
the sequence positions that hold spliced media tokens the expert's output replaces
the original's, text positions use the original frozen weights. Experts start as
copies of the LM's weights (as CogVLM initialises them), so before training the
model computes exactly what it did without them. With ``last_token_text`` the last
token of each media run keeps the text weights (CogVLM's routing of its eoi token). Media tokens are still spliced
into the sequence (a prefix of image tokens as in LLaVA); the experts hook onto the
linears with forward hooks, so the backbone's own modules are unchanged and LoRA can
still target them.

LoRA: each hook sits on whatever module is at the linear's place when the backbone runs, so once peft wraps a
linear in a LoRA layer the hook moves onto the wrapper (and back after merging). A text adapter on the backbone
therefore acts on text positions only, as CogVLM's LoRA on its language weights does; media positions take the
expert's output, and the experts get an adapter of their own only when a stage trains the injector with LoRA.
"""

from __future__ import annotations

import copy
import re
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from mmhub.backbones.layers import transformer_blocks
from mmhub.interfaces import (
    Backbone,
    BackboneFacts,
    BuildContext,
    ComponentConfig,
    InjectionContext,
    Injector,
    InjectorConfig,
    InjectorFacts,
)

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def cogvlm_position_ids(attention_mask: torch.Tensor, spans: list[tuple[int, int, tuple[int, int, int]]]
                        ) -> torch.Tensor:
    """(B, L) position ids as CogVLM's ``build_position_ids`` gives them: every real token advances the position by
    one, except an item's tokens after its second and before its last (the patches after the first share the first
    patch's position; boi and eoi advance). `spans`: (row, first position, grid) per spliced item."""
    step = attention_mask.to(torch.long).clone()
    for row, first, (t, h, w) in spans:
        count = t * h * w
        if count > 3:
            step[row, first + 2:first + count - 1] = 0
    return (step.cumsum(1) - 1).clamp(min=0)


class VisualExpertConfig(InjectorConfig):
    """Settings of `VisualExperts`."""

    targets: list[str] = Field(default_factory=lambda: list(LLAMA_TARGETS), min_length=1,
                               description="linear names inside each block that get an expert copy")
    layers: list[int] | None = Field(None, description="block indices with experts (default: all)")
    last_token_text: bool = Field(False, description="the last token of each run of media tokens uses the original "
                                  "(text) weights, as CogVLM routes its eoi token: a position takes the expert only "
                                  "when it and the next position both hold media")


class VisualExperts(Injector):
    """CogVLM: per-layer visual-expert copies of the LM's attention/MLP weights, applied at media positions."""

    name: ClassVar[str] = "visual_expert"
    Config: ClassVar[type[ComponentConfig]] = VisualExpertConfig
    modalities_in: ClassVar[tuple[str, ...]] = ("embeddings",)
    modalities_out: ClassVar[tuple[str, ...]] = ("hidden_states",)
    out_dim_doc: ClassVar[str] = "same as each target linear"
    tokens_doc: ClassVar[str] = "unchanged: media tokens stay spliced in the sequence"
    example_settings: ClassVar[dict[str, Any]] = {"dim": 32, "num_layers": 2}
    # cached generation steps hold text only, which the hooks leave alone: mmhub's decode loop computes the same
    own_loop_safe: ClassVar[bool] = True

    @classmethod
    def describe(cls, config: VisualExpertConfig, ctx: BuildContext, backbone: BackboneFacts) -> InjectorFacts:
        if backbone.is_encoder_decoder:
            raise ValueError("visual experts are for decoder-only LMs; this backbone is encoder-decoder")
        bad = [i for i in (config.layers or []) if not 0 <= i < backbone.num_layers]
        if bad:
            raise ValueError(f"layers {bad} are outside the backbone's {backbone.num_layers} blocks "
                             f"(0..{backbone.num_layers - 1})")
        return InjectorFacts(context_modalities=())

    @classmethod
    def memory_estimate(cls, config: VisualExpertConfig, ctx: BuildContext) -> int | None:
        """Unknown before building: the experts are copies of the backbone's linears, made by `attach`."""
        return None

    def __init__(self, config: VisualExpertConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        self.experts = nn.ModuleDict()  # filled by attach(): expert copies need the backbone's linears
        self._routes: list[_ExpertRoute] = []

    @property
    def context(self) -> InjectionContext | None:
        return self.__dict__.get("_context")

    @context.setter
    def context(self, value: InjectionContext | None) -> None:
        # before each backbone call: put every hook on the module now at its linear's place (a LoRA wrapper)
        if value is not None:
            for route in self._routes:
                route.follow()
        self.__dict__["_context"] = value

    def attach(self, backbone: Backbone) -> None:
        blocks = transformer_blocks(backbone, self.config.num_layers)
        chosen = self.config.layers if self.config.layers is not None else range(len(blocks))
        pattern = re.compile(rf"(^|\.)({'|'.join(map(re.escape, self.config.targets))})$")
        for i in chosen:
            for name, lin in blocks[i].named_modules():
                if isinstance(lin, nn.Linear) and pattern.search(name):
                    key = f"{i}__{name.replace('.', '__')}"
                    expert = copy.deepcopy(lin)
                    expert.requires_grad_(True)
                    self.experts[key] = expert
                    self._routes.append(_ExpertRoute(self, key, blocks[i], name))
                    self._routes[-1].follow()
        if not len(self.experts):
            raise ValueError(f"none of the targets {self.config.targets} is a linear inside the backbone's blocks; "
                             "set `targets` to the names of its attention/MLP linears")


class _ExpertRoute:
    """The forward hook of one target linear: at media positions its output becomes the expert's.

    It hooks the module at the linear's place in its block; `follow` moves it when peft has put a LoRA wrapper there
    (or merged it away), so that the text adapter's delta, added by the wrapper, is replaced at media positions too.
    The expert is looked up by key at each call: an adapter peft injects into the injector is used."""

    def __init__(self, owner: VisualExperts, key: str, block: nn.Module, path: str):
        self.owner, self.key, self.block, self.path = owner, key, block, path
        self.hooked: nn.Module | None = None
        self.handle: Any = None

    def follow(self) -> None:
        current = self.block.get_submodule(self.path)
        if current is not self.hooked:
            if self.handle is not None:
                self.handle.remove()
            self.handle = current.register_forward_hook(self)
            self.hooked = current

    def __call__(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        ctx = self.owner.context
        if ctx is None:
            return None
        pos = ctx.media_positions
        if self.owner.config.last_token_text:
            pos = torch.cat([pos[:, :-1] & pos[:, 1:], torch.zeros_like(pos[:, :1])], 1)
        x = args[0]
        if pos.shape != x.shape[:2] or not bool(pos.any()):  # cached generation steps hold text only
            return None
        out = out.clone()
        out[pos] = self.owner.experts[self.key](x[pos]).to(out.dtype)
        return out
