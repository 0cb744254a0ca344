"""mmhub.attention: the backends agree, masks behave, and the backend choice/fallbacks are right."""

from __future__ import annotations

import sys
import types

import pytest
import torch

import mmhub.attention as attn
from mmhub.attention import AttentionBackendError, MultiheadAttention, attention, select_backend

CUDA = torch.device("cuda")  # a device object only: nothing runs on it in the mocked tests
CPU = torch.device("cpu")


def qkv(B: int = 2, h: int = 3, Lq: int = 5, Lk: int = 7, d: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, h, L, d, generator=g) for L in (Lq, Lk, Lk))


def reference(q, k, v, mask=None):
    """Plain float64 softmax attention, rows with nothing to attend to -> 0."""
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.nan_to_num(scores.softmax(-1), nan=0.0)
    return (probs @ v).float()


def masks(B: int = 2, h: int = 3, Lq: int = 5, Lk: int = 7) -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(1)
    key_pad = torch.ones(B, 1, 1, Lk, dtype=torch.bool)
    key_pad[0, ..., 4:] = False
    full = torch.rand(B, h, Lq, Lk, generator=g) > 0.4
    full[..., 0] = True  # no empty row here
    empty_row = full.clone()
    empty_row[1, 2, 3] = False  # one query row of one head attends to nothing
    empty_sample = key_pad.clone()
    empty_sample[1] = False  # every key of sample 1 masked
    return {"none": None, "key_padding": key_pad, "full": full, "empty_row": empty_row, "empty_sample": empty_sample}


@pytest.mark.parametrize("mask_name", list(masks()))
@pytest.mark.parametrize("backend", ["eager", "sdpa", "auto"])
def test_backends_match_reference(backend: str, mask_name: str) -> None:
    q, k, v = qkv()
    mask = masks()[mask_name]
    out = attention(q, k, v, mask, backend)
    assert out.shape == q.shape
    torch.testing.assert_close(out, reference(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_eager_and_sdpa_agree_fp32() -> None:
    q, k, v = qkv(B=3, h=4, Lq=9, Lk=13, d=16, seed=3)
    for name, mask in masks(3, 4, 9, 13).items():
        torch.testing.assert_close(attention(q, k, v, mask, "eager"), attention(q, k, v, mask, "sdpa"),
                                   atol=1e-5, rtol=0,
                                   msg=lambda m, name=name: f"mask {name}: {m}")


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_fully_masked_rows_are_zero_with_finite_gradients(backend: str) -> None:
    q, k, v = (t.requires_grad_() for t in qkv())
    mask = masks()["empty_row"]
    out = attention(q, k, v, mask, backend)
    assert torch.equal(out[1, 2, 3], torch.zeros(8))
    assert out.abs().sum(-1).gt(0).sum() == out.shape[0] * out.shape[1] * out.shape[2] - 1  # only that row is zero
    out.square().sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[1, 2, 3], torch.zeros(8))  # the empty row has no influence
    sample = attention(*qkv(), masks()["empty_sample"], backend)
    assert torch.equal(sample[1], torch.zeros_like(sample[1])) and sample[0].abs().sum() > 0


def test_multihead_attention_same_output_under_each_backend() -> None:
    torch.manual_seed(0)
    ref = MultiheadAttention(16, 4, kv_dim=12, backend="eager")
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 7, 12)
    key_mask = torch.ones(2, 7, dtype=torch.bool)
    key_mask[0, 5:] = False
    full_mask = torch.rand(2, 5, 7) > 0.3
    full_mask[0, 1] = False  # an empty row
    runnable = [b for b in ("eager", "sdpa", "auto", "xformers") if b != "xformers" or attn.xformers_runs(CPU)]
    ref_self = MultiheadAttention(16, 4, backend="eager")
    self_mask = torch.ones(2, 5, dtype=torch.bool)
    self_mask[1, 3:] = False
    outs = {}
    for backend in runnable:
        m = MultiheadAttention(16, 4, kv_dim=12, backend=backend)
        m.load_state_dict(ref.state_dict())
        s = MultiheadAttention(16, 4, backend=backend)
        s.load_state_dict(ref_self.state_dict())
        outs[backend] = [m(x, ctx), m(x, ctx, key_mask), m(x, ctx, full_mask), s(x), s(x, mask=self_mask)]
    for backend, got in outs.items():
        for a, b in zip(got, outs["eager"], strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda msg, backend=backend: f"{backend}: {msg}")
    # a masked-out context token has no influence; an empty row gives the output bias only
    changed = ctx.clone()
    changed[0, 5:] = 100.0
    torch.testing.assert_close(ref(x, changed, key_mask), ref(x, ctx, key_mask))
    torch.testing.assert_close(ref(x, ctx, full_mask)[0, 1], ref.out.bias)


def test_multihead_attention_value_feeds_values_only() -> None:
    torch.manual_seed(0)
    m = MultiheadAttention(8, 2, kv_dim=6, backend="eager")
    x, keys, values = torch.randn(2, 3, 8), torch.randn(2, 5, 6), torch.randn(2, 5, 6)
    torch.testing.assert_close(m(x, keys, value=keys), m(x, keys))
    q = m.q(x).view(2, 3, 2, 4).transpose(1, 2)
    k = m.k(keys).view(2, 5, 2, 4).transpose(1, 2)
    v = m.v(values).view(2, 5, 2, 4).transpose(1, 2)
    want = m.out(reference(q, k, v).transpose(1, 2).reshape(2, 3, 8))
    torch.testing.assert_close(m(x, keys, value=values), want, atol=1e-5, rtol=1e-5)


def test_width_not_divisible_by_heads_is_an_error() -> None:
    with pytest.raises(ValueError, match="not divisible by 3 heads"):
        MultiheadAttention(16, 3)


