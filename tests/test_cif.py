"""Continuous Integrate-and-Fire (Dong & Xu 2020) and the ``cif`` projector (X-LLM's C-Former).

The equations, written out step by step as the paper states them (`reference_cif`): each frame u brings a weight
alpha_u; while the accumulated weight stays under the threshold beta the frame's features are added with weight
alpha_u; when it would reach beta, the part alpha_u1 = beta - accumulated completes the current token, which fires
(its integrated features are emitted), and the rest alpha_u2 = alpha_u - alpha_u1 starts the next one (firing again
while the rest still reaches beta). In training the weights are scaled by target_length / sum(alpha) first. At
inference a remainder above the tail threshold (0.5) fires one last token.
"""

from __future__ import annotations

import pytest
import torch

from mmhub.interfaces import BuildContext
from mmhub.registry import get_registry

REG = get_registry()


def reference_cif(frames: torch.Tensor, alphas: torch.Tensor, beta: float = 1.0,
                  tail: float | None = 0.5) -> torch.Tensor:
    """One item, (T, C) frames and (T,) weights -> (K, C) fired tokens: the paper's sequential loop (float64)."""
    acc, state, fired = 0.0, torch.zeros(frames.shape[1], dtype=torch.float64), []
    for h, a in zip(frames.double(), alphas.double().tolist(), strict=True):
        while acc + a >= beta:  # reaches the threshold: the completing part fires a token
            part = beta - acc
            fired.append(state + part * h)
            a, acc, state = a - part, 0.0, torch.zeros_like(state)
        acc, state = acc + a, state + a * h
    if acc > beta - 1e-4 or (tail is not None and acc > tail):  # short of beta by float rounding only, or the tail
        fired.append(state)
    return torch.stack(fired) if fired else torch.zeros(0, frames.shape[1], dtype=torch.float64)


def _cif():
    from mmhub.projectors.cif import integrate_and_fire, scale_weights

    return integrate_and_fire, scale_weights


def test_hand_computed_example() -> None:
    integrate_and_fire, _ = _cif()
    frames = torch.tensor([[1.0], [2.0], [3.0], [4.0]])[None]
    alphas = torch.tensor([[0.25, 0.875, 0.625, 0.25]])
    # frame 1: acc 0.25, state 0.25 | frame 2: 0.25 + 0.875 >= 1, 0.75 of it completes: fire 0.25 + 0.75*2 = 1.75,
    # the rest 0.125 starts the next (state 0.25) | frame 3: acc 0.75, state 0.25 + 0.625*3 = 2.125 |
    # frame 4: acc reaches 1.0: fire 2.125 + 0.25*4 = 3.125
    tokens, counts = integrate_and_fire(frames, alphas)
    assert counts.tolist() == [2]
    torch.testing.assert_close(tokens, torch.tensor([[[1.75], [3.125]]]), rtol=0, atol=1e-6)
    # a weight above beta (possible after scaling) fires more than once in the same frame
    tokens, counts = integrate_and_fire(torch.tensor([[[1.0], [2.0], [3.0]]]), torch.tensor([[0.5, 2.0, 0.5]]))
    assert counts.tolist() == [3]
    torch.testing.assert_close(tokens, torch.tensor([[[1.5], [2.0], [2.5]]]), rtol=0, atol=1e-6)


def test_tail_fires_only_above_the_tail_threshold() -> None:
    integrate_and_fire, _ = _cif()
    frames = torch.tensor([[[1.0], [2.0], [3.0]]])
    tokens, counts = integrate_and_fire(frames, torch.tensor([[0.5, 0.75, 0.5]]))  # 1 fired + remainder 0.75
    assert counts.tolist() == [2]
    torch.testing.assert_close(tokens, torch.tensor([[[0.5 + 0.5 * 2], [0.25 * 2 + 0.5 * 3]]]), rtol=0, atol=1e-6)
    tokens, counts = integrate_and_fire(frames, torch.tensor([[0.5, 0.75, 0.125]]))  # remainder 0.375: dropped
    assert counts.tolist() == [1] and tokens.shape == (1, 1, 1)


