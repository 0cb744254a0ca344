"""MiniGPT-4: a state dict with MiniGPT-4's own key names (LAVIS layout: visual_encoder, ln_vision, query_tokens,
Qformer.bert, llama_proj, llama_model) at tiny width converts to mmhub parts with no missing or unexpected keys, and
computes what the BLIP-2 path computes: transformers' Blip2ForConditionalGeneration loaded with transformers' own
BLIP-2 conversion renames, and mmhub's blip_2 import of that folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipImageProcessor,
    LlamaConfig,
    LlamaForCausalLM,
)

from mmhub.errors import CheckpointError
from mmhub.importers import import_checkpoint
from mmhub.importers.minigpt4 import convert_minigpt4, minigpt4_parts
from mmhub.testing.tiny_blip import lm_tokenizer

D, PATCH, IMAGE, DEPTH, MLP, VHEADS = 32, 8, 32, 2, 37, 2  # the EVA tower
W, QLAYERS, EVERY, QMLP, QHEADS, Q, BERT_VOCAB = 32, 3, 2, 44, 4, 4, 50  # the Q-Former
LLAMA = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 256}
TOL = 1e-5


def lavis_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under MiniGPT-4's official names and shapes (tiny widths), BLIP-2 leftovers included."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.2

    def norm(prefix: str, width: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": 1 + r(width), f"{prefix}.bias": r(width)}

    def linear(prefix: str, out: int, inp: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": r(out, inp), f"{prefix}.bias": r(out)}

    n = (IMAGE // PATCH) ** 2
    s = {"visual_encoder.cls_token": r(1, 1, D), "visual_encoder.pos_embed": r(1, n + 1, D),
         "visual_encoder.patch_embed.proj.weight": r(D, 3, PATCH, PATCH), "visual_encoder.patch_embed.proj.bias": r(D),
         **norm("ln_vision", D), "query_tokens": r(1, Q, W), **linear("llama_proj", LLAMA["hidden_size"], W),
         **norm("Qformer.bert.embeddings.LayerNorm", W),
         "Qformer.bert.embeddings.word_embeddings.weight": r(BERT_VOCAB, W),
         "Qformer.bert.embeddings.position_embeddings.weight": r(64, W),
         "Qformer.bert.embeddings.position_ids": torch.arange(64)[None], "Qformer.cls.predictions.bias": r(BERT_VOCAB),
         **linear("vision_proj", 16, W), **linear("text_proj", 16, W), **linear("itm_head", 2, W),
         "temp": torch.tensor(0.07)}
    for i in range(DEPTH):
        b = f"visual_encoder.blocks.{i}"
        s |= {**norm(f"{b}.norm1", D), **norm(f"{b}.norm2", D), f"{b}.attn.qkv.weight": r(3 * D, D),
              f"{b}.attn.q_bias": r(D), f"{b}.attn.v_bias": r(D), **linear(f"{b}.attn.proj", D, D),
              **linear(f"{b}.mlp.fc1", MLP, D), **linear(f"{b}.mlp.fc2", D, MLP)}
    for i in range(QLAYERS):
        b = f"Qformer.bert.encoder.layer.{i}"
        parts = ["attention"] + (["crossattention"] if i % EVERY == 0 else [])
        for part in parts:
            kv = D if part == "crossattention" else W
            s |= {**linear(f"{b}.{part}.self.query", W, W), **linear(f"{b}.{part}.self.key", W, kv),
                  **linear(f"{b}.{part}.self.value", W, kv), **linear(f"{b}.{part}.output.dense", W, W),
                  **norm(f"{b}.{part}.output.LayerNorm", W)}
        for suffix in ("", "_query"):  # the text FFN (BLIP-2 pre-training only) and the query FFN
            s |= {**linear(f"{b}.intermediate{suffix}.dense", QMLP, W), **linear(f"{b}.output{suffix}.dense", W, QMLP),
                  **norm(f"{b}.output{suffix}.LayerNorm", W)}
    torch.manual_seed(seed)
    llama = LlamaForCausalLM(LlamaConfig(**LLAMA))
    s |= {f"llama_model.{k}": v.detach().clone() + r(*v.shape) for k, v in llama.state_dict().items()}
    return s


def transformers_blip2_state(lavis: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' own BLIP-2 conversion (convert_blip_2_original_to_pytorch: its rename table, ``Qformer.bert`` ->
    ``qformer``, ``self`` -> ``attention``), the q/v biases fused into the qkv bias as transformers' model holds them,
    llama_proj/llama_model as language_projection/language_model; text-side pre-training parts left out."""
    out = {"vision_model.embeddings.class_embedding": lavis["visual_encoder.cls_token"],
           "vision_model.embeddings.position_embedding": lavis["visual_encoder.pos_embed"],
           "vision_model.embeddings.patch_embedding.weight": lavis["visual_encoder.patch_embed.proj.weight"],
           "vision_model.embeddings.patch_embedding.bias": lavis["visual_encoder.patch_embed.proj.bias"],
           "vision_model.post_layernorm.weight": lavis["ln_vision.weight"],
           "vision_model.post_layernorm.bias": lavis["ln_vision.bias"],
           "qformer.layernorm.weight": lavis["Qformer.bert.embeddings.LayerNorm.weight"],
           "qformer.layernorm.bias": lavis["Qformer.bert.embeddings.LayerNorm.bias"],
           "query_tokens": lavis["query_tokens"]}
    names = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
             "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for i in range(DEPTH):
        for src, dst in names.items():
            for leaf in ("weight", "bias"):
                key = f"visual_encoder.blocks.{i}.{src}.{leaf}"
                if key in lavis:
                    out[f"vision_model.encoder.layers.{i}.{dst}.{leaf}"] = lavis[key]
        q, v = lavis[f"visual_encoder.blocks.{i}.attn.q_bias"], lavis[f"visual_encoder.blocks.{i}.attn.v_bias"]
        out[f"vision_model.encoder.layers.{i}.self_attn.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
    for key, val in lavis.items():
        if key.startswith("Qformer.bert.encoder.") and ".intermediate." not in key and ".output." not in key.replace(
                "attention.output.", ""):
            out[key.replace("Qformer.bert", "qformer").replace("self", "attention")] = val
        elif key.startswith("llama_proj."):
            out[key.replace("llama_proj", "language_projection")] = val
        elif key.startswith("llama_model."):
            out[key.replace("llama_model", "language_model")] = val
    return out


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return lavis_state()


@pytest.fixture(scope="module")
def reference(state, tmp_path_factory) -> tuple[Blip2ForConditionalGeneration, Path]:
    """transformers' BLIP-2 holding the same weights (strict load), saved with a processor for the blip_2 import."""
    tok = lm_tokenizer("llama")
    config = Blip2Config(
        vision_config={"hidden_size": D, "intermediate_size": MLP, "num_hidden_layers": DEPTH,
                       "num_attention_heads": VHEADS, "image_size": IMAGE, "patch_size": PATCH},
        qformer_config={"hidden_size": W, "intermediate_size": QMLP, "num_hidden_layers": QLAYERS,
                        "num_attention_heads": QHEADS, "cross_attention_frequency": EVERY, "encoder_hidden_size": D},
        text_config={"model_type": "llama", **LLAMA, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                     "pad_token_id": tok.pad_token_id},
        num_query_tokens=Q, image_token_index=tok.convert_tokens_to_ids("<image>"))
    hf = Blip2ForConditionalGeneration(config)
    hf.load_state_dict(transformers_blip2_state(state), strict=True)
    hf.eval()
    folder = tmp_path_factory.mktemp("blip2-from-minigpt4")
    hf.save_pretrained(folder)
    Blip2Processor(BlipImageProcessor(size={"height": IMAGE, "width": IMAGE}), tok, num_query_tokens=Q).save_pretrained(
        folder)
    return hf, folder


def test_minigpt4_keys_all_placed_and_loaded_strictly(state) -> None:
    """Every tensor is placed or named as dropped, and each part loads with no missing or unexpected key (the loads
    are strict: `convert_minigpt4` raises otherwise)."""
    imported = minigpt4_parts(state, text_config=LLAMA, vision_heads=VHEADS, qformer_heads=QHEADS)
    assert set(imported.weights) == {"encoders.image.model", "projectors.image", "backbone.model"}
    model = convert_minigpt4(state, text_config=LLAMA, vision_heads=VHEADS, qformer_heads=QHEADS)
    assert model.plan.tokens_per_item("image") == Q
    assert model.projectors["image"].proj.weight.shape == (LLAMA["hidden_size"], W)
    assert any("dropped" in note for note in model.import_notes)
    with pytest.raises(CheckpointError, match="no place"):
        minigpt4_parts({**state, "visual_encoder.head.weight": torch.zeros(2, D)}, text_config=LLAMA,
                       vision_heads=VHEADS, qformer_heads=QHEADS)
    with pytest.raises(CheckpointError, match="llama_model"):
        minigpt4_parts({k: v for k, v in state.items() if not k.startswith("llama_model.")}, vision_heads=VHEADS,
                       qformer_heads=QHEADS)


def test_minigpt4_equals_the_blip2_path(state, reference) -> None:
    hf, folder = reference
    ours = convert_minigpt4(state, text_config=LLAMA, vision_heads=VHEADS, qformer_heads=QHEADS)
    via_blip2 = import_checkpoint(folder)
    pixels = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = hf.get_image_features(pixels).pooler_output
        mine = ours.encode_media({"image": pixels})[0]["image"]
        blip2 = via_blip2.encode_media({"image": pixels})[0]["image"]
    diff = float((mine - theirs).abs().max())
    assert diff <= TOL, f"MiniGPT-4 visual tokens vs transformers' BLIP-2: max abs diff {diff:.3g} > {TOL}"
    assert torch.equal(mine, blip2), "the MiniGPT-4 conversion and the blip_2 import differ"
    ours_lm, blip2_lm = ours.backbone.model.state_dict(), via_blip2.backbone.model.state_dict()
    assert ours_lm.keys() == blip2_lm.keys() and all(torch.equal(ours_lm[k], blip2_lm[k]) for k in ours_lm)
