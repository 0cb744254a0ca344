"""Sequence packing (mmhub.packing + MMModel.forward(segment_ids=...)), length-grouped order and the
xformers attention inside transformers backbones (selection on any machine, numerics on CUDA)."""

from __future__ import annotations

import copy
import logging
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import mmhub.attention as attn
import mmhub.hf_attention as hf_attn
from mmhub import build
from mmhub.errors import InputError
from mmhub.packing import block_causal_mask, collate_packed, length_grouped_order, pack, segment_lengths, spliced_length
from mmhub.processor import Encoded
from mmhub.splice import IGNORE

from conftest import TINY_LLAMA

FAMILIES = {"llama": TINY_LLAMA, "qwen2": {**TINY_LLAMA, "model_type": "qwen2"}}
CONVS = [("<image>\nWhat is it?", "a square", 1), ("Hello there", "hi!", 0), ("Two <image> and <image>?", "no", 2),
         ("Say a longer thing, please, with many words", "ok ok ok ok ok ok", 0), ("x <image>", "y", 1),
         ("Short", "A longer answer than the question.", 0)]


def spec(backbone: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return copy.deepcopy({
        "name": "test-packing",
        "encoders": {"image": {"type": "open_clip", "arch": None, "embed_dim": 32,
                               "vision_cfg": {"image_size": 32, "patch_size": 8, "layers": 2, "width": 32,
                                              "head_width": 16}}},
        "projectors": {"image": {"type": "mlp", "depth": 2}},
        "backbone": {"type": "hf_causal_lm", "config": backbone, "tokenizer": "byte"},
        "template": "chatml",
        "stages": [{"name": "align", "train": {"projectors": "full"}}],
        **extra,
    })


def pictures(n: int = 4) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(n)]


def encode_all(model) -> list[Encoded]:
    imgs, out, used = pictures(), [], 0
    for q, a, n in CONVS:
        media = {"image": imgs[used:used + n]} if n else {}
        used += n
        out.append(model.processor.encode([{"role": "user", "content": q}, {"role": "assistant", "content": a}], media))
    return out


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_model(request):
    torch.manual_seed(0)
    model = build(spec(FAMILIES[request.param]))
    model.requires_grad_(True)
    return model.eval()


@pytest.fixture(scope="module")
def llama_model():
    torch.manual_seed(0)
    return build(spec(TINY_LLAMA)).eval()


def fake(lengths: list[int]) -> list[Encoded]:
    return [Encoded(list(range(1, n + 1)), [IGNORE] * n, {}) for n in lengths]


def n_ids(sample: Encoded) -> int:
    return len(sample.input_ids)


# -- pack / collate_packed -------------------------------------------------------------------------------------------
def test_pack_is_first_fit_decreasing_fits_and_is_deterministic(caplog) -> None:
    lengths = [5, 9, 3, 7, 2, 8, 4, 30, 6]
    samples = fake(lengths)
    with caplog.at_level(logging.WARNING, logger="mmhub.packing"):
        rows = pack(samples, 12, n_ids)
    # longest first: 30 (alone, too long), 9+3, 8+4, 7+5, 6+2
    assert rows == [[7], [1, 2], [5, 6], [0, 3], [4, 8]]
    assert "sample 7 has 30 tokens > max_len 12" in caplog.text
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 12 for r in rows if r != [7])
    assert pack(samples, 12, n_ids) == rows and pack(list(samples), 12, n_ids) == rows
    assert pack(samples, 100, n_ids) == [list(range(len(lengths)))]  # everything fits one row
    with pytest.raises(InputError, match="max_len"):
        pack(samples, 0, n_ids)


def test_spliced_length_counts_media_tokens(llama_model) -> None:
    enc = encode_all(llama_model)
    tokens_of = spliced_length(llama_model)
    for e in enc:
        b = llama_model.processor.collate([e])
        sp = llama_model.prepare_inputs(b["input_ids"], b["attention_mask"], b["labels"], b["media"])
        assert tokens_of(e) == sp.inputs_embeds.shape[1]
    assert tokens_of(enc[2]) == len(enc[2].input_ids) + 2 * (llama_model.plan.tokens_per_item("image") - 1)