def test_scaling_to_the_target_length() -> None:
    integrate_and_fire, scale_weights = _cif()
    alphas = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.1, 0.2, 0.3, 0.4]])
    scaled = scale_weights(alphas, torch.tensor([1, 3]))
    torch.testing.assert_close(scaled.sum(1), torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(scaled[0], torch.full((4,), 0.25))  # alpha * target / sum(alpha)
    frames = torch.arange(1.0, 5.0)[None, :, None].expand(2, 4, 1)
    tokens, counts = integrate_and_fire(frames, scaled, num_tokens=torch.tensor([1, 3]).max().item())
    assert counts.tolist() == [1, 3]
    torch.testing.assert_close(tokens[0, 0], torch.tensor([2.5]))  # one token: the frames' mean
    assert tokens[0, 1:].abs().sum() == 0  # padded past the item's count


@pytest.mark.parametrize("seed", range(4))
def test_parallel_integration_equals_the_sequential_equations(seed: int) -> None:
    integrate_and_fire, scale_weights = _cif()
    g = torch.Generator().manual_seed(seed)
    frames = torch.randn(3, 23, 5, generator=g)
    alphas = torch.sigmoid(torch.randn(3, 23, generator=g) * 2)
    for beta in (1.0, 0.7):
        tokens, counts = integrate_and_fire(frames, alphas, threshold=beta)
        for i in range(3):
            want = reference_cif(frames[i], alphas[i], beta)
            assert counts[i].item() == want.shape[0]
            torch.testing.assert_close(tokens[i, :want.shape[0]].double(), want, rtol=1e-5, atol=1e-5)
    scaled = scale_weights(alphas, torch.tensor([7, 9, 30]))  # 30 > 23 frames: weights above 1, several fires
    tokens, counts = integrate_and_fire(frames, scaled, num_tokens=30)
    assert counts.tolist() == [7, 9, 30] and tokens.shape == (3, 30, 5)
    for i in range(3):
        want = reference_cif(frames[i], scaled[i], 1.0, tail=None)
        torch.testing.assert_close(tokens[i, :counts[i]].double(), want, rtol=1e-5, atol=1e-5)


def _projector(**settings):
    cls = REG.get("projector", "cif").cls
    config = cls.Config.model_validate({"num_tokens": 4, "layers": 1, "width": 16, "heads": 2, "in_dim": 8,
                                        "out_dim": 12, **settings})
    torch.manual_seed(0)
    return cls(config, BuildContext(resolve=lambda uri: uri))


def test_cif_projector_fires_num_tokens_from_sigmoid_weights_and_trains() -> None:
    proj = _projector(quantity_loss=1.0)
    assert type(proj).num_tokens(proj.config, 40) == 4
    feats = torch.randn(2, 40, 8, generator=torch.Generator().manual_seed(0))
    alphas = proj.weights(feats)
    assert alphas.shape == (2, 40) and bool(((alphas > 0) & (alphas < 1)).all())  # a sigmoid per frame
    out = proj(feats)
    assert out.shape == (2, 4, 12) and torch.isfinite(out).all()
    # the quantity loss |sum(alpha) - num_tokens| (the paper's L_qua, target length = num_tokens)
    torch.testing.assert_close(proj.aux_loss, (alphas.sum(1) - 4).abs().mean())
    (out.square().mean() + proj.aux_loss).backward()
    assert proj.predictor.out.weight.grad is not None and proj.predictor.out.weight.grad.abs().sum() > 0
    proj.eval()
    with torch.no_grad():
        assert proj(feats[:, :13]).shape == (2, 4, 12)  # any frame count gives num_tokens tokens
        assert proj.aux_loss is None


def test_cif_projector_tokens_are_the_integrated_frames() -> None:
    """The transformer after CIF reads exactly the fired tokens of the scaled sigmoid weights."""
    proj = _projector().eval()
    feats = torch.randn(1, 10, 8, generator=torch.Generator().manual_seed(1))
    seen = []
    proj.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        proj(feats)
        alphas = proj.weights(feats)[0]
        want = reference_cif(feats[0], alphas * 4 / alphas.sum(), 1.0, tail=None)
    assert want.shape[0] == 4
    torch.testing.assert_close(seen[0][0].double(), proj.into_width(want.float()).double(), rtol=1e-5, atol=1e-5)


def test_x_llm_audio_projector_is_the_cif_c_former() -> None:
    for size in ("tiny", "full"):
        info = REG.presets[f"x-llm:{size}"]
        assert info.spec["projectors"]["audio"]["type"] == "cif", size
        assert "mmhub does not build" not in info.status and "Q-Former stands in" not in info.status, info.status
    # what still differs is said: the fixed token count
    assert "always fires num_tokens tokens per item" in REG.presets["x-llm:full"].status
