"""The input-projector library's distinctive behaviour (the shared contract runs in test_components.py)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from mmhub.attention import AttentionBackendError
from mmhub.interfaces import BuildContext, Projector, TextContext
from mmhub.projectors.cross_attn_resampler import sincos_2d
from mmhub.registry import get_registry

IN, OUT = 8, 12
REG = get_registry()
NEW = ["qformer", "perceiver", "cross_attn_resampler", "token_merge", "pformer", "c_abstractor", "ldp"]
TINY: dict[str, dict[str, Any]] = {
    "qformer": {"num_queries": 32, "layers": 2, "width": 16, "heads": 2, "cross_attention_every": 2},
    "perceiver": {"num_latents": 5, "depth": 2, "width": 16, "heads": 2, "ff_mult": 2},
    "cross_attn_resampler": {"num_queries": 4, "width": 16, "heads": 2},
    "token_merge": {"merge": 4},
    "pformer": {"num_queries": 3, "layers": 2, "width": 16, "heads": 2, "pformer_layers": 1, "pformer_width": 8,
                "pformer_heads": 2},
    "c_abstractor": {"num_queries": 4, "width": 8, "depth": 1},
    "ldp": {},
}


def build(name: str, attention: str = "auto", seed: int = 0, in_dim: int = IN, **settings: Any) -> Projector:
    cls = REG.get("projector", name).cls
    config = cls.Config.model_validate({**TINY[name], **settings, "in_dim": in_dim, "out_dim": OUT})
    torch.manual_seed(seed)
    return cls(config, BuildContext(resolve=lambda uri: uri, attention=attention))  # type: ignore[return-value]


def feats(tokens: int, n: int = 2, seed: int = 0, dim: int = IN) -> torch.Tensor:
    return torch.randn(n, tokens, dim, generator=torch.Generator().manual_seed(seed))


def text(n: int = 2, seed: int = 0, target: bool = True) -> TextContext:
    g = torch.Generator().manual_seed(seed)
    imask = torch.ones(n, 6, dtype=torch.bool)
    imask[0, 4:] = False  # item 0's instruction is 4 tokens, right-padded
    tmask = torch.ones(n, 3, dtype=torch.bool)
    return TextContext(torch.randn(n, 6, OUT, generator=g), imask,
                       torch.randn(n, 3, OUT, generator=g) if target else None, tmask if target else None)


def out_of(proj: Projector, x: torch.Tensor, t: TextContext | None = None) -> torch.Tensor:
    out = proj(x, t)
    assert out.shape == (x.shape[0], type(proj).num_tokens(proj.config, x.shape[1]), OUT)
    assert torch.isfinite(out).all()
    return out


# --- qformer ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tokens", [16, 49, 1])
def test_qformer_outputs_num_queries_whatever_the_input(tokens: int) -> None:
    proj = build("qformer").eval()
    assert out_of(proj, feats(tokens)).shape == (2, 32, OUT)
    assert type(proj).num_tokens(proj.config, tokens) == 32
    with pytest.raises(ValueError, match="at least 1 input token.*got 0"):
        type(proj).num_tokens(proj.config, 0)


@pytest.mark.parametrize("layers,every,expected", [(4, 1, [0, 1, 2, 3]), (4, 2, [0, 2]), (5, 2, [0, 2, 4]),
                                                   (6, 3, [0, 3]), (3, 5, [0])])
def test_qformer_cross_attention_every_kth_layer(layers: int, every: int, expected: list[int]) -> None:
    proj = build("qformer", layers=layers, cross_attention_every=every)
    blocks = proj.qformer.blocks  # type: ignore[union-attr]
    assert [i for i, b in enumerate(blocks) if b.has_cross_attention] == expected
    assert sum(b.cross_attn is not None for b in blocks) == math.ceil(layers / every)
    cross_params = [n for n, _ in proj.named_parameters() if ".cross_attn." in n]
    assert {int(n.split(".")[2]) for n in cross_params} == set(expected)
    # the queries do read the features
    proj.eval()
    assert not torch.allclose(proj(feats(16, seed=0)), proj(feats(16, seed=1)))


def test_qformer_instruction_aware_reads_the_instruction() -> None:
    proj = build("qformer", instruction_aware=True).eval()
    assert type(proj).uses_text is True and proj.uses_text is True
    x, t = feats(16), text()
    other = TextContext(t.instruction + torch.randn_like(t.instruction), t.instruction_mask)
    a, b = out_of(proj, x, t), out_of(proj, x, other)
    assert not torch.allclose(a[0], b[0], atol=1e-4) and not torch.allclose(a[1], b[1], atol=1e-4)
    with pytest.raises(ValueError, match="instruction_aware: true"):
        proj(x, None)


def test_qformer_ignores_text_when_not_instruction_aware() -> None:
    proj = build("qformer", instruction_aware=False).eval()
    assert proj.uses_text is False  # per instance; the class may still be handed text
    assert not any(n.startswith("qformer.text_in") for n, _ in proj.named_parameters())
    x, t = feats(16), text()
    other = TextContext(torch.randn_like(t.instruction), t.instruction_mask)
    assert torch.equal(proj(x, t), proj(x, other))
    assert torch.equal(proj(x, t), proj(x, None))


def test_qformer_padded_instruction_tokens_have_no_effect() -> None:
    proj = build("qformer", instruction_aware=True).eval()
    x, t = feats(16), text()
    base = proj(x, t)
    # change what sits in the padded slots of item 0
    noisy = t.instruction.clone()
    noisy[0, 4:] = 50 * torch.randn(2, OUT)
    torch.testing.assert_close(proj(x, TextContext(noisy, t.instruction_mask)), base, atol=1e-5, rtol=1e-5)
    # more padding at the end
    longer = torch.cat([t.instruction, torch.randn(2, 3, OUT)], 1)
    longer_mask = torch.cat([t.instruction_mask, torch.zeros(2, 3, dtype=torch.bool)], 1)
    torch.testing.assert_close(proj(x, TextContext(longer, longer_mask)), base, atol=1e-5, rtol=1e-5)
    # left padding instead of right padding: same real tokens, same positions
    left = t.instruction.clone()
    left[0] = torch.cat([torch.randn(2, OUT), t.instruction[0, :4]])
    left_mask = t.instruction_mask.clone()
    left_mask[0] = torch.tensor([False, False, True, True, True, True])
    torch.testing.assert_close(proj(x, TextContext(left, left_mask)), base, atol=1e-5, rtol=1e-5)
    # an item whose instruction is all padding equals the same item with no instruction tokens at all
    empty_mask = t.instruction_mask.clone()
    empty_mask[1] = False
    only_queries = proj(x, TextContext(t.instruction, empty_mask))[1]
    torch.testing.assert_close(proj(x[1:], TextContext(t.instruction[1:, :0], empty_mask[1:, :0]))[0], only_queries,
                               atol=1e-5, rtol=1e-5)


# --- perceiver -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tokens", [1, 7, 16, 50])
def test_perceiver_outputs_num_latents_for_any_length(tokens: int) -> None:
    proj = build("perceiver").eval()
    assert out_of(proj, feats(tokens)).shape == (2, 5, OUT)


def test_perceiver_position_embeddings_bound_the_input() -> None:
    proj = build("perceiver", max_input_tokens=8).eval()
    assert out_of(proj, feats(8)).shape == (2, 5, OUT)
    x = feats(8)
    assert not torch.allclose(proj(x), proj(x.flip(1)))  # positions make token order matter
    with pytest.raises(ValueError, match="max_input_tokens=8.*gets 9.*max_input_tokens: 9"):
        type(proj).num_tokens(proj.config, 9)
    with pytest.raises(ValueError, match="gets 9"):
        proj(feats(9))
    plain = build("perceiver").eval()  # without them, the latents see a set
    torch.testing.assert_close(plain(x), plain(x.flip(1)), atol=1e-5, rtol=1e-5)


# --- cross_attn_resampler --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tokens", [50, 15, 2])
def test_cross_attn_resampler_rejects_non_square_counts(tokens: int) -> None:
    proj = build("cross_attn_resampler")
    with pytest.raises(ValueError, match=rf"\b{tokens} is not a perfect square") as info:
        type(proj).num_tokens(proj.config, tokens)
    assert "fix:" in str(info.value)
    with pytest.raises(ValueError, match=rf"\b{tokens}\b"):
        proj(feats(tokens))


@pytest.mark.parametrize("tokens", [1, 16, 49, 64])
def test_cross_attn_resampler_outputs_num_queries(tokens: int) -> None:
    assert out_of(build("cross_attn_resampler").eval(), feats(tokens)).shape == (2, 4, OUT)


def test_cross_attn_resampler_settings_are_checked() -> None:
    cls = REG.get("projector", "cross_attn_resampler").cls
    with pytest.raises(ValidationError, match="num_queries 10 is not a perfect square"):
        cls.Config.model_validate({"num_queries": 10})
    with pytest.raises(ValidationError, match="width 18 is not divisible by 4"):
        cls.Config.model_validate({"width": 18})


def test_cross_attn_resampler_is_position_aware() -> None:
    proj = build("cross_attn_resampler").eval()
    x = feats(16)
    assert not torch.allclose(proj(x), proj(x.flip(1)), atol=1e-4)  # keys carry their grid position
    # keys on a grid the size of the query grid get exactly the queries' embeddings
    torch.testing.assert_close(sincos_2d(2, 16, scale=1.0), proj.query_pos)
    # a coarser key grid is measured in query-grid units: its cell centres sit between query cells
    coarse = sincos_2d(1, 16, scale=2.0)[0]  # one key cell covering the 2x2 query grid: its centre is at 0.5
    angles = [0.5 / 10000 ** (k / 4) for k in range(4)]
    row = torch.tensor([math.sin(a) for a in angles] + [math.cos(a) for a in angles])
    torch.testing.assert_close(coarse, torch.cat([row, row]))


# --- token_merge -----------------------------------------------------------------------------------------------------

def test_token_merge_equals_concat_and_matmul() -> None:
    proj = build("token_merge", merge=4).eval()
    x = feats(8, dim=IN)
    W, b = proj.proj.weight, proj.proj.bias  # type: ignore[union-attr]
    want = torch.stack([torch.stack([torch.cat([x[n, 4 * g + j] for j in range(4)]) @ W.T + b for g in range(2)])
                        for n in range(2)])
    torch.testing.assert_close(out_of(proj, x), want)


def test_token_merge_indivisible_count() -> None:
    proj = build("token_merge", merge=4)
    with pytest.raises(ValueError, match=r"10 input tokens are not divisible by merge=4.*pad: true"):
        type(proj).num_tokens(proj.config, 10)
    with pytest.raises(ValueError, match="10"):
        proj(feats(10))
    padded = build("token_merge", merge=4, pad=True).eval()
    x = feats(10)
    out = out_of(padded, x)
    assert out.shape == (2, 3, OUT)
    W, b = padded.proj.weight, padded.proj.bias  # type: ignore[union-attr]
    last = torch.cat([x[:, 8], x[:, 9], torch.zeros(2, IN), torch.zeros(2, IN)], -1) @ W.T + b
    torch.testing.assert_close(out[:, 2], last)


# --- pformer ---------------------------------------------------------------------------------------------------------

def test_pformer_aux_loss_with_target_trains_the_qformer_only() -> None:
    proj = build("pformer").train()
    assert proj.uses_text is True
    out = out_of(proj, feats(16), text(target=True))
    loss = proj.aux_loss  # type: ignore[attr-defined]
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    qformer_grads = [p.grad for n, p in proj.named_parameters() if n.startswith(("qformer.", "proj."))]
    assert qformer_grads and all(g is not None and torch.isfinite(g).all() for g in qformer_grads)
    assert proj.qformer.queries.grad.abs().sum() > 0  # type: ignore[union-attr]
    # stop-gradient on the P-Former side (it is the frozen teacher)
    assert all(p.grad is None for n, p in proj.named_parameters() if n.startswith("pformer"))
    assert out.shape == (2, 3, OUT)


def test_pformer_aux_loss_is_none_without_target() -> None:
    proj = build("pformer").eval()
    proj(feats(16), text(target=True))
    assert proj.aux_loss is not None  # type: ignore[attr-defined]
    proj(feats(16), text(target=False))
    assert proj.aux_loss is None  # type: ignore[attr-defined]
    proj(feats(16), None)
    assert proj.aux_loss is None  # type: ignore[attr-defined]
    t = text(target=True)
    proj(feats(16), TextContext(t.instruction, t.instruction_mask, t.target, torch.zeros_like(t.target_mask)))
    assert proj.aux_loss is None  # type: ignore[attr-defined]  # no real target token anywhere


def test_pformer_loss_is_the_weighted_distance_to_the_reference_prompt() -> None:
    x, t = feats(16), text(target=True)
    proj = build("pformer", align_weight=2.5).eval()
    out = proj(x, t)
    ref = proj.reference_prompt(t.target, t.target_mask)  # type: ignore[operator]
    torch.testing.assert_close(proj.aux_loss, 2.5 * (out - ref).square().mean())  # type: ignore[attr-defined]
    cos = build("pformer", align_loss="cosine").eval()
    out = cos(x, t)
    ref = cos.reference_prompt(t.target, t.target_mask)  # type: ignore[operator]
    want = (1 - torch.nn.functional.cosine_similarity(out, ref, dim=-1)).mean()
    torch.testing.assert_close(cos.aux_loss, want)  # type: ignore[attr-defined]
    # items without target tokens are left out of the mean
    mask = t.target_mask.clone()
    mask[1] = False
    proj(x, TextContext(t.instruction, t.instruction_mask, t.target, mask))
    ref0 = proj.reference_prompt(t.target[:1], mask[:1])  # type: ignore[operator]
    torch.testing.assert_close(proj.aux_loss, 2.5 * (out_of(proj, x)[0] - ref0[0]).square().mean())  # type: ignore[attr-defined]
    # inference output is the Q-Former + linear alone: the same with or without a target
    torch.testing.assert_close(proj(x, t), proj(x, None))


# --- c_abstractor / ldp ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tokens", [16, 64, 576])
def test_c_abstractor_token_counts(tokens: int) -> None:
    proj = build("c_abstractor", num_queries=64, width=4, in_dim=4).eval()
    assert type(proj).num_tokens(proj.config, tokens) == 64
    assert out_of(proj, feats(tokens, n=1, dim=4)).shape == (1, 64, OUT)


def test_c_abstractor_rejects_bad_counts() -> None:
    proj = build("c_abstractor")
    with pytest.raises(ValueError, match="50 is not a perfect square"):
        type(proj).num_tokens(proj.config, 50)
    with pytest.raises(ValueError, match="50 is not a perfect square"):
        proj(feats(50))
    with pytest.raises(ValidationError, match="num_queries 60 is not a perfect square"):
        type(proj).Config.model_validate({"num_queries": 60})
    fixed = build("c_abstractor", input_tokens=16).eval()
    assert out_of(fixed, feats(16)).shape == (2, 4, OUT)
    with pytest.raises(ValueError, match="input_tokens=16 tokens but gets 64; fix: set input_tokens: 64"):
        fixed(feats(64))


@pytest.mark.parametrize("tokens,expected", [(16, 4), (64, 16), (576, 144), (49, 16), (1, 1)])
def test_ldp_token_counts(tokens: int, expected: int) -> None:
    proj = build("ldp").eval()
    assert type(proj).num_tokens(proj.config, tokens) == expected
    assert out_of(proj, feats(tokens, n=1)).shape == (1, expected, OUT)


def test_ldp_rejects_non_square_counts() -> None:
    proj = build("ldp")
    with pytest.raises(ValueError, match=r"577 is not a perfect square \(nearest: 576 \(24x24\) or 625"):
        type(proj).num_tokens(proj.config, 577)


# --- all of them -----------------------------------------------------------------------------------------------------

# parameters that legitimately get no gradient from a loss on the output (documented in the module docstrings)
# P-Former: stop-gradient, a frozen teacher in this phase (its contrastive head and temperature serve the
# language-only phase only)
NO_GRAD = {"pformer": ("pformer.", "pformer_proj.", "pformer_contrast.", "pformer_temp")}


@pytest.mark.parametrize("name,settings", [(n, {}) for n in NEW] + [("qformer", {"instruction_aware": True}),
                                                                    ("perceiver", {"max_input_tokens": 16}),
                                                                    ("c_abstractor", {"input_tokens": 16})],
                         ids=lambda v: v if isinstance(v, str) else ",".join(v) or "defaults")
def test_gradients_reach_every_parameter(name: str, settings: dict[str, Any]) -> None:
    proj = build(name, **settings).train()
    out = proj(feats(16), text() if type(proj).uses_text else None)
    loss = (out * torch.randn_like(out)).sum()
    if getattr(proj, "aux_loss", None) is not None:
        loss = loss + proj.aux_loss  # type: ignore[operator]
    loss.backward()
    skip = NO_GRAD.get(name, ())
    missing = [n for n, p in proj.named_parameters() if p.grad is None and not n.startswith(skip)]
    zero = [n for n, p in proj.named_parameters() if p.grad is not None and not p.grad.abs().sum() > 0]
    assert not missing, f"{name}: no gradient for {missing}"
    assert not zero, f"{name}: all-zero gradient for {zero}"
    assert all(torch.isfinite(p.grad).all() for p in proj.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", ["qformer", "perceiver", "cross_attn_resampler", "pformer"])
def test_attention_projectors_use_the_spec_backend(name: str) -> None:
    x, t = feats(16), text()
    settings = {"instruction_aware": True} if name == "qformer" else {}
    eager = build(name, attention="eager", **settings).eval()
    sdpa = build(name, attention="sdpa", **settings).eval()
    torch.testing.assert_close(eager(x, t), sdpa(x, t), atol=1e-5, rtol=1e-5)
    with pytest.raises(AttentionBackendError, match="CUDA"):  # the choice reaches mmhub.attention
        build(name, attention="xformers", **settings)(x, t)


@pytest.mark.parametrize("name", NEW)
def test_metadata_and_docs(name: str) -> None:
    cls = REG.get("projector", name).cls
    import importlib

    module = importlib.import_module(cls.__module__)
    assert "used by" in (module.__doc__ or "").lower(), f"{name}: the module docstring names no system using it"
    assert cls.modalities_in == ("features",) and cls.modalities_out == ("embeddings",)
    assert cls.summary() and cls.tokens_doc and cls.out_dim_doc
    assert REG.get("projector", name).plugin == "mmhub.projectors"
