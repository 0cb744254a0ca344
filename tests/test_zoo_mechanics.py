"""The mechanisms the zoo needs beyond prepending tokens: injectors (Flamingo, CogVLM), encoder-decoder
backbones (BLIP-2 Flan-T5, PaLI-X), RoPE context extension, hf: weight references and shared encoders."""

from __future__ import annotations

import copy

import pytest
import torch

from mmhub import build
from mmhub.errors import SpecError, WeightsNotFoundError
from mmhub.weights import resolve

from conftest import TINY_LLAMA


def _with(spec: dict, **changes) -> dict:
    out = copy.deepcopy(spec)
    out.update(changes)
    return out


def _logits(model, prompt, images):
    b = model.batch([prompt], [{"image": images}] if images else None, add_generation_prompt=True)
    return model(b["input_ids"], b["attention_mask"], None, b["media"]).logits


def test_gated_xattn_keeps_one_marker_per_image_and_starts_as_identity(tiny_spec, images):
    spec = _with(tiny_spec, injectors={"xattn": {"type": "gated_xattn", "modalities": ["image"], "every": 1,
                                                 "heads": 4}})
    model = build(spec)
    assert model.plan.tokens_per_item("image") == 1
    xattn = model.injectors["xattn"]
    assert len(xattn.layers) == TINY_LLAMA["num_hidden_layers"]
    b = model.batch(["<image>\nWhat is it?"], [{"image": images[:1]}], add_generation_prompt=True)
    sp = model.prepare_inputs(b["input_ids"], b["attention_mask"], None, b["media"])
    assert sp.inputs_embeds.shape[1] == b["input_ids"].shape[1]  # the image stays one token long
    # gates start at 0: the picture cannot change the logits yet (only the marker token is there)
    a, c = _logits(model, "<image>\nWhat is it?", images[:1]), _logits(model, "<image>\nWhat is it?", images[1:2])
    assert torch.allclose(a, c, atol=1e-6)
    with torch.no_grad():
        for layer in xattn.layers:
            layer.attn_gate.fill_(1.0)
    a, c = _logits(model, "<image>\nWhat is it?", images[:1]), _logits(model, "<image>\nWhat is it?", images[1:2])
    assert not torch.allclose(a, c, atol=1e-4)
    # tokens before the image attend to nothing: their logits do not depend on the image
    a2, c2 = _logits(model, "Look: <image> now", images[:1]), _logits(model, "Look: <image> now", images[1:2])
    first = model.batch(["Look: <image> now"], [{"image": images[:1]}], add_generation_prompt=True)["input_ids"]
    before = int((first[0] == model.processor.placeholder_ids["image"]).nonzero()[0])
    assert torch.allclose(a2[:, :before], c2[:, :before], atol=1e-6)
    assert not torch.allclose(a2[:, before:], c2[:, before:], atol=1e-4)


def test_gated_xattn_generation_batched_equals_single_and_loss_trains_gates(tiny_spec, images):
    spec = _with(tiny_spec, injectors={"xattn": {"type": "gated_xattn", "modalities": ["image"], "every": 2,
                                                 "heads": 4}})
    model = build(spec)
    with torch.no_grad():
        for layer in model.injectors["xattn"].layers:
            layer.attn_gate.fill_(0.8)
            layer.ff_gate.fill_(0.5)
    prompts = ["<image>\nDescribe.", "Two: <image> and <image>?"]
    media = [{"image": images[:1]}, {"image": images[1:3]}]
    both = model.generate(prompts, media, max_new_tokens=5)
    one = [model.generate([p], [m], max_new_tokens=5)[0] for p, m in zip(prompts, media, strict=True)]
    assert both == one
    model.injectors.requires_grad_(True)
    conv = [[{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "A cat."}]]
    b = model.batch(conv, [{"image": images[:1]}])
    out = model(b["input_ids"], b["attention_mask"], b["labels"], b["media"])
    out.loss.backward()
    assert model.injectors["xattn"].layers[0].attn_gate.grad is not None


