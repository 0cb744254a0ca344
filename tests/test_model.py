"""Assembly: splicing, labels, loss, placeholder checks and generation (greedy, sampling, batched)."""

from __future__ import annotations

import pytest
import torch

from mmhub import build
from mmhub.errors import InputError
from mmhub.generation import uses_own_loop
from mmhub.splice import IGNORE, splice


def conv(q: str, a: str) -> list[dict]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def test_splice_places_media_rows_and_masks_labels() -> None:
    # ids: 7 = <image>, 8 = <audio>; two rows, right padded
    ids = torch.tensor([[1, 7, 2, 8, 3], [4, 7, 7, 5, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    labels = ids.clone()
    text = torch.arange(2 * 5, dtype=torch.float).view(2, 5, 1).expand(2, 5, 3).clone()
    img = torch.full((3, 2, 3), -1.0)
    img[1] = -2.0
    img[2] = -3.0
    aud = torch.full((1, 3, 3), -9.0)
    sp = splice(ids, text, mask, labels, {7: img, 8: aud})
    assert sp.inputs_embeds.shape == (2, 3 + 2 + 3, 3)  # row 0: 3 text + 2 image + 3 audio tokens
    assert sp.inputs_embeds[0, :, 0].tolist() == [0, -1, -1, 2, -9, -9, -9, 4]
    assert sp.attention_mask[0].tolist() == [1] * 8
    # row 1: text, two images, text, its own padding token, then new padding
    assert sp.inputs_embeds[1, :, 0].tolist() == [5, -2, -2, -3, -3, 8, 9, 0]
    assert sp.attention_mask[1].tolist() == [1] * 6 + [0, 0]
    assert sp.labels[0].tolist() == [1, IGNORE, IGNORE, 2, IGNORE, IGNORE, IGNORE, 3]
    assert sp.labels[1].tolist() == [4, IGNORE, IGNORE, IGNORE, IGNORE, 5, 0, IGNORE]
    assert sp.position_ids[1].tolist()[:6] == [0, 1, 2, 3, 4, 5]


def test_splice_left_padding_keeps_prompts_right_aligned() -> None:
    ids = torch.tensor([[0, 1, 7], [1, 2, 3]])  # row 0 grows to 5 positions, row 1 stays 3
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    text = torch.ones(2, 3, 2)
    sp = splice(ids, text, mask, None, {7: torch.zeros(1, 3, 2)}, padding_side="left")
    assert sp.attention_mask.tolist() == [[0, 1, 1, 1, 1], [0, 0, 1, 1, 1]]  # new padding goes on the left
    assert sp.position_ids.tolist() == [[0, 0, 1, 2, 3], [0, 0, 0, 1, 2]]
    assert sp.inputs_embeds[0, 2:, 0].tolist() == [0, 0, 0] and sp.inputs_embeds[1, 2:, 0].tolist() == [1, 1, 1]


def test_splice_count_mismatch_says_both_numbers() -> None:
    ids = torch.tensor([[1, 7, 7]])
    with pytest.raises(InputError, match=r"2 placeholder\(s\).*1 item\(s\)"):
        splice(ids, torch.zeros(1, 3, 2), torch.ones(1, 3), None, {7: torch.zeros(1, 2, 2)}, names={7: "<image>"})


def test_sample_placeholder_mismatch_names_sample_and_numbers(tiny_spec, images) -> None:
    model = build(tiny_spec)
    with pytest.raises(InputError, match=r"sample 1 has 2 <image> placeholder\(s\) but 1 image item\(s\)"):
        model.batch([conv("<image> hi", "a"), conv("<image><image> hi", "b")],
                    [{"image": [images[0]]}, {"image": [images[1]]}])
    with pytest.raises(InputError, match="takes image"):
        model.batch(["hi"], [{"audio": [b"x"]}])


def test_forward_loss_only_on_assistant_tokens(tiny_spec, images) -> None:
    model = build(tiny_spec)
    b = model.batch([conv("<image>\nWhat is it?", "a square"), conv("Two <image> and <image>?", "no")],
                    [{"image": [images[0]]}, {"image": images[1:3]}])
    out = model(**b)
    tok = model.tokenizer
    # targets are exactly the replies plus the end-of-turn marker
    for row, reply in zip(out.labels, ["a square", "no"], strict=True):
        kept = [t for t in row.tolist() if t != IGNORE]
        assert tok.decode(kept) == reply + "<|im_end|>\n"
    assert out.logits.shape[:2] == out.labels.shape
    assert torch.isfinite(out.loss)
    assert out.num_target_tokens == len("a square<|im_end|>\n") - len("<|im_end|>") + 1 + 2 + 1 + 1
    # the loss equals plain cross-entropy over the full logits
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    ref = torch.nn.functional.cross_entropy(logits, out.labels[:, 1:].reshape(-1), ignore_index=IGNORE)
    assert torch.allclose(out.loss, ref, atol=1e-5)


def test_images_change_the_output(tiny_spec, images) -> None:
    model = build(tiny_spec)
    a = model(**model.batch([conv("<image>", "x")], [{"image": [images[0]]}])).loss
    b = model(**model.batch([conv("<image>", "x")], [{"image": [images[1]]}])).loss
    assert not torch.isclose(a, b)


def test_gradients_reach_the_projector(tiny_spec, images) -> None:
    model = build(tiny_spec)
    model.projectors.requires_grad_(True)
    out = model(**model.batch([conv("<image>", "x")], [{"image": [images[0]]}]), return_logits=False)
    out.loss.backward()
    grads = [p.grad for p in model.projectors.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert out.logits is None


def test_batched_generation_equals_one_by_one(tiny_spec, images) -> None:
    model = build(tiny_spec)
    prompts = ["<image>\nWhat?", "hello there, how are you doing today?", "<image> and <image> compare"]
    media = [{"image": [images[0]]}, {}, {"image": images[1:3]}]
    batched = model.generate(prompts, media, max_new_tokens=6)
    single = [model.generate([p], [m], max_new_tokens=6)[0] for p, m in zip(prompts, media, strict=True)]
    assert batched == single
    assert len({r.text for r in batched}) > 1  # the prompts really lead to different outputs


def test_own_decode_loop_equals_transformers_generate(tiny_spec, images) -> None:
    """Greedy tokens from mmhub's decode loop equal the backbone's `generate` (the path other settings take),
    batched and left-padded, and ``min_new_tokens`` holds the stop tokens back."""
    model = build(tiny_spec)
    b = model.batch(["<image>\nWhat?", "hello there, how are you doing today?"], [{"image": [images[0]]}, {}],
                    add_generation_prompt=True, padding_side="left")
    args = (b["input_ids"], b["attention_mask"], b["media"])
    assert uses_own_loop(model, {"max_new_tokens": 8})
    own = model.generate_ids(*args, max_new_tokens=8)
    hf = model.generate_ids(*args, max_new_tokens=8, repetition_penalty=1.0)  # not a loop setting: generate()
    assert not uses_own_loop(model, {"max_new_tokens": 8, "repetition_penalty": 1.0})
    assert own == hf and all(len(r) > 0 for r in own)
    stop = model.stop_token_ids()
    with torch.no_grad():  # make a stop token the certain choice: only min_new_tokens keeps the reply going
        bias = model.backbone.model.get_output_embeddings()
        bias.bias = torch.nn.Parameter(torch.zeros(bias.weight.shape[0]))
        bias.bias[stop[0]] = 1e4
    assert model.generate_ids(*args, max_new_tokens=8) == [[], []]
    assert [len(r) for r in model.generate_ids(*args, max_new_tokens=8, min_new_tokens=5)] == [5, 5]


def test_chunked_cross_entropy_equals_the_whole_loss_and_gradients(tiny_spec, images) -> None:
    tiny_spec["stages"] = []
    whole = build({**tiny_spec, "loss_chunk": 0})
    chunked = build({**tiny_spec, "loss_chunk": 7})
    chunked.load_state_dict(whole.state_dict())
    batch = whole.batch([conv("<image>\nDescribe the picture in a few words.", "A random pattern of colours."),
                         conv("hello there", "hi, how can I help you today?")], [{"image": [images[0]]}, {}])
    results = []
    for model in (whole, chunked):
        model.train()
        model.requires_grad_(True)
        out = model(**batch)
        assert out.num_target_tokens > 7  # more than one chunk
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.loss.detach(), grads))
    (l0, g0), (l1, g1) = results
    assert torch.allclose(l0, l1, atol=1e-6) and g0.keys() == g1.keys() and len(g0) > 0
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-6, rtol=1e-4), n


def test_auto_loss_chunk_chunks_only_large_logits(tiny_spec, images, monkeypatch) -> None:
    """``loss_chunk: auto`` (the default): the loss runs whole while labelled positions x vocabulary stay under
    ``AUTO_CHUNK_FROM``, in ``AUTO_LOSS_CHUNK``-position chunks from there on, with the same loss."""
    import math

    import mmhub.losses as losses
    import mmhub.runtime as runtime

    chunks: list[int] = []
    real = losses.checkpoint
    monkeypatch.setattr(losses, "checkpoint", lambda fn, h, *a, **k: chunks.append(h.shape[0]) or real(fn, h, *a, **k))
    tiny_spec["stages"] = []
    model = build(tiny_spec).train()
    assert model.spec.runtime.loss_chunk == "auto"
    batch = model.batch([conv("<image>\nDescribe the picture in a few words.", "A random pattern of colours."),
                         conv("hello there", "hi, how can I help you today?")], [{"image": [images[0]]}, {}])
    whole = model(**batch)
    assert chunks == []
    monkeypatch.setattr(runtime, "AUTO_CHUNK_FROM", whole.num_target_tokens * model.backbone_vocab_size)  # reached
    monkeypatch.setattr(runtime, "AUTO_LOSS_CHUNK", 7)
    chunked = model(**batch)
    assert len(chunks) == math.ceil(whole.num_target_tokens / 7) and set(chunks[:-1]) == {7}
    assert torch.allclose(whole.loss, chunked.loss, atol=1e-6)
    monkeypatch.setattr(runtime, "AUTO_CHUNK_FROM", whole.num_target_tokens * model.backbone_vocab_size + 1)
    chunks.clear()
    model(**batch)
    assert chunks == []  # one float under the threshold: whole


def test_sampling_is_seeded_and_differs_from_greedy(tiny_spec, images) -> None:
    model = build(tiny_spec)
    args = (["<image> tell"], [{"image": [images[0]]}])
    s1 = model.generate(*args, max_new_tokens=12, do_sample=True, temperature=1.5, seed=3)
    s2 = model.generate(*args, max_new_tokens=12, do_sample=True, temperature=1.5, seed=3)
    s3 = model.generate(*args, max_new_tokens=12, do_sample=True, temperature=1.5, seed=4)
    assert s1 == s2 and (s1 != s3 or s1 != model.generate(*args, max_new_tokens=12))


def test_timm_encoder_spec_with_pooling(tiny_spec, images) -> None:
    tiny_spec["encoders"]["image"] = {"type": "timm", "model": "resnet10t", "image_size": 64, "pool": 2}
    model = build(tiny_spec)
    assert model.plan.tokens_per_item("image") == 4
    out = model(**model.batch([conv("<image>", "x")], [{"image": [images[0]]}]))
    assert torch.isfinite(out.loss)


def test_cached_encoder_features_give_the_same_loss_as_media(tiny_spec, images):
    from mmhub import build

    model = build(tiny_spec)
    conv = [[{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "A cat."}]]
    b = model.batch(conv, [{"image": images[:1]}])
    a = model(b["input_ids"], b["attention_mask"], b["labels"], b["media"])
    feats = model.encode_features(b["media"])
    c = model(b["input_ids"], b["attention_mask"], b["labels"], features=feats)
    assert torch.equal(a.loss, c.loss) and torch.equal(a.logits, c.logits)


def test_runtime_options_sit_under_runtime_and_old_top_level_keys_still_load(tiny_spec) -> None:
    from mmhub.errors import SpecError
    from mmhub.spec import spec_from_dict

    old = spec_from_dict({**tiny_spec, "loss_chunk": 7, "weight_layout": "row"})
    new = spec_from_dict({**tiny_spec, "runtime": {"loss_chunk": 7, "weight_layout": "row"}})
    assert old.runtime == new.runtime and old.runtime.loss_chunk == 7 and old.runtime.labelled_only_mlp
    assert "loss_chunk" not in old.model_dump() and old.model_dump()["runtime"]["weight_layout"] == "row"
    with pytest.raises(SpecError, match="loss_chunk is set twice: 7 at the top level and 5 under runtime; "
                                        "keep only runtime.loss_chunk"):
        spec_from_dict({**tiny_spec, "loss_chunk": 7, "runtime": {"loss_chunk": 5}})


def test_backbone_capabilities_are_declared_with_safe_defaults(tiny_spec) -> None:
    from mmhub.interfaces import Backbone

    assert (Backbone.supports_packing, Backbone.supports_step) == (False, False)
    model = build(tiny_spec)
    bb = model.backbone
    assert bb.supports_packing and bb.supports_step and bb.decoder_start_token_id is None
    assert bb.language_model() is bb.model
    with Backbone.only_at(bb, torch.ones(1, 3, dtype=torch.bool)) as skipped:  # the base default skips nothing
        assert skipped is False
