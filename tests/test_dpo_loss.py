"""DPO's loss term for term: -log sigmoid(beta * ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r)))).

With the reference equal to the policy every margin is 0 and the loss is ln 2 per pair. The reference enters only
the margin, so moving it scales the policy's gradient by 2 * sigmoid(-margin), the DPO weight, and nothing else.
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import torch

from mmhub import build
from mmhub.spec import StageSpec
from mmhub.train.objectives import PreferenceLoss

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
import train_script  # noqa: E402

BETA = 0.5


def _setup() -> tuple:
    spec = train_script.spec(2)
    model = build(spec).eval()
    s = train_script.dataset(1)[0]
    batch = model.batch([s.conversation("It is red."), s.conversation("Ti si red.")], [s.media, s.media])
    batch["features"] = {}
    stage = StageSpec(name="prefer", objective="dpo", beta=BETA, train={"projectors": "full"})
    model.projectors.requires_grad_(True)
    return model, batch, stage


def _copy(model):
    """A frozen copy of the model's weights (the build context, which holds the registry, is shared)."""
    return copy.deepcopy(model, memo={id(model.plan.ctx): model.plan.ctx})


def _grads(model, reference, batch, stage) -> tuple[float, float, torch.Tensor]:
    model.zero_grad()
    objective = PreferenceLoss(reference)
    loss, pairs = objective.loss(model, batch, stage)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.projectors.parameters()])
    return float(loss.detach()) / pairs, objective.stats()["reward_margin"] * BETA, grads


def test_dpo_loss_is_ln2_against_itself_and_the_reference_scales_the_gradient() -> None:
    model, batch, stage = _setup()
    same = _copy(model).requires_grad_(False)
    loss0, margin0, g0 = _grads(model, same, batch, stage)
    assert abs(loss0 - math.log(2)) < 1e-6 and abs(margin0) < 1e-6
    # another reference: the margin moves away from 0, and with it the loss and the DPO weight of the gradient
    moved = _copy(same)
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for p in moved.backbone.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    loss1, margin1, g1 = _grads(model, moved, batch, stage)
    assert abs(margin1) > 0.05, margin1  # the reference moved the margin
    assert abs(loss1 - (-math.log(1 / (1 + math.exp(-margin1))))) < 1e-5  # -log sigmoid(margin)
    weight = 2 / (1 + math.exp(margin1))  # 2 * sigmoid(-margin): the gradient's factor relative to margin 0
    assert abs(weight - 1) > 0.02
    torch.testing.assert_close(g1, weight * g0, rtol=1e-4, atol=1e-7)
