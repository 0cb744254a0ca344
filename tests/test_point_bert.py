"""Point-BERT (Yu et al. 2022) as ULIP-2 trains it: the `point_bert` encoder and the converter from ULIP's checkpoint
key layout (``module.point_encoder.*``: ``encoder.first_conv`` / ``second_conv``, ``reduce_dim``, ``cls_token``,
``cls_pos``, ``pos_embed``, ``blocks.blocks.<i>``, ``norm``).

The layout is written out here from ULIP's module tree (`ulip_state`), and `reference_forward` is Point-BERT's
equations on those tensors (FPS from the first point, kNN groups relative to their centre, the two-stage mini-PointNet
of 1x1 convolutions with BatchNorm in eval mode, pre-LN blocks that add the positions before every block), not the
encoder's modules.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmhub import weights as weight_sources
from mmhub.errors import WeightsNotFoundError
from mmhub.interfaces import BuildContext
from mmhub.registry import get_registry
from mmhub.testing import sample_item

REG = get_registry()
TINY = {"num_points": 256, "num_group": 16, "group_size": 8, "in_channels": 6, "encoder_dims": 48, "trans_dim": 32,
        "depth": 2, "num_heads": 4}


@pytest.fixture
def ctx() -> BuildContext:
    return BuildContext(resolve=lambda uri: weight_sources.resolve(uri, REG), registry=REG)


def build(settings: dict, ctx: BuildContext, seed: int = 0):
    cls = REG.get("encoder", "point_bert").cls
    config = cls.Config.model_validate(settings)
    facts = cls.describe(config, ctx)
    torch.manual_seed(seed)
    return cls(config, ctx).eval(), facts


def ulip_state(seed: int = 0, c: int = 6, e: int = 48, d: int = 32, depth: int = 2) -> dict[str, torch.Tensor]:
    """A random ULIP checkpoint state dict (DDP ``module.`` names): the Point-BERT point encoder plus the parts of
    ULIP the encoder does not hold (the point projection, the logit scale, a text-tower tensor)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    def bn(prefix: str, n: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": 1 + r(n, scale=0.1), f"{prefix}.bias": r(n, scale=0.1),
                f"{prefix}.running_mean": r(n, scale=0.1), f"{prefix}.running_var": 0.5 + torch.rand(n, generator=g),
                f"{prefix}.num_batches_tracked": torch.tensor(100)}

    p = "module.point_encoder"
    s = {f"{p}.encoder.first_conv.0.weight": r(128, c, 1), f"{p}.encoder.first_conv.0.bias": r(128),
         **bn(f"{p}.encoder.first_conv.1", 128),
         f"{p}.encoder.first_conv.3.weight": r(256, 128, 1, scale=0.1), f"{p}.encoder.first_conv.3.bias": r(256),
         f"{p}.encoder.second_conv.0.weight": r(512, 512, 1, scale=0.05), f"{p}.encoder.second_conv.0.bias": r(512),
         **bn(f"{p}.encoder.second_conv.1", 512),
         f"{p}.encoder.second_conv.3.weight": r(e, 512, 1, scale=0.05), f"{p}.encoder.second_conv.3.bias": r(e),
         f"{p}.reduce_dim.weight": r(d, e), f"{p}.reduce_dim.bias": r(d),
         f"{p}.cls_token": r(1, 1, d), f"{p}.cls_pos": r(1, 1, d),
         f"{p}.pos_embed.0.weight": r(128, 3), f"{p}.pos_embed.0.bias": r(128),
         f"{p}.pos_embed.2.weight": r(d, 128, scale=0.1), f"{p}.pos_embed.2.bias": r(d),
         f"{p}.norm.weight": 1 + r(d, scale=0.1), f"{p}.norm.bias": r(d, scale=0.1)}
    for i in range(depth):
        b = f"{p}.blocks.blocks.{i}"
        s |= {f"{b}.norm1.weight": 1 + r(d, scale=0.1), f"{b}.norm1.bias": r(d, scale=0.1),
              f"{b}.attn.qkv.weight": r(3 * d, d), f"{b}.attn.proj.weight": r(d, d), f"{b}.attn.proj.bias": r(d),
              f"{b}.norm2.weight": 1 + r(d, scale=0.1), f"{b}.norm2.bias": r(d, scale=0.1),
              f"{b}.mlp.fc1.weight": r(4 * d, d), f"{b}.mlp.fc1.bias": r(4 * d),
              f"{b}.mlp.fc2.weight": r(d, 4 * d), f"{b}.mlp.fc2.bias": r(d)}
    s |= {"module.pc_projection": r(2 * d, 24), "module.logit_scale": torch.tensor(math.log(1 / 0.07)),
          "module.open_clip_model.positional_embedding": r(77, 16)}
    return s