def test_collate_packed_segment_ids_tokens_and_media_order(llama_model) -> None:
    enc = encode_all(llama_model)
    rows = [[2, 0], [1], [4, 3, 5]]
    b = collate_packed(llama_model.processor, enc, rows)
    assert b["padding_side"] == "right"
    longest = max(sum(len(enc[i].input_ids) for i in r) for r in rows)
    assert b["input_ids"].shape == b["segment_ids"].shape == b["labels"].shape == (3, longest)
    for row, r in enumerate(rows):
        n = [len(enc[i].input_ids) for i in r]
        expected = sum(([k] * nk for k, nk in enumerate(n)), []) + [-1] * (longest - sum(n))
        assert b["segment_ids"][row].tolist() == expected
        assert b["input_ids"][row, :sum(n)].tolist() == sum((enc[i].input_ids for i in r), [])
        assert b["labels"][row, :sum(n)].tolist() == sum((enc[i].labels for i in r), [])
        assert b["attention_mask"][row].tolist() == [1] * sum(n) + [0] * (longest - sum(n))
        assert (b["labels"][row, sum(n):] == IGNORE).all()
    # media in row-major placeholder order: sample 2's two images, sample 0's, then sample 4's
    order = [t for i in (2, 0, 4) for t in enc[i].media["image"]]
    assert b["media"]["image"].shape[0] == 4
    assert all(torch.equal(x, y) for x, y in zip(b["media"]["image"], order, strict=True))
    with pytest.raises(InputError, match="at most once"):
        collate_packed(llama_model.processor, enc, [[0, 1], [1]])


def test_block_causal_mask_positions_and_segment_lengths(llama_model) -> None:
    seg = torch.tensor([[0, 0, 0, 1, 1, -1], [0, 1, 1, 1, 2, 2]])
    m = block_causal_mask(seg)
    assert m.shape == (2, 1, 6, 6) and m.dtype == torch.bool
    assert m[0, 0].int().tolist() == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                                      [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]]
    assert segment_lengths(seg) == [3, 2, 1, 1, 3, 2]
    # after the splice: media tokens take their placeholder's sample, positions restart per sample
    enc = encode_all(llama_model)
    b = collate_packed(llama_model.processor, enc, [[0, 1]])
    sp = llama_model.prepare_inputs(b["input_ids"], b["attention_mask"], b["labels"], b["media"],
                                    segment_ids=b["segment_ids"])
    n0, n1 = (spliced_length(llama_model)(enc[i]) for i in (0, 1))
    assert sp.segment_ids[0].tolist() == [0] * n0 + [1] * n1
    assert sp.position_ids[0].tolist() == list(range(n0)) + list(range(n1))
    assert int(sp.media_positions[0].sum()) == llama_model.plan.tokens_per_item("image")
    with pytest.raises(InputError, match="right padded"):
        llama_model.prepare_inputs(b["input_ids"], b["attention_mask"], None, b["media"], padding_side="left",
                                   segment_ids=b["segment_ids"])
    interleaved = b["segment_ids"].clone()
    interleaved[0, -3:] = 0  # sample 0 again after sample 1
    with pytest.raises(InputError, match="one run of its id"):
        llama_model(b["input_ids"], b["attention_mask"], b["labels"], b["media"], segment_ids=interleaved)


# -- packed == unpacked ----------------------------------------------------------------------------------------------
def loss_and_grads(model, batch: dict[str, Any]) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.num_target_tokens, grads


