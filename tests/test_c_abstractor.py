"""The C-Abstractor is Honeybee's: timm's RegNet stages (Bottleneck blocks with a depthwise 3x3 and squeeze-excitation,
SiLU, timm's LayerNorm2d) around an adaptive pool, then an MLP.

The reference is built here from timm directly, configured as Honeybee's ``CAbstractor.build_net`` configures it
(kakaobrain/honeybee, honeybee/projectors/projectors.py); given the same weights it must give the same output.
"""

from __future__ import annotations

import math

import torch
from timm.layers import LayerNorm2d, LayerNormAct2d
from timm.models.regnet import Bottleneck, RegStage, SEModule
from torch import nn

from mmhub.interfaces import BuildContext
from mmhub.registry import get_registry

IN, OUT = 16, 24


def build(seed: int = 0, **settings: object) -> nn.Module:
    cls = get_registry().get("projector", "c_abstractor").cls
    config = cls.Config.model_validate({**settings, "in_dim": IN, "out_dim": OUT})
    torch.manual_seed(seed)
    return cls(config, BuildContext(resolve=lambda uri: uri, attention="auto"))


class HoneybeeReference(nn.Module):
    """Honeybee's C-Abstractor from its description: RegStage(depth, enc, hidden, stride=1, dilation=1, SiLU,
    LayerNorm2d) -> AdaptiveAvgPool2d(hw) -> RegStage(depth, hidden, hidden, ...) -> Linear (+ SiLU, Linear)*."""

    def __init__(self, in_dim: int, width: int, out_dim: int, depth: int, mlp_depth: int, num_queries: int,
                 input_tokens: int | None):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(input_tokens, in_dim)) if input_tokens else None

        def stage(a: int, b: int) -> RegStage:
            return RegStage(depth, a, b, stride=1, dilation=1, act_layer=nn.SiLU, norm_layer=LayerNorm2d)

        side = math.isqrt(num_queries)
        self.net = nn.Sequential(stage(in_dim, width), nn.AdaptiveAvgPool2d((side, side)), stage(width, width))
        mlp: list[nn.Module] = [nn.Linear(width, out_dim)]
        for _ in range(1, mlp_depth):
            mlp += [nn.SiLU(), nn.Linear(out_dim, out_dim)]
        self.readout = nn.Sequential(*mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos is not None:
            x = x + self.pos
        n, t, c = x.shape
        s = math.isqrt(t)
        grid = x.reshape(n, s, s, c).permute(0, 3, 1, 2)
        y = self.net(grid)
        return self.readout(y.flatten(2).transpose(1, 2))


def test_c_abstractor_equals_timm_regstage_reference() -> None:
    settings = {"num_queries": 9, "width": 32, "depth": 2, "mlp_depth": 2, "input_tokens": 36}
    proj = build(**settings).eval()
    ref = HoneybeeReference(IN, 32, OUT, 2, 2, 9, 36).eval()
    ref.load_state_dict(proj.state_dict(), strict=True)  # same names, same shapes: Honeybee's key layout
    with torch.no_grad():
        for p in ref.parameters():  # random norms and SE biases too, so every weight matters
            p.add_(0.1 * torch.randn_like(p))
        proj.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 36, IN, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, want = proj(x), ref(x)
    assert got.shape == (2, 9, OUT)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_c_abstractor_blocks_are_regnet_bottlenecks_with_se() -> None:
    proj = build(num_queries=4, width=32, depth=3)
    blocks = [m for m in proj.modules() if isinstance(m, Bottleneck)]
    assert len(blocks) == 6  # depth blocks before the pool and depth after
    for b in blocks:
        width = b.conv2.conv.out_channels
        assert b.conv2.conv.kernel_size == (3, 3) and b.conv2.conv.groups == width  # depthwise (group size 1)
        assert isinstance(b.se, SEModule)  # squeeze-excitation after the 3x3, as RegNet places it
        assert b.se.fc1.out_channels == round(b.conv1.conv.in_channels * 0.25)  # se_ratio 0.25 of the block input
        assert isinstance(b.se.act, nn.SiLU) and isinstance(b.act3, nn.SiLU)
        # Honeybee passes timm's LayerNorm2d; timm's conv blocks build its fused norm+act form from it
        assert all(isinstance(c.bn, LayerNormAct2d) for c in (b.conv1, b.conv2, b.conv3))


def test_c_abstractor_is_local_but_for_the_squeeze() -> None:
    """An output token reads its own region of the grid through the convolutions; only the squeeze-excitation's
    global average reaches further. With the SE gates fixed the 3x3 path is exactly local; with them the far cells
    move by a small fraction of the near ones.

    depth 1: one 3x3 block before the pool (8x8 -> 4x4, 2x2 cells each) and one after, so a change in the top-left
    input token reaches output cells (0..1, 0..1) through the convolutions and none further."""
    proj = build(num_queries=16, width=8, depth=1).eval()
    x = torch.randn(1, 64, IN, generator=torch.Generator().manual_seed(0))
    changed = x.clone().view(1, 8, 8, IN)
    changed[0, 0, 0] += 10.0  # top-left token of the 8x8 grid
    changed = changed.view(1, 64, IN)

    def delta() -> torch.Tensor:
        with torch.no_grad():
            return (proj(x) - proj(changed)).abs().sum(-1)[0].view(4, 4)  # per output cell of the 4x4 grid

    with_se = delta()
    near, far = with_se[:2, :2], torch.cat([with_se[2:].flatten(), with_se[:2, 2:].flatten()])
    assert (near > 0).all() and (far > 0).all()  # SE's global squeeze reaches every cell
    assert far.max() < 0.5 * near.min(), (near, far)
    for m in proj.modules():
        if isinstance(m, Bottleneck):
            m.se = nn.Identity()
    local = delta()
    assert (local[:2, :2] > 0).all()
    assert local[2:].abs().sum() == 0 and local[:, 2:].abs().sum() == 0
