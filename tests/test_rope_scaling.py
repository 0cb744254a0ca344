"""``rope_scaling`` computes the published rotary frequencies inside the context it advertises.

The backbone's own forward is run on a sequence longer than the original context and shorter than
``original x factor``; the cos/sin its rotary embedding hands the attention layers are compared with the
frequencies written out here from the methods' definitions:

* linear (position interpolation, Chen et al. 2023): every frequency divided by the factor;
* dynamic NTK (bloc97/emozilla, as Code Llama and Qwen use it): the base raised to
  ``theta * (s * L / L0 - (s - 1)) ** (d / (d - 2))`` once the sequence length L passes L0, unscaled before;
* YaRN (Peng et al. 2023, with the ramp over rotary dimensions of the authors' code): dimensions with more
  than beta_fast = 32 rotations in L0 keep their frequency, fewer than beta_slow = 1 are interpolated by s, a
  linear ramp between; cos/sin scaled by the attention temperature 0.1 ln s + 1.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from mmhub import build

from conftest import TINY_LLAMA

L0 = TINY_LLAMA["max_position_embeddings"]
FACTOR = 4.0
THETA = 10000.0  # the llama config's default rope_theta
DIM = TINY_LLAMA["hidden_size"] // TINY_LLAMA["num_attention_heads"]


def _base(theta: float = THETA) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, DIM, 2, dtype=torch.float64) / DIM)


def _linear(length: int) -> tuple[torch.Tensor, float]:
    return _base() / FACTOR, 1.0


def _dynamic(length: int) -> tuple[torch.Tensor, float]:
    if length <= L0:
        return _base(), 1.0
    return _base(THETA * (FACTOR * length / L0 - (FACTOR - 1)) ** (DIM / (DIM - 2))), 1.0


def _yarn(length: int, beta_fast: float = 32.0, beta_slow: float = 1.0) -> tuple[torch.Tensor, float]:
    def dim_with(rotations: float) -> float:  # the rotary dimension that turns `rotations` times over L0 positions
        return DIM * math.log(L0 / (rotations * 2 * math.pi)) / (2 * math.log(THETA))

    low, high = max(math.floor(dim_with(beta_fast)), 0), min(math.ceil(dim_with(beta_slow)), DIM - 1)
    ramp = ((torch.arange(DIM // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)).clamp(0, 1)
    inv = _base() * (1 - ramp) + _base() / FACTOR * ramp  # 0: keep (high frequency), 1: interpolate
    return inv, 0.1 * math.log(FACTOR) + 1.0


REFERENCE = {"linear": _linear, "dynamic": _dynamic, "yarn": _yarn}


def _rotary_seen_by_attention(model, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) (L, DIM) the backbone's rotary embedding hands its attention layers in a forward of `length`."""
    seen = []
    rotary = model.backbone.model.model.rotary_emb
    hook = rotary.register_forward_hook(lambda mod, args, out: seen.append(out))
    try:
        ids = torch.randint(3, 250, (1, length))
        with torch.no_grad():
            model.backbone(model.backbone.embed(ids), torch.ones_like(ids))
    finally:
        hook.remove()
    cos, sin = seen[0]
    return cos[0].double(), sin[0].double()


@pytest.mark.parametrize("kind", ["linear", "dynamic", "yarn"])
@pytest.mark.parametrize("length", [L0 // 2, L0 + 188, int(L0 * FACTOR)])
def test_rope_scaling_frequencies_follow_the_method_inside_the_extended_context(tiny_spec, kind, length):
    spec = copy.deepcopy(tiny_spec)
    spec["backbone"]["rope_scaling"] = {"type": kind, "factor": FACTOR}
    model = build(spec)
    assert model.plan.backbone_facts.context_length == int(L0 * FACTOR)
    cos, sin = _rotary_seen_by_attention(model, length)
    inv_freq, scale = REFERENCE[kind](length)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq[None]
    angles = torch.cat([angles, angles], dim=-1)
    # float32 angles of positions up to 2048: atol 2e-3 on cos/sin; a wrong base is off by far more (checked below)
    torch.testing.assert_close(cos, angles.cos() * scale, atol=2e-3, rtol=0)
    torch.testing.assert_close(sin, angles.sin() * scale, atol=2e-3, rtol=0)
    if kind == "dynamic" and length > L0:  # the scaled frequencies are not the unscaled ones
        plain = torch.arange(length, dtype=torch.float64)[:, None] * _base()[None]
        assert (cos - torch.cat([plain, plain], -1).cos()).abs().max() > 0.1