def test_packed_loss_and_gradients_equal_the_unpacked_batch(family_model) -> None:
    enc = encode_all(family_model)
    tokens_of = spliced_length(family_model)
    rows = pack(enc, 2 * max(tokens_of(e) for e in enc), tokens_of)
    assert len(rows) < len(enc) and any(len(r) > 1 for r in rows)
    packed = collate_packed(family_model.processor, enc, rows)
    loss_p, n_p, grads_p = loss_and_grads(family_model, packed)
    loss_u, n_u, grads_u = loss_and_grads(family_model, family_model.processor.collate(enc))
    assert n_p == n_u > 0
    torch.testing.assert_close(loss_p, loss_u, atol=1e-5, rtol=0)  # both: mean over the same target tokens
    assert grads_p.keys() == grads_u.keys()
    parts = ("backbone", "projectors")
    assert {f"{part}.{n}" for part in parts for n, _ in getattr(family_model, part).named_parameters()
            } <= grads_u.keys()  # every LM and projector weight, and the encoder's, get gradients
    assert any(n.startswith("encoders.") for n in grads_u)
    for name in grads_u:
        torch.testing.assert_close(grads_p[name], grads_u[name], atol=1e-5, rtol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_each_packed_segment_has_the_logits_of_its_sample_alone(family_model) -> None:
    enc = encode_all(family_model)
    tokens_of = spliced_length(family_model)
    rows = [[0, 1, 2], [3, 4, 5]]
    with torch.no_grad():
        packed = family_model(**collate_packed(family_model.processor, enc, rows)).logits
        for b, r in enumerate(rows):
            at = 0
            for i in r:
                alone = family_model(**family_model.processor.collate([enc[i]])).logits[0]
                n = tokens_of(enc[i])
                assert alone.shape[0] == n
                torch.testing.assert_close(packed[b, at:at + n], alone, atol=1e-4, rtol=1e-4)
                at += n


def test_the_first_token_of_the_next_sample_is_never_a_target(llama_model) -> None:
    """Samples labelled on every token (no template prefix with -100): packing must still not let the last
    token of sample k predict the first token of sample k+1."""
    tok = llama_model.tokenizer
    enc = [Encoded(ids, list(ids), {}) for ids in (tok("abc de")["input_ids"], tok("xyz")["input_ids"],
                                                    tok("hello world")["input_ids"])]
    packed = llama_model(**collate_packed(llama_model.processor, enc, [[0, 1, 2]]))
    unpacked = llama_model(**llama_model.processor.collate(enc))
    assert packed.num_target_tokens == unpacked.num_target_tokens == sum(len(e.input_ids) - 1 for e in enc)
    torch.testing.assert_close(packed.loss, unpacked.loss, atol=1e-5, rtol=0)
    n0, n1 = len(enc[0].input_ids), len(enc[1].input_ids)
    assert packed.labels[0, 0] == packed.labels[0, n0] == packed.labels[0, n0 + n1] == IGNORE


def test_segment_sdpa_equals_sdpa_under_the_block_causal_mask() -> None:
    """Values and gradients of the segment-wise path equal one masked SDPA call: two rows, grouped-query heads
    (8 query heads over 2 key/value heads), a padding run at the end of a row, a one-token segment."""
    torch.manual_seed(0)
    segs = torch.tensor([[0] * 5 + [1] * 7 + [2] + [-1] * 3, [0] * 9 + [1] * 7])
    q = torch.randn(2, 8, 16, 8, requires_grad=True)
    k, v = (torch.randn(2, 2, 16, 8, requires_grad=True) for _ in range(2))
    got = hf_attn.segment_sdpa(q, k, v, segment_lengths(segs), scaling=0.3)  # (B, L, h, d)
    want = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1),
                                                            attn_mask=block_causal_mask(segs),
                                                            scale=0.3).transpose(1, 2)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    g = torch.randn_like(want)
    grads = torch.autograd.grad(got, (q, k, v), g)
    for a, b in zip(grads, torch.autograd.grad(want, (q, k, v), g), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="crosses the end of row 0"):
        hf_attn.segment_sdpa(q, k, v, [20, 12])


