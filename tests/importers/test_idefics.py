"""IDEFICS parity: mmhub's perceiver (layout idefics) and gated_xattn (layout idefics) against transformers' own
IDEFICS modules, then the whole imported model against ``IdeficsForVisionText2Text`` on the processor's inputs."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import IdeficsConfig
from transformers.models.idefics.modeling_idefics import IdeficsGatedCrossAttentionLayer
from transformers.models.idefics.perceiver import IdeficsPerceiverResampler

from mmhub.backbones.gated_xattn import GatedXAttnConfig, IdeficsGatedLayer
from mmhub.importers.idefics import gated_state, perceiver_state
from mmhub.importers.run import load_strict
from mmhub.interfaces import BuildContext
from mmhub.projectors.perceiver import PerceiverConfig, PerceiverProjector

VISION = 24  # vision width (the resampler's and the cross-attention keys'), != the LM's 32
HIDDEN = 32


def tiny_config(**over: Any) -> IdeficsConfig:
    """A shrunk IDEFICS: byte vocabulary (261) + 2 additional rows, LM 32 wide, tower 24 wide on 28 px images."""
    perceiver = {"use_resampler": True, "resampler_n_latents": 3, "resampler_depth": 2, "resampler_n_heads": 2,
                 "resampler_head_dim": 8, "qk_layer_norms_perceiver": over.pop("qk_perceiver", False)}
    settings = dict(vocab_size=261, additional_vocab_size=2, hidden_size=HIDDEN, intermediate_size=64,
                    num_hidden_layers=2, num_attention_heads=4, cross_layer_interval=1, use_resampler=True,
                    max_position_embeddings=128, pad_token_id=258, bos_token_id=256, eos_token_id=257,
                    vision_config={"embed_dim": VISION, "image_size": 28, "patch_size": 14, "num_hidden_layers": 2,
                                   "num_attention_heads": 2, "intermediate_size": 48},
                    perceiver_config=perceiver)
    settings.update(over)
    return IdeficsConfig(**settings)


def perturb(module: torch.nn.Module, std: float = 0.3, seed: int = 0) -> None:
    """Move every parameter away from its initialisation (gates off zero, norms off one), so parity means something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def ctx() -> BuildContext:
    return BuildContext(resolve=lambda uri: uri, attention="auto")


# --- components ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("qk_norm", [False, True])
def test_perceiver_idefics_layout_equals_idefics_resampler(qk_norm: bool) -> None:
    cfg = tiny_config(qk_perceiver=qk_norm)
    p = cfg.perceiver_config
    torch.manual_seed(0)
    ref = IdeficsPerceiverResampler(cfg, VISION, p.resampler_depth, p.resampler_n_heads, p.resampler_head_dim,
                                    p.resampler_n_latents).eval()
    perturb(ref)
    ours = PerceiverProjector(PerceiverConfig(in_dim=VISION, out_dim=VISION, layout="idefics", num_latents=3,
                                              depth=2, heads=2, head_dim=8, ff_mult=4, qk_norm=qk_norm), ctx()).eval()
    load_strict(ours, perceiver_state(ref.state_dict()), "perceiver")
    x = torch.randn(3, 5, VISION, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = ref(x), ours(x)
    assert got.shape == (3, 3, VISION)
    diff = float((got - want).abs().max())
    assert diff <= 1e-5, f"perceiver (qk_norm={qk_norm}) max abs diff {diff:.3g} > 1e-5"


def idefics_masks(index: torch.Tensor, valid: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What IdeficsModel.forward builds from the processor's image_attention_mask: the additive (B, 1, L, M*T) mask
    and the cross_attention_gate (B, L)."""
    M = valid.shape[1]
    onehot = torch.nn.functional.one_hot(index.clamp(min=0), M) * (index >= 0)[..., None]
    onehot = onehot * valid[:, None, :]
    expanded = onehot[..., None].expand(-1, -1, -1, T).reshape(*onehot.shape[:2], -1)
    additive = torch.where(expanded[:, None].bool(), torch.tensor(0.0), torch.finfo(torch.float32).min)
    gate = (additive == 0.0).any(dim=-1).float().squeeze(1)
    return additive, gate


@pytest.mark.parametrize(("alpha_type", "qk_norm"), [("float", False), ("vector", True)])
def test_gated_layer_idefics_layout_equals_idefics_layer(alpha_type: str, qk_norm: bool) -> None:
    cfg = tiny_config(alpha_type=alpha_type, qk_layer_norms=qk_norm)
    torch.manual_seed(0)
    ref = IdeficsGatedCrossAttentionLayer(cfg, layer_idx=0).eval()
    perturb(ref)
    settings = GatedXAttnConfig(dim=HIDDEN, num_layers=2, heads=4, layout="idefics", kv_dim=VISION, ff_dim=64,
                                activation="silu", norm_eps=cfg.rms_norm_eps, qk_norm=qk_norm, gate=alpha_type)
    ours = IdeficsGatedLayer(settings, "auto").eval()
    state = gated_state({f"0.{k}": v for k, v in ref.state_dict().items()})
    load_strict(ours, {k[len("layers.0."):]: v for k, v in state.items()}, "gated layer")
    g = torch.Generator().manual_seed(2)
    B, L, M, T = 2, 7, 2, 3
    x = torch.randn(B, L, HIDDEN, generator=g)
    media = torch.randn(B, M, T, VISION, generator=g)
    # row 0: two text tokens before any image, then image 0, then image 1; row 1 has only one real image
    index = torch.tensor([[-1, -1, 0, 0, 1, 1, 1], [-1, 0, 0, 0, 0, 0, 0]])
    valid = torch.tensor([[True, True], [True, False]])
    additive, gate = idefics_masks(index, valid, T)
    with torch.no_grad():
        want = ref(x, None, media.reshape(B, M * T, VISION), image_attention_mask=additive,
                   cross_attention_gate=gate)
        got = ours(x, media, valid, index, only_immediate=True)
    diff = float((got - want).abs().max())
    assert diff <= 1e-5, f"gated layer ({alpha_type}, qk_norm={qk_norm}) max abs diff {diff:.3g} > 1e-5"
    # tokens with no image get no cross-attention update, only the gated MLP
    assert not torch.allclose(got[0, :2], x[0, :2])
