"""mPLUG-Owl (v1) converter: a random state dict with the authors' key names and shapes (the table below is written
by hand from their ``modeling_mplug_owl.py`` module structure at a tiny width) imports into mmhub's hf_vision (CLIP
tower) -> visual_abstractor -> LLaMA with nothing missing or left over, and the image tokens and logits equal the
authors' forward re-implemented below in plain torch."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from mmhub.backbones.byte_tokenizer import byte_tokenizer
from mmhub.errors import CheckpointError
from mmhub.importers import import_checkpoint
from mmhub.importers.convert_mplug_owl import convert_mplug_owl

VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
          "image_size": 28, "patch_size": 14, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-6}
ABSTRACTOR = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 40,
              "layer_norm_eps": 1e-6, "encoder_hidden_size": 32}
TEXT = {"model_type": "llama", "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 320, "max_position_embeddings": 256,
        "bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258, "tie_word_embeddings": False}
QUERIES = 5
CONFIG = {"model_type": "mplug-owl", "architectures": ["MplugOwlForConditionalGeneration"], "num_query_tokens": QUERIES,
          "vision_config": VISION, "visual_abstractor_config": ABSTRACTOR, "text_config": TEXT}


def official_shapes() -> dict[str, tuple[int, ...]]:
    """MplugOwlForConditionalGeneration's vision and abstractor tensors (name -> shape), from the authors' modules."""
    d, f, a = VISION["hidden_size"], VISION["intermediate_size"], ABSTRACTOR["hidden_size"]
    n, p, h = (VISION["image_size"] // VISION["patch_size"]) ** 2, VISION["patch_size"], ABSTRACTOR["intermediate_size"]
    s: dict[str, tuple[int, ...]] = {"vision_model.embeddings.cls_token": (1, 1, d),
                                     "vision_model.embeddings.patch_embed.weight": (d, 3, p, p),
                                     "vision_model.embeddings.position_embedding": (1, n + 1, d),
                                     "vision_model.embeddings.pre_layernorm.weight": (d,),
                                     "vision_model.embeddings.pre_layernorm.bias": (d,),
                                     "vision_model.post_layernorm.weight": (d,),
                                     "vision_model.post_layernorm.bias": (d,), "query_tokens": (1, QUERIES, a),
                                     "abstractor.visual_fc.weight": (TEXT["hidden_size"], a),
                                     "abstractor.visual_fc.bias": (TEXT["hidden_size"],),
                                     "abstractor.vit_eos": (1, 1, TEXT["hidden_size"])}
    for i in range(VISION["num_hidden_layers"]):
        b = f"vision_model.encoder.layers.{i}."
        s |= {f"{b}input_layernorm.weight": (d,), f"{b}input_layernorm.bias": (d,),
              f"{b}self_attn.query_key_value.weight": (3 * d, d), f"{b}self_attn.query_key_value.bias": (3 * d,),
              f"{b}self_attn.dense.weight": (d, d), f"{b}self_attn.dense.bias": (d,),
              f"{b}post_attention_layernorm.weight": (d,), f"{b}post_attention_layernorm.bias": (d,),
              f"{b}mlp.fc1.weight": (f, d), f"{b}mlp.fc1.bias": (f,), f"{b}mlp.fc2.weight": (d, f),
              f"{b}mlp.fc2.bias": (d,)}
    for i in range(ABSTRACTOR["num_hidden_layers"]):
        b = f"abstractor.encoder.layers.{i}.crossattention."
        for name in ("query", "key", "value"):
            s |= {f"{b}attention.{name}.weight": (a, a), f"{b}attention.{name}.bias": (a,)}
        s |= {f"{b}output.out_proj.weight": (a, a), f"{b}output.out_proj.bias": (a,), f"{b}output.norm2.weight": (a,),
              f"{b}output.norm2.bias": (a,), f"{b}output.mlp.w1.weight": (h, a), f"{b}output.mlp.w1.bias": (h,),
              f"{b}output.mlp.w2.weight": (a, h), f"{b}output.mlp.w2.bias": (a,), f"{b}output.mlp.w3.weight": (h, a),
              f"{b}output.mlp.w3.bias": (h,), f"{b}output.mlp.ffn_ln.weight": (h,), f"{b}output.mlp.ffn_ln.bias": (h,),
              f"{b}norm1.weight": (a,), f"{b}norm1.bias": (a,), f"{b}normk.weight": (a,), f"{b}normk.bias": (a,)}
    return s


def random_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {k: (1 if re_norm(k) else 0) + 0.2 * torch.randn(shape, generator=g)
             for k, shape in official_shapes().items()}
    torch.manual_seed(seed)
    llama = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in TEXT.items() if k != "model_type"}))
    state |= {f"language_model.{k}": v.detach().clone() + 0.1 * torch.randn(v.shape, generator=g)
              for k, v in llama.state_dict().items()}
    return state


def re_norm(key: str) -> bool:
    return key.endswith("weight") and any(n in key for n in ("layernorm", "norm1", "normk", "norm2", "ffn_ln"))


def folder_with(root: Path, state: dict[str, torch.Tensor]) -> Path:
    folder = root / "mplug-owl-tiny"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    save_file(state, str(folder / "model.safetensors"))
    byte_tokenizer().save_pretrained(str(folder))
    return folder


# --- the authors' forward, re-implemented from modeling_mplug_owl.py ------------------------------------------------

def ref_image_tokens(s: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    d, heads, eps = VISION["hidden_size"], VISION["num_attention_heads"], VISION["layer_norm_eps"]
    x = F.conv2d(pixels, s["vision_model.embeddings.patch_embed.weight"], stride=VISION["patch_size"])
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([s["vision_model.embeddings.cls_token"].expand(x.shape[0], 1, -1), x], 1)
    x = x + s["vision_model.embeddings.position_embedding"][:, : x.shape[1]]
    x = F.layer_norm(x, (d,), s["vision_model.embeddings.pre_layernorm.weight"],
                     s["vision_model.embeddings.pre_layernorm.bias"], eps)
    for i in range(VISION["num_hidden_layers"]):
        b = f"vision_model.encoder.layers.{i}."
        y = F.layer_norm(x, (d,), s[f"{b}input_layernorm.weight"], s[f"{b}input_layernorm.bias"], eps)
        bsz, length, _ = y.shape
        qkv = F.linear(y, s[f"{b}self_attn.query_key_value.weight"], s[f"{b}self_attn.query_key_value.bias"])
        q, k, v = qkv.reshape(bsz, length, heads, 3, d // heads).permute(3, 0, 2, 1, 4)  # [3, b, np, sq, hn]
        probs = torch.softmax((q @ k.transpose(-1, -2)) * (d // heads) ** -0.5, -1)
        ctx = (probs @ v).permute(0, 2, 1, 3).reshape(bsz, length, d)
        x = x + F.linear(ctx, s[f"{b}self_attn.dense.weight"], s[f"{b}self_attn.dense.bias"])
        y = F.layer_norm(x, (d,), s[f"{b}post_attention_layernorm.weight"], s[f"{b}post_attention_layernorm.bias"], eps)
        y = F.linear(y, s[f"{b}mlp.fc1.weight"], s[f"{b}mlp.fc1.bias"])
        x = x + F.linear(y * torch.sigmoid(1.702 * y), s[f"{b}mlp.fc2.weight"], s[f"{b}mlp.fc2.bias"])
    image = F.layer_norm(x, (d,), s["vision_model.post_layernorm.weight"], s["vision_model.post_layernorm.bias"], eps)
    a, ah = ABSTRACTOR["hidden_size"], ABSTRACTOR["num_attention_heads"]
    q_states = s["query_tokens"].expand(image.shape[0], -1, -1)
    for i in range(ABSTRACTOR["num_hidden_layers"]):
        b = f"abstractor.encoder.layers.{i}.crossattention."

        def ln(t: torch.Tensor, name: str, eps: float = 1e-5, b: str = b) -> torch.Tensor:
            return F.layer_norm(t, (t.shape[-1],), s[f"{b}{name}.weight"], s[f"{b}{name}.bias"], eps)

        def heads_of(t: torch.Tensor) -> torch.Tensor:
            return t.view(*t.shape[:-1], ah, a // ah).permute(0, 2, 1, 3)

        hidden = ln(q_states, "norm1")
        enc = torch.cat([hidden, ln(image, "normk")], 1)
        key = heads_of(F.linear(enc, s[f"{b}attention.key.weight"], s[f"{b}attention.key.bias"]))
        value = heads_of(F.linear(enc, s[f"{b}attention.value.weight"], s[f"{b}attention.value.bias"]))
        query = heads_of(F.linear(hidden, s[f"{b}attention.query.weight"], s[f"{b}attention.query.bias"]))
        probs = torch.softmax(query @ key.transpose(-1, -2) / math.sqrt(a // ah), -1)
        ctx = (probs @ value).permute(0, 2, 1, 3).reshape(hidden.shape)
        out = hidden + F.linear(ctx, s[f"{b}output.out_proj.weight"], s[f"{b}output.out_proj.bias"])
        y = ln(out, "output.norm2")
        m = f"{b}output.mlp."
        y = F.silu(F.linear(y, s[f"{m}w1.weight"], s[f"{m}w1.bias"])) * F.linear(y, s[f"{m}w3.weight"],
                                                                                 s[f"{m}w3.bias"])
        y = F.linear(ln(y, "output.mlp.ffn_ln", ABSTRACTOR["layer_norm_eps"]), s[f"{m}w2.weight"], s[f"{m}w2.bias"])
        q_states = out + y
    tokens = F.linear(q_states, s["abstractor.visual_fc.weight"], s["abstractor.visual_fc.bias"])
    return torch.cat([tokens, s["abstractor.vit_eos"].expand(tokens.shape[0], -1, -1)], 1)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """The test pictures are random: the same ones every run, so the recorded differences repeat."""
    torch.manual_seed(0)


# --- tests -----------------------------------------------------------------------------------------------------------

def test_every_official_tensor_is_placed_and_an_unknown_one_is_named() -> None:
    state = random_state()
    imported = convert_mplug_owl(state, CONFIG)
    placed = sum(len(w) for w in imported.weights.values())
    assert placed == len(state) + 2 * 2 * VISION["num_hidden_layers"]  # each fused qkv weight/bias becomes three
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) outside mPLUG-Owl's key layout \(vision_model.extra\)"):
        convert_mplug_owl({**state, "vision_model.extra": torch.zeros(1)}, CONFIG)


def test_an_mplug_owl_folder_imports_and_matches_the_authors_forward(tmp_path: Path) -> None:
    state = random_state()
    model = import_checkpoint(folder_with(tmp_path, state))
    assert model.imported_from["importer"] == "mplug_owl" and model.plan.tokens_per_item("image") == QUERIES + 1
    image = Image.fromarray((torch.rand(37, 50, 3) * 255).to(torch.uint8).numpy())
    mark = model.spec.placeholder("image")
    batch = model.batch([[{"role": "user", "content": f"{mark}What is it?"}, {"role": "assistant", "content": "A."}]],
                        [{"image": [image]}])
    pixels = batch["media"]["image"]
    with torch.no_grad():
        ours = model.projectors["image"](model.encoders["image"](pixels, "image"))
        theirs = ref_image_tokens(state, pixels)
        diff = float((ours - theirs).abs().max())
        assert ours.shape == (1, QUERIES + 1, TEXT["hidden_size"]) and diff <= 1e-5, f"image tokens diff {diff:.2e}"
        ids = batch["input_ids"][0].tolist()
        pid = model.processor.placeholder_ids["image"]
        lm = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in TEXT.items() if k != "model_type"})).eval()
        lm.load_state_dict({k[len("language_model."):]: v for k, v in state.items() if k.startswith("language_model.")})
        embeds = torch.cat([theirs[0] if t == pid else lm.get_input_embeddings().weight[t][None] for t in ids])[None]
        ref = lm(inputs_embeds=embeds).logits[0]
        logits = model(**batch).logits[0]
    logit_diff = float((logits - ref).abs().max())
    assert logits.shape == ref.shape and logit_diff <= 1e-4, f"max abs logit diff {logit_diff:.2e}"
    print(f"mplug_owl: image tokens max abs diff {diff:.2e}, logits {logit_diff:.2e}")


def test_the_saved_import_reloads_on_its_own_with_equal_logits(tmp_path: Path) -> None:
    from mmhub import load

    folder = folder_with(tmp_path, random_state(1))
    model = import_checkpoint(folder)
    image = Image.fromarray((torch.rand(30, 30, 3) * 255).to(torch.uint8).numpy())
    conv = [{"role": "user", "content": f"{model.spec.placeholder('image')}What?"},
            {"role": "assistant", "content": "Hm."}]
    back = load(model.save_pretrained(tmp_path / "saved"), allow_paths=[str(folder)])
    with torch.no_grad():
        assert torch.equal(model(**model.batch([conv], [{"image": [image]}])).logits,
                           back(**back.batch([conv], [{"image": [image]}])).logits)