def test_one_packed_row_runs_segment_wise_and_equals_the_unpacked_batch(monkeypatch, family_model) -> None:
    """The whole batch packed into a single row (no padding at all): the backbone's attention runs each sample
    as its own causal SDPA call (one per layer), and loss and gradients equal the unpacked batch's."""
    assert family_model.backbone.model.config._attn_implementation == hf_attn.HF_SDPA
    calls: list[int] = []
    real = hf_attn.segment_sdpa
    monkeypatch.setattr(hf_attn, "segment_sdpa", lambda *a, **k: calls.append(len(a[3])) or real(*a, **k))
    enc = encode_all(family_model)
    packed = collate_packed(family_model.processor, enc, [list(range(len(enc)))])
    assert packed["input_ids"].shape[0] == 1 and bool(packed["attention_mask"].all())
    loss_p, n_p, grads_p = loss_and_grads(family_model, packed)
    assert calls == [len(enc)] * family_model.backbone.model.config.num_hidden_layers
    loss_u, n_u, grads_u = loss_and_grads(family_model, family_model.processor.collate(enc))
    assert n_p == n_u > 0
    torch.testing.assert_close(loss_p, loss_u, atol=1e-5, rtol=0)
    for name in grads_u:
        torch.testing.assert_close(grads_p[name], grads_u[name], atol=1e-5, rtol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("packed", [False, True])
def test_the_last_mlp_at_labelled_positions_only_gives_the_full_loss_and_gradients(family_model, packed) -> None:
    """A training forward (no logits returned) runs the last layer's MLP only where a label follows; loss and
    every gradient equal those of the forward that computes all positions (return_logits=True)."""
    enc = encode_all(family_model)
    batch = (collate_packed(family_model.processor, enc, [[0, 1, 2], [3, 4, 5]]) if packed
             else family_model.processor.collate(enc))
    keys = set(family_model.state_dict())
    mlp = family_model.backbone._last_mlp()
    assert mlp is not None and set(family_model.state_dict()) == keys  # found, and not registered a second time
    widths: list[int] = []
    handle = mlp.register_forward_hook(lambda mod, args, out: widths.append(args[0].shape[:2]))
    try:
        family_model.zero_grad(set_to_none=True)
        out = family_model(**batch, return_logits=False)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in family_model.named_parameters() if p.grad is not None}
        full_loss, _, full_grads = loss_and_grads(family_model, batch)
    finally:
        handle.remove()
    rows, length = batch["input_ids"].shape[0], out.labels.shape[1]
    assert widths[0] == (1, out.num_target_tokens) and widths[1] == (rows, length)  # subset, then all positions
    torch.testing.assert_close(out.loss.detach(), full_loss, atol=1e-6, rtol=0)
    assert grads.keys() == full_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], full_grads[name], atol=1e-5, rtol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_eager_attention_takes_the_packed_mask_as_an_additive_bias() -> None:
    torch.manual_seed(0)
    model = build(spec(TINY_LLAMA, attention="eager")).eval()
    assert model.backbone.model.config._attn_implementation == "eager"
    enc = encode_all(model)
    with torch.no_grad():
        packed = model(**collate_packed(model.processor, enc, [[0, 1, 2], [3, 4, 5]]))
        unpacked = model(**model.processor.collate(enc))
    torch.testing.assert_close(packed.loss, unpacked.loss, atol=1e-5, rtol=0)


def test_text_reading_projector_reads_only_its_own_sample_when_packed() -> None:
    torch.manual_seed(0)
    model = build(spec(TINY_LLAMA, projectors={"image": {"type": "qformer", "num_queries": 4, "layers": 2, "width": 32,
                                                         "heads": 4, "cross_attention_every": 1,
                                                         "instruction_aware": True}})).eval()
    enc = encode_all(model)
    rows = [[0, 2, 1], [4, 3, 5]]
    with torch.no_grad():
        packed = model(**collate_packed(model.processor, enc, rows))
        unpacked = model(**model.processor.collate(enc))
    torch.testing.assert_close(packed.loss, unpacked.loss, atol=1e-5, rtol=0)


def test_packing_refuses_encoder_decoder_backbones_and_injectors() -> None:
    t5 = {"model_type": "t5", "d_model": 48, "d_ff": 96, "d_kv": 12, "num_layers": 2, "num_decoder_layers": 2,
          "num_heads": 4, "vocab_size": 300}
    model = build({**spec(TINY_LLAMA), "backbone": {"type": "hf_seq2seq_lm", "config": t5, "tokenizer": "byte"}})
    enc = encode_all(model)[:2]
    b = collate_packed(model.processor, enc, [[0, 1]])
    with pytest.raises(InputError, match="packing .* not supported with an encoder-decoder backbone"):
        model(**b)
    model = build(spec(TINY_LLAMA, injectors={"xattn": {"type": "gated_xattn", "modalities": ["image"], "every": 1}}))
    b = collate_packed(model.processor, encode_all(model)[:2], [[0, 1]])
    with pytest.raises(InputError, match="not supported with injectors \\(xattn"):
        model(**b)