# --- backend selection (availability mocked, never the math) ---------------------------------------------------------

def test_auto_picks_xformers_on_cuda_when_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attn, "xformers_importable", lambda: True)
    assert select_backend("auto", CUDA) == "xformers"
    assert select_backend("xformers", CUDA) == "xformers"


def test_auto_picks_sdpa_on_cpu_and_without_xformers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attn, "xformers_importable", lambda: True)
    assert select_backend("auto", CPU) == "sdpa"
    monkeypatch.setattr(attn, "xformers_importable", lambda: False)
    assert select_backend("auto", CUDA) == "sdpa"
    assert select_backend("auto", CPU) == "sdpa"


def test_auto_on_cpu_gives_the_sdpa_result() -> None:
    q, k, v = qkv()
    mask = masks()["full"]
    assert torch.equal(attention(q, k, v, mask, "auto"), attention(q, k, v, mask, "sdpa"))


def test_explicit_choices_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attn, "xformers_importable", lambda: True)
    for device in (CPU, CUDA):
        assert select_backend("sdpa", device) == "sdpa"
        assert select_backend("eager", device) == "eager"


@pytest.mark.parametrize("importable", [True, False])
def test_explicit_xformers_on_cpu_says_cuda_and_the_fix(monkeypatch: pytest.MonkeyPatch, importable: bool) -> None:
    monkeypatch.setattr(attn, "xformers_importable", lambda: importable)
    with pytest.raises(AttentionBackendError) as info:
        select_backend("xformers", CPU)
    msg = str(info.value)
    assert "CUDA" in msg and "cpu" in msg
    assert "`attention: auto`" in msg and "`attention: sdpa`" in msg
    with pytest.raises(AttentionBackendError, match="CUDA"):
        attention(*qkv(), backend="xformers")


def test_explicit_xformers_on_cuda_without_xformers_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attn, "xformers_importable", lambda: False)
    with pytest.raises(AttentionBackendError, match="not installed or fails to import") as info:
        select_backend("xformers", CUDA)
    assert "`attention: auto`" in str(info.value)


@pytest.mark.parametrize("name", ["flash", "SDPA", "", "xformer"])
def test_unknown_backend_raises(name: str) -> None:
    with pytest.raises(AttentionBackendError, match="unknown attention backend") as info:
        select_backend(name, CPU)
    assert all(b in str(info.value) for b in attn.BACKENDS)
    with pytest.raises(AttentionBackendError):
        attention(*qkv(), backend=name)


def test_auto_falls_back_to_sdpa_when_xformers_has_no_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """An importable xformers without kernels (a build for another torch) raises NotImplementedError:
    `auto` answers with SDPA (and remembers), an explicit `xformers` turns it into an error with the fix."""
    calls = []

    def no_kernel(*args, **kwargs):
        calls.append(1)
        raise NotImplementedError("No operator found for `memory_efficient_attention_forward` with inputs: ...")

    monkeypatch.setattr(attn, "xformers_runs", lambda device: True)
    monkeypatch.setattr(attn, "_xformers", no_kernel)
    monkeypatch.setattr(attn, "_xformers_unsupported", set())
    q, k, v = qkv()
    mask = masks()["key_padding"]
    want = attention(q, k, v, mask, "sdpa")
    assert torch.equal(attention(q, k, v, mask, "auto"), want)
    assert torch.equal(attention(q, k, v, mask, "auto"), want)
    assert len(calls) == 1  # the second call did not try xformers again
    with pytest.raises(AttentionBackendError, match="No operator found") as info:
        attention(q, k, v, mask, "xformers")
    assert "`attention: sdpa`" in str(info.value)


def test_xformers_adapter_layout_and_aligned_bias(monkeypatch: pytest.MonkeyPatch) -> None:
    """`_xformers`' own plumbing on CPU, through a stand-in kernel with xformers' contract:
    (B, L, h, d) inputs and an additive bias whose row stride is a multiple of 8."""
    seen = {}

    def memory_efficient_attention(q, k, v, attn_bias=None, p=0.0):
        seen["bias"] = attn_bias
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # back to (B, h, L, d)
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        if attn_bias is not None:
            scores = scores + attn_bias
        return (scores.softmax(-1) @ v).transpose(1, 2)

    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = memory_efficient_attention  # type: ignore[attr-defined]
    pkg = types.ModuleType("xformers")
    pkg.ops = ops  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "xformers", pkg)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    monkeypatch.setattr(attn, "xformers_runs", lambda device: True)
    q, k, v = qkv()  # Lk = 7: the bias needs padding to 8
    for name, mask in masks().items():
        out = attention(q, k, v, mask, "xformers")
        torch.testing.assert_close(out, reference(q, k, v, mask), atol=1e-5, rtol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")
        if mask is not None:
            bias = seen["bias"]
            assert bias.shape == (2, 3, 5, 7) and bias.stride(-2) % 8 == 0, bias.stride()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="xformers kernels exist for CUDA only")
@pytest.mark.parametrize("mask_name", list(masks()))
def test_xformers_numerics_on_cuda(mask_name: str) -> None:
    if not attn.xformers_runs(CUDA):
        pytest.skip("xformers is not importable here")
    q, k, v = (t.cuda() for t in qkv())
    mask = masks()[mask_name]
    mask = mask.cuda() if mask is not None else None
    want = attention(q, k, v, mask, "eager")
    try:
        got = attention(q, k, v, mask, "xformers")
    except AttentionBackendError as exc:  # importable, but built for another torch/CUDA
        pytest.skip(str(exc))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(attention(q, k, v, mask, "auto"), want, atol=1e-4, rtol=1e-4)