def test_visual_experts_route_media_positions_only(tiny_spec, images):
    plain = build(tiny_spec)
    spec = _with(tiny_spec, injectors={"experts": {"type": "visual_expert"}})
    model = build(spec)
    experts = model.injectors["experts"]
    assert len(experts.experts) == TINY_LLAMA["num_hidden_layers"] * 7  # q,k,v,o,gate,up,down per block
    prompt = "<image>\nWhat is it?"
    # experts start as copies of the LM weights: same outputs as the model without them
    assert torch.allclose(_logits(model, prompt, images[:1]), _logits(plain, prompt, images[:1]), atol=1e-5)
    with torch.no_grad():
        for p in experts.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert not torch.allclose(_logits(model, prompt, images[:1]), _logits(plain, prompt, images[:1]), atol=1e-4)
    # text-only inputs never touch the experts
    assert torch.allclose(_logits(model, "Hello there", None), _logits(plain, "Hello there", None), atol=1e-6)
    assert model.generate([prompt], [{"image": images[:1]}], max_new_tokens=4)


def test_injector_checkpoint_roundtrip(tiny_spec, images, tmp_path):
    spec = _with(tiny_spec, injectors={"xattn": {"type": "gated_xattn", "heads": 4},
                                       "experts": {"type": "visual_expert", "layers": [1]}})
    model = build(spec)
    with torch.no_grad():
        for p in model.injectors.parameters():
            p.add_(0.1)
    model.save_pretrained(tmp_path / "m")
    again = type(model).from_pretrained(tmp_path / "m")
    prompt = "<image>\nWhat is it?"
    assert torch.equal(_logits(model, prompt, images[:1]), _logits(again, prompt, images[:1]))


def test_injector_spec_errors(tiny_spec):
    bad = _with(tiny_spec, injectors={"x": {"type": "gated_xattn", "modalities": ["audio"], "heads": 4}})
    with pytest.raises(SpecError, match=r"injectors\.x\.modalities.*'audio', which has no encoder"):
        build(bad)
    bad = _with(tiny_spec, injectors={"x": {"type": "gated_xattn", "heads": 5}})
    with pytest.raises(SpecError, match="hidden size 48 is not divisible by heads 5"):
        build(bad)
    bad = _with(tiny_spec, injectors={"x": {"type": "visual_expert", "layers": [0, 7]}})
    with pytest.raises(SpecError, match=r"layers \[7\] are outside the backbone's 2 blocks"):
        build(bad)
    bad = _with(tiny_spec, injectors={"x": {"type": "visual_expert", "targets": ["nope"]}})
    with pytest.raises(ValueError, match="none of the targets"):
        build(bad)


T5 = {"model_type": "t5", "d_model": 48, "d_ff": 96, "d_kv": 12, "num_layers": 2, "num_decoder_layers": 2,
      "num_heads": 4, "vocab_size": 300, "initializer_factor": 5.0}


def test_encoder_decoder_backbone_takes_media_on_the_encoder_side(tiny_spec, images):
    spec = _with(tiny_spec, backbone={"type": "hf_seq2seq_lm", "config": T5, "tokenizer": "byte"})
    model = build(spec)
    assert model.is_encoder_decoder and model.backbone.model.config.is_encoder_decoder
    conv = [[{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "A red cat."}],
            [{"role": "user", "content": "Hi <image> there"}, {"role": "assistant", "content": "Ok."}]]
    b = model.batch(conv, [{"image": images[:1]}, {"image": images[1:2]}])
    model.projectors.requires_grad_(True)
    out = model(b["input_ids"], b["attention_mask"], b["labels"], b["media"])
    # the decoder targets are exactly the labelled (assistant) tokens of each sample
    for row, labels in zip(out.labels, b["labels"], strict=True):
        assert row[row != -100].tolist() == labels[labels != -100].tolist()
    assert out.logits.shape[:2] == out.labels.shape
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.projectors["image"].net[0].weight.grad.abs().sum() > 0  # gradients reach the media through the encoder
    # the image changes what the decoder predicts
    c = model.batch(conv[:1], [{"image": images[2:3]}])
    other = model(c["input_ids"], c["attention_mask"], c["labels"], c["media"])
    assert not torch.allclose(other.logits[0], out.logits[0, :other.logits.shape[1]], atol=1e-4)
    texts = model.generate(["<image>\nWhat?", "Hello <image>"], [{"image": images[:1]}, {"image": images[1:2]}],
                           max_new_tokens=4)
    assert len(texts) == 2 and all(isinstance(t.text, str) for t in texts)


def test_seq2seq_backbone_rejects_decoder_only_configs(tiny_spec):
    bad = _with(tiny_spec, backbone={"type": "hf_seq2seq_lm", "config": TINY_LLAMA, "tokenizer": "byte"})
    with pytest.raises(SpecError, match="llama is not an encoder-decoder model; use hf_causal_lm"):
        build(bad)