# -- length-grouped order --------------------------------------------------------------------------------------------
def test_length_grouped_order_is_a_seeded_permutation_of_homogeneous_batches() -> None:
    rng = np.random.default_rng(1)
    lengths = rng.integers(32, 257, 1000).tolist()
    order = length_grouped_order(lengths, batch_size=8, seed=3, mega_batch=10)
    assert sorted(order) == list(range(1000))
    assert order == length_grouped_order(lengths, 8, 3, 10) and order != length_grouped_order(lengths, 8, 4, 10)
    for start in range(0, 1000, 80):  # each mega-batch is sorted, longest first
        mega = [lengths[i] for i in order[start:start + 80]]
        assert mega == sorted(mega, reverse=True)

    def spread(o: list[int]) -> float:  # mean (longest - shortest) within a batch of 8
        return float(np.mean([np.ptp([lengths[i] for i in o[s:s + 8]]) for s in range(0, len(o), 8)]))

    assert spread(order) < 0.2 * spread(rng.permutation(1000).tolist())
    assert length_grouped_order([], 4, 0) == []


# -- xformers inside the transformers backbone -----------------------------------------------------------------------
def test_hf_attn_implementation_picks_mmhub_xformers_where_it_can_run(monkeypatch) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    monkeypatch.setattr(attn, "xformers_importable", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert hf_attn.hf_attn_implementation("auto") == hf_attn.HF_XFORMERS
    assert AttentionInterface._global_mapping[hf_attn.HF_XFORMERS] is hf_attn.hf_xformers_attention
    assert hf_attn.HF_XFORMERS in AttentionMaskInterface._global_mapping
    assert hf_attn.hf_attn_implementation("xformers") == hf_attn.HF_XFORMERS
    assert hf_attn.hf_attn_implementation("sdpa") == "sdpa" and hf_attn.hf_attn_implementation("eager") == "eager"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert hf_attn.hf_attn_implementation("auto") == "sdpa"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(attn, "xformers_importable", lambda: False)
    assert hf_attn.hf_attn_implementation("auto") == "sdpa"


def xformers_spec_pair() -> tuple[Any, Any]:
    """The same weights under `attention: xformers` and `attention: sdpa`."""
    torch.manual_seed(0)
    x = build(spec(TINY_LLAMA, attention="xformers")).eval()
    s = build(spec(TINY_LLAMA, attention="sdpa")).eval()
    s.load_state_dict(x.state_dict())
    assert x.backbone.model.config._attn_implementation == hf_attn.HF_XFORMERS
    return x, s


def test_mmhub_xformers_falls_back_to_sdpa_where_xformers_cannot_run(monkeypatch) -> None:
    x, s = xformers_spec_pair()
    enc = encode_all(x)
    packed = collate_packed(x.processor, enc, [[0, 1, 2], [3, 4, 5]])
    with torch.no_grad():
        ref = s(**packed).loss
        torch.testing.assert_close(x(**packed).loss, ref, atol=1e-6, rtol=0)  # CPU tensors: SDPA runs
        # availability mocked: the real xformers call on CPU tensors finds no operator -> SDPA, remembered
        monkeypatch.setattr(attn, "xformers_runs", lambda device: True)
        monkeypatch.setattr(attn, "_xformers_unsupported", set())
        torch.testing.assert_close(x(**packed).loss, ref, atol=1e-6, rtol=0)
    assert ("cpu", torch.float32, TINY_LLAMA["hidden_size"] // TINY_LLAMA["num_attention_heads"], True) \
        in attn._xformers_unsupported


def test_mmhub_xformers_layout_and_biases_with_a_reference_kernel(monkeypatch) -> None:
    """Everything of the xformers path but the CUDA kernel, on CPU: the kernel is replaced by plain softmax
    attention over the bias xformers would get (materialised), so head layout, grouped-query heads, scale,
    the packed BlockDiagonalCausalMask and the padding/causal biases are checked against SDPA."""
    xops = pytest.importorskip("xformers.ops")
    from xformers.ops.fmha.attn_bias import AttentionBias, BlockDiagonalCausalMask

    biases: list[str] = []

    def kernel(q, k, v, attn_bias=None, p=0.0, scale=None):  # (B, L, h, d), like xformers
        B, Lq, h, d = q.shape
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * (d ** -0.5 if scale is None else scale)
        if isinstance(attn_bias, AttentionBias):
            scores = scores + attn_bias.materialize((B, h, Lq, k.shape[1]), dtype=q.dtype, device=q.device)
        elif attn_bias is not None:
            scores = scores + attn_bias
        biases.append(type(attn_bias).__name__)
        return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)

    monkeypatch.setattr(xops, "memory_efficient_attention", kernel)
    monkeypatch.setattr(attn, "xformers_runs", lambda device: True)
    x, s = xformers_spec_pair()
    enc = encode_all(x)
    packed = collate_packed(x.processor, enc, [[0, 1, 2], [3, 4, 5]])
    unpacked = x.processor.collate(enc)
    with torch.no_grad():
        torch.testing.assert_close(x(**packed).logits, s(**packed).logits, atol=1e-4, rtol=1e-4)
        assert set(biases) == {BlockDiagonalCausalMask.__name__} and len(biases) == TINY_LLAMA["num_hidden_layers"]
        biases.clear()
        torch.testing.assert_close(x(**unpacked).loss, s(**unpacked).loss, atol=1e-5, rtol=0)
        assert set(biases) == {"Tensor"}  # right padding: transformers' SDPA-style mask as an additive bias
        biases.clear()
        one = x.processor.collate(enc[1:2])  # no padding: no mask, a causal bias
        torch.testing.assert_close(x(**one).loss, s(**one).loss, atol=1e-5, rtol=0)
        assert set(biases) == {"LowerTriangularMask"}
        # generation: left-padded prefill (padding rows attend to nothing) then one query over the KV cache
        prompts = x.batch(["<image> hi", "a longer prompt here"], [{"image": pictures(1)}, {}],
                          add_generation_prompt=True, padding_side="left")
        args = (prompts["input_ids"], prompts["attention_mask"], prompts["media"])
        assert x.generate_ids(*args, max_new_tokens=4) == s.generate_ids(*args, max_new_tokens=4)


def test_packed_seqlens_give_xformers_the_same_block_diagonal_mask() -> None:
    pytest.importorskip("xformers.ops")
    from xformers.ops.fmha.attn_bias import BlockDiagonalCausalMask

    seg = torch.tensor([[0, 0, 0, 1, 1, -1, -1], [0, 1, 1, 1, 1, 2, 2]])
    B, L = seg.shape
    dense = BlockDiagonalCausalMask.from_seqlens(segment_lengths(seg)).materialize((B * L, B * L))
    ours = torch.block_diag(*block_causal_mask(seg)[:, 0])
    assert torch.equal(dense == 0, ours)


@pytest.mark.skipif(not (torch.cuda.is_available() and attn.xformers_runs(torch.device("cuda"))),
                    reason="xformers kernels need CUDA")
def test_xformers_in_the_backbone_matches_sdpa_on_cuda() -> None:
    x, s = xformers_spec_pair()
    x, s = x.cuda(), s.cuda()
    enc = encode_all(x)
    packed = collate_packed(x.processor, enc, [[0, 1, 2], [3, 4, 5]])
    unpacked = x.processor.collate(enc)
    with torch.no_grad():
        for batch in (packed, unpacked):
            torch.testing.assert_close(x(**batch).loss, s(**batch).loss, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(x(**batch).logits, s(**batch).logits, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(x(**packed).loss, s(**unpacked).loss, atol=1e-4, rtol=1e-4)
    assert not any(k[0] == "cuda" for k in attn._xformers_unsupported)  # the kernels ran, no fallback


def test_the_fallback_block_mask_is_the_packed_rows_mask() -> None:
    """Packed rows under mmhub's SDPA attention carry no (L, L) mask (their segments run one by one); where that
    attention must fall back to the masked kernel it rebuilds the block-diagonal causal mask from the segment
    lengths, which must be exactly the one packing builds."""
    from mmhub.hf_attention import block_mask
    from mmhub.packing import block_causal_mask, segment_lengths

    segment_ids = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1], [3, 3, 3, 3, 4, 4, 4, -1]])
    seqlens = segment_lengths(segment_ids)
    assert torch.equal(block_mask(seqlens, 2, 8, "cpu"), block_causal_mask(segment_ids))