def _ln(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt((x - mu).pow(2).mean(-1, keepdim=True) + eps) * w + b


def _conv_bn_relu_conv(x: torch.Tensor, s: dict, p: str) -> torch.Tensor:
    """(.., K, C) -> 1x1 conv, BatchNorm (running statistics, eps 1e-5), ReLU, 1x1 conv: per point, as matmuls."""
    h = x @ s[f"{p}.0.weight"][..., 0].T + s[f"{p}.0.bias"]
    h = (h - s[f"{p}.1.running_mean"]) / torch.sqrt(s[f"{p}.1.running_var"] + 1e-5) * s[f"{p}.1.weight"] \
        + s[f"{p}.1.bias"]
    return h.clamp_min(0) @ s[f"{p}.3.weight"][..., 0].T + s[f"{p}.3.bias"]


def reference_forward(s: dict, points: torch.Tensor, groups: int, k: int, heads: int) -> torch.Tensor:
    """Point-BERT's tokens after the final LayerNorm, (B, 1 + groups, D), from ULIP-layout tensors."""
    s = {key[len("module.point_encoder."):]: v for key, v in s.items() if key.startswith("module.point_encoder.")}
    xyz = points[..., :3]
    out = []
    for cloud, pts in zip(xyz, points, strict=True):  # FPS from the first point, then the farthest from the set
        chosen, dist = [0], torch.full((len(cloud),), float("inf"))
        for _ in range(groups - 1):
            dist = torch.minimum(dist, (cloud - cloud[chosen[-1]]).pow(2).sum(-1))
            chosen.append(int(dist.argmax()))
        centre = cloud[chosen]  # (G, 3)
        knn = torch.cdist(centre, cloud).topk(k, largest=False).indices  # (G, K)
        group = torch.cat([pts[knn][..., :3] - centre[:, None], pts[knn][..., 3:]], dim=-1)  # (G, K, C)
        f = _conv_bn_relu_conv(group, s, "encoder.first_conv")  # (G, K, 256)
        f = torch.cat([f.max(1, keepdim=True).values.expand_as(f), f], dim=-1)
        tokens = _conv_bn_relu_conv(f, s, "encoder.second_conv").max(1).values  # (G, encoder_dims)
        tokens = tokens @ s["reduce_dim.weight"].T + s["reduce_dim.bias"]
        h = torch.nn.functional.gelu(centre @ s["pos_embed.0.weight"].T + s["pos_embed.0.bias"])
        pos = torch.cat([s["cls_pos"][0], h @ s["pos_embed.2.weight"].T + s["pos_embed.2.bias"]])
        x = torch.cat([s["cls_token"][0], tokens])  # (1 + G, D)
        d = x.shape[-1]
        i = 0
        while f"blocks.blocks.{i}.norm1.weight" in s:
            b = f"blocks.blocks.{i}"
            x = x + pos
            q, kk, v = (_ln(x, s[f"{b}.norm1.weight"], s[f"{b}.norm1.bias"]) @ s[f"{b}.attn.qkv.weight"].T).split(d, -1)
            q, kk, v = (t.reshape(-1, heads, d // heads).transpose(0, 1) for t in (q, kk, v))
            att = torch.softmax(q @ kk.transpose(-1, -2) / math.sqrt(d // heads), -1) @ v
            x = x + att.transpose(0, 1).reshape(-1, d) @ s[f"{b}.attn.proj.weight"].T + s[f"{b}.attn.proj.bias"]
            h = _ln(x, s[f"{b}.norm2.weight"], s[f"{b}.norm2.bias"])
            h = h @ s[f"{b}.mlp.fc1.weight"].T + s[f"{b}.mlp.fc1.bias"]
            h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
            x = x + h @ s[f"{b}.mlp.fc2.weight"].T + s[f"{b}.mlp.fc2.bias"]
            i += 1
        out.append(_ln(x, s["norm.weight"], s["norm.bias"]))
    return torch.stack(out)


def _clouds(n: int = 2) -> torch.Tensor:
    rng = np.random.default_rng(5)
    xyz = rng.standard_normal((n, 256, 3)).astype(np.float32)
    xyz /= np.linalg.norm(xyz, axis=-1, keepdims=True)
    rgb = rng.random((n, 256, 3)).astype(np.float32)
    return torch.from_numpy(np.concatenate([xyz, rgb], axis=-1))


def test_converter_loads_ulip_layout_with_nothing_missing(ctx, tmp_path) -> None:
    from safetensors.torch import save_file

    from mmhub.importers.convert_ulip_pointbert import convert_ulip_pointbert

    state = ulip_state()
    converted, settings, set_aside = convert_ulip_pointbert(state, num_heads=4)
    assert sorted(set_aside) == ["module.logit_scale", "module.open_clip_model.positional_embedding",
                                 "module.pc_projection"]
    assert settings == {"in_channels": 6, "encoder_dims": 48, "trans_dim": 32, "depth": 2, "num_heads": 4}
    enc, facts = build({**TINY, **settings}, ctx)
    missing, unexpected = enc.load_state_dict(converted, strict=False)
    assert not missing and not unexpected
    save_file({k: v.contiguous() for k, v in converted.items()}, str(tmp_path / "pb.safetensors"))
    loaded, _ = build({**TINY, "pretrained": str(tmp_path / "pb.safetensors")}, ctx, seed=7)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, converted[k]), k
    assert facts.tokens_per_item == 17 and facts.out_dim == 32  # CLS + 16 groups
    cloud = np.concatenate([sample_item("points"), np.random.default_rng(0).random((512, 3))], 1).astype(np.float32)
    with torch.no_grad():
        assert loaded(torch.stack([loaded.preprocess(cloud, "points")] * 2), "points").shape == (2, 17, 32)
    pooled, pfacts = build({**TINY, "output": "pooled", "pretrained": str(tmp_path / "pb.safetensors")}, ctx)
    assert pfacts.tokens_per_item == 1 and pfacts.out_dim == 64  # ULIP's feature: [CLS; max over groups]
    with pytest.raises(WeightsNotFoundError, match=r"blocks\.blocks\.1\.norm2\.bias"):
        broken = dict(state)
        del broken["module.point_encoder.blocks.blocks.1.norm2.bias"]
        convert_ulip_pointbert(broken, num_heads=4)


def test_point_bert_matches_the_paper_equations(ctx) -> None:
    from mmhub.importers.convert_ulip_pointbert import convert_ulip_pointbert

    state = ulip_state(seed=2)
    converted, settings, _ = convert_ulip_pointbert(state, num_heads=4)
    enc, _ = build({**TINY, **settings}, ctx)
    enc.load_state_dict(converted)
    points = _clouds()
    with torch.no_grad():
        got = enc(points, "points")
        want = reference_forward(state, points, groups=16, k=8, heads=4)
        diff = (got - want).abs().max().item()
        assert diff < 1e-5, diff
        pooled, _ = build({**TINY, **settings, "output": "pooled"}, ctx)
        pooled.load_state_dict(converted)
        ulip = torch.cat([want[:, 0], want[:, 1:].max(1).values], dim=-1)[:, None]
        diff_p = (pooled(points, "points") - ulip).abs().max().item()
        assert diff_p < 1e-5, diff_p
    print(f"point_bert vs equations: tokens max |diff| {diff:.2e}; pooled {diff_p:.2e}")