@pytest.mark.parametrize("kind", ["linear", "dynamic", "yarn"])
def test_rope_scaling_extends_the_context(tiny_spec, kind):
    base = build(tiny_spec)
    spec = copy.deepcopy(tiny_spec)
    spec["backbone"]["rope_scaling"] = {"type": kind, "factor": 4.0}
    model = build(spec)
    assert model.plan.backbone_facts.context_length == 4 * TINY_LLAMA["max_position_embeddings"]
    assert model.backbone.model.config.rope_parameters["rope_type"] == kind
    ids = torch.randint(3, 250, (1, 600))
    h = model.backbone(model.backbone.embed(ids), torch.ones_like(ids))
    assert torch.isfinite(h).all()
    if kind == "linear":  # interpolated positions: different outputs from the unscaled model at the same positions
        h0 = base.backbone(base.backbone.embed(ids[:, :64]), torch.ones_like(ids[:, :64]))
        assert not torch.allclose(h[:, :64], h0, atol=1e-4)


def test_rope_scaling_errors(tiny_spec):
    spec = copy.deepcopy(tiny_spec)
    spec["backbone"]["rope_scaling"] = {"type": "ntk", "factor": 2}
    with pytest.raises(SpecError, match=r"backbone\.rope_scaling\.type"):
        build(spec)
    spec["backbone"]["rope_scaling"] = {"type": "linear", "factor": 0.5}
    with pytest.raises(SpecError, match="greater than 1"):
        build(spec)


@pytest.mark.parametrize("config", [
    {"model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2},
    {"model_type": "qwen2_moe", "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
     "shared_expert_intermediate_size": 32},
    {"model_type": "opt", "ffn_dim": 96, "word_embed_proj_dim": 48, "num_attention_heads": 4},
    {"model_type": "qwen2"}, {"model_type": "mistral"}, {"model_type": "phi", "partial_rotary_factor": 0.5},
    {"model_type": "glm", "pad_token_id": 0, "eos_token_id": 1},
], ids=lambda c: c["model_type"])
def test_causal_lm_families_build_and_train(tiny_spec, images, config):
    size = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 512}
    if config["model_type"] == "opt":
        size = {"hidden_size": 48, "num_hidden_layers": 2, "vocab_size": 300, "max_position_embeddings": 512}
    spec = copy.deepcopy(tiny_spec)
    spec["backbone"]["config"] = {**size, **config}
    model = build(spec).eval()
    hf = model.backbone.model
    conv = [[{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "A cat."}]]
    b = model.batch(conv, [{"image": images[:1]}])
    model.backbone.requires_grad_(True)
    out = model(b["input_ids"], b["attention_mask"], b["labels"], b["media"])
    # the spliced sequence through transformers' own causal LM gives the same logits and loss
    sp = model.prepare_inputs(b["input_ids"], b["attention_mask"], b["labels"], b["media"])
    ref = hf(inputs_embeds=sp.inputs_embeds, attention_mask=sp.attention_mask, labels=sp.labels, use_cache=False)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    grads = {n: p.grad for n, p in hf.named_parameters() if ".layers.0." in n}  # the first block learns, and its
    assert sum(float(g.abs().sum()) for g in grads.values() if g is not None) > 0  # router or gate projection too
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "gate" in n)
    moe = config["model_type"] in ("mixtral", "qwen2_moe")
    assert (model.backbone.routing is not None) == moe
    if moe:  # in training the loss includes the router's load-balancing term (tests/test_moe_router_loss.py)
        train = model.train()(b["input_ids"], b["attention_mask"], b["labels"], b["media"])
        assert train.router_loss is not None and float(train.router_loss) > 0
        torch.testing.assert_close(train.loss, out.loss + train.router_loss, rtol=1e-5, atol=1e-5)
        model.eval()
    # greedy generation (mmhub's KV-cached loop) equals argmax decoding by full transformers forwards
    p = model.batch(["<image>\nHi"], [{"image": images[:1]}], add_generation_prompt=True, padding_side="left")
    ours = model.generate_ids(p["input_ids"], p["attention_mask"], p["media"], max_new_tokens=4, min_new_tokens=4)
    banned = set(model.stop_token_ids()) | {i for i in model.processor.placeholder_ids.values() if i < 300}
    embeds = model.prepare_inputs(p["input_ids"], p["attention_mask"], None, p["media"], "left").inputs_embeds
    tokens = []
    with torch.no_grad():
        for _ in range(4):
            logits = hf(inputs_embeds=embeds, use_cache=False).logits[0, -1]
            logits[list(banned)] = float("-inf")
            tokens.append(int(logits.argmax()))
            embeds = torch.cat([embeds, model.backbone.embed(torch.tensor([tokens[-1:]]))], 1)
    assert ours == [tokens]


def test_hf_weight_source_reads_the_local_cache_and_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsNotFoundError, match=r"not in the local Hugging Face cache.*never downloads.*"
                                                   r"huggingface-cli download lmsys/vicuna-7b-v1.5"):
        resolve("hf:lmsys/vicuna-7b-v1.5")
    snap = tmp_path / "models--org--tiny" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (tmp_path / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "models--org--tiny" / "refs" / "main").write_text("abc123")
    assert resolve("hf:org/tiny") == snap
    assert resolve("hf:org/tiny/config.json") == snap / "config.json"
    assert resolve("hf:org/tiny@abc123") == snap


def test_backbone_token_ids_outside_the_vocabulary_are_named(tiny_spec):
    spec = copy.deepcopy(tiny_spec)
    spec["backbone"]["config"] = {**TINY_LLAMA, "pad_token_id": 151329}
    with pytest.raises(SpecError, match=r"pad_token_id 151329 is outside the vocabulary \(0..299\)"):
        build(spec)


def test_shared_encoder_errors(tiny_spec):
    spec = copy.deepcopy(tiny_spec)
    spec["encoders"]["video"] = "image"
    spec["projectors"]["video"] = {"type": "linear"}
    with pytest.raises(SpecError, match=r"encoders\.video.*shares the open_clip encoder of 'image', "
                                        r"which accepts image, "
                                        r"not 'video'"):
        build(spec)
    spec["encoders"]["video"] = "imag"
    with pytest.raises(SpecError, match=r"not an encoder slot of its own.*did you mean 'image'"):
        build(spec)


def test_qlora_quantizes_the_loaded_backbone_and_lora_trains_on_it(tiny_spec, images, tmp_path):
    from peft import LoraConfig, inject_adapter_in_model

    from mmhub.backbones.quantize import is_quantized

    tiny_spec["backbone"]["config"] = {**TINY_LLAMA, "initializer_range": 0.02}  # trained-like scale, not a peaky toy
    plain = build(tiny_spec)
    plain.backbone.model.save_pretrained(tmp_path / "llm")
    spec = copy.deepcopy(tiny_spec)
    spec["backbone"] = {"type": "hf_causal_lm", "source": f"file:{tmp_path / 'llm'}", "tokenizer": "byte",
                        "quantize": "nf4"}
    model = build(spec)
    assert is_quantized(model.backbone.model) and model.backbone.quantized
    head = model.backbone.model.get_output_embeddings()
    assert type(head) is torch.nn.Linear  # the LM head stays in full precision
    prompt = "<image>\nWhat is it?"
    q, ref = _logits(model, "Hello there", None), _logits(plain, "Hello there", None)  # the encoders' seeds differ
    err = float((q - ref).abs().max() / ref.abs().max())
    assert 0 < err < 0.1, err  # 4-bit weights: close to the original, not equal
    inject_adapter_in_model(LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), model.backbone.model)
    for n, p in model.backbone.named_parameters():
        p.requires_grad_("lora_" in n)
    conv = [[{"role": "user", "content": prompt}, {"role": "assistant", "content": "A cat."}]]
    b = model.batch(conv, [{"image": images[:1]}])
    model(b["input_ids"], b["attention_mask"], b["labels"], b["media"]).loss.backward()
    grads = {n: p.grad for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())


def test_qlora_spec_errors(tiny_spec, tmp_path):
    spec = copy.deepcopy(tiny_spec)
    spec["backbone"]["quantize"] = "nf4"
    with pytest.raises(SpecError, match="quantize needs pretrained weights"):
        build(spec)
    build(tiny_spec).backbone.model.save_pretrained(tmp_path / "llm")
    spec["backbone"] = {"type": "hf_causal_lm", "source": f"file:{tmp_path / 'llm'}", "tokenizer": "byte",
                        "quantize": "nf4"}
    spec["stages"] = [{"name": "sft", "train": {"backbone": "full"}}]
    with pytest.raises(SpecError, match=r"stages\[0\]\.train\.backbone.*cannot be trained in full.*QLoRA"):
        build(spec)
