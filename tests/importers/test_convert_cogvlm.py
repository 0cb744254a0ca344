"""CogVLM (v1) converter: a random state dict with the authors' key names and shapes (the table below is written by
hand from their ``modeling_cogvlm.py`` / ``visual.py`` module structure at a tiny width) imports into mmhub's
eva2_clip -> glu -> LLaMA + visual_expert with nothing missing or left over, without running any checkpoint code, and
computes what the authors' forward computes (re-implemented below in plain torch from their code)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from mmhub.backbones.byte_tokenizer import byte_tokenizer
from mmhub.errors import CheckpointError
from mmhub.importers import import_checkpoint
from mmhub.importers.convert_cogvlm import convert_cogvlm

VISION = {"dropout_prob": 0.0, "hidden_act": "gelu", "in_channels": 3, "num_hidden_layers": 2, "hidden_size": 32,
          "patch_size": 14, "num_heads": 2, "intermediate_size": 64, "layer_norm_eps": 1e-6, "num_positions": 5,
          "image_size": 28}
CONFIG = {"architectures": ["CogVLMForCausalLM"],
          "auto_map": {"AutoConfig": "configuration_cogvlm.CogVLMConfig",
                       "AutoModelForCausalLM": "modeling_cogvlm.CogVLMForCausalLM"},
          "bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258, "hidden_act": "silu", "hidden_size": 64,
          "intermediate_size": 128, "max_position_embeddings": 2048, "num_attention_heads": 4,
          "num_hidden_layers": 2, "rms_norm_eps": 1e-5, "template_version": "chat", "tie_word_embeddings": False,
          "vocab_size": 320, "vision_config": VISION}
LANGUAGE, VISION_TYPE = 0, 1


def official_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of CogVLMForCausalLM's state dict (name -> shape), from the authors' module structure."""
    v, h, f, vocab = cfg["vision_config"], cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    vh, vf, grid = v["hidden_size"], v["intermediate_size"], v["image_size"] // v["patch_size"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,),
                                          "lm_head.weight": (vocab, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for expert in ("vision", "language"):
            shapes[f"{p}self_attn.{expert}_expert_query_key_value.weight"] = (3 * h, h)
            shapes[f"{p}self_attn.{expert}_expert_dense.weight"] = (h, h)
            shapes[f"{p}mlp.{expert}_mlp.gate_proj.weight"] = (f, h)
            shapes[f"{p}mlp.{expert}_mlp.up_proj.weight"] = (f, h)
            shapes[f"{p}mlp.{expert}_mlp.down_proj.weight"] = (h, f)
        shapes[f"{p}self_attn.rotary_emb.inv_freq"] = (h // cfg["num_attention_heads"] // 2,)
        shapes[f"{p}input_layernorm.weight"] = (h,)
        shapes[f"{p}post_attention_layernorm.weight"] = (h,)
    pv = "model.vision."
    shapes |= {f"{pv}patch_embedding.proj.weight": (vh, v["in_channels"], v["patch_size"], v["patch_size"]),
               f"{pv}patch_embedding.proj.bias": (vh,), f"{pv}patch_embedding.cls_embedding": (1, vh),
               f"{pv}patch_embedding.position_embedding.weight": (grid * grid + 1, vh)}
    for i in range(v["num_hidden_layers"]):
        p = f"{pv}transformer.layers.{i}."
        shapes |= {f"{p}input_layernorm.weight": (vh,), f"{p}input_layernorm.bias": (vh,),
                   f"{p}attention.query_key_value.weight": (3 * vh, vh),
                   f"{p}attention.query_key_value.bias": (3 * vh,),
                   f"{p}attention.dense.weight": (vh, vh), f"{p}attention.dense.bias": (vh,),
                   f"{p}mlp.fc1.weight": (vf, vh), f"{p}mlp.fc1.bias": (vf,), f"{p}mlp.fc2.weight": (vh, vf),
                   f"{p}mlp.fc2.bias": (vh,), f"{p}post_attention_layernorm.weight": (vh,),
                   f"{p}post_attention_layernorm.bias": (vh,)}
    shapes |= {f"{pv}linear_proj.linear_proj.weight": (h, vh), f"{pv}linear_proj.norm1.weight": (h,),
               f"{pv}linear_proj.norm1.bias": (h,), f"{pv}linear_proj.dense_h_to_4h.weight": (f, h),
               f"{pv}linear_proj.gate_proj.weight": (f, h), f"{pv}linear_proj.dense_4h_to_h.weight": (h, f),
               f"{pv}boi": (1, 1, h), f"{pv}eoi": (1, 1, h)}
    return shapes


def random_state(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in official_shapes(cfg).items():
        if name.endswith("inv_freq"):
            dim = cfg["hidden_size"] // cfg["num_attention_heads"]
            state[name] = 1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim)
        elif name.endswith("norm.weight") or "layernorm.weight" in name or name.endswith("norm1.weight"):
            state[name] = 1 + 0.1 * torch.randn(shape, generator=gen)
        else:
            state[name] = 0.1 * torch.randn(shape, generator=gen)
    return state


def cogvlm_folder(root: Path, cfg: dict = CONFIG, seed: int = 0) -> tuple[Path, dict[str, torch.Tensor]]:
    folder = root / "cogvlm-chat-tiny"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    state = random_state(cfg, seed)
    save_file(state, str(folder / "model.safetensors"))
    byte_tokenizer().save_pretrained(str(folder))
    return folder, state


# --- the authors' forward, re-implemented from modeling_cogvlm.py / visual.py ---------------------------------------

def ref_vision(sd: dict[str, torch.Tensor], cfg: dict, pixels: torch.Tensor) -> torch.Tensor:
    v, pv = cfg["vision_config"], "model.vision."
    x = F.conv2d(pixels, sd[f"{pv}patch_embedding.proj.weight"], sd[f"{pv}patch_embedding.proj.bias"],
                 stride=v["patch_size"]).flatten(2).transpose(1, 2)
    x = torch.cat([sd[f"{pv}patch_embedding.cls_embedding"].expand(x.shape[0], -1, -1), x], 1)
    x = x + sd[f"{pv}patch_embedding.position_embedding.weight"][None]
    heads, width = v["num_heads"], v["hidden_size"]
    for i in range(v["num_hidden_layers"]):
        p = f"{pv}transformer.layers.{i}."
        b, length, _ = x.shape
        qkv = F.linear(x, sd[f"{p}attention.query_key_value.weight"], sd[f"{p}attention.query_key_value.bias"])
        q, k, val = qkv.reshape(b, length, 3, heads, -1).permute(2, 0, 3, 1, 4)
        att = ((q * (width // heads) ** -0.5) @ k.transpose(-1, -2)).softmax(-1) @ val
        out = F.linear(att.transpose(1, 2).reshape(b, length, width), sd[f"{p}attention.dense.weight"],
                       sd[f"{p}attention.dense.bias"])
        x = x + F.layer_norm(out, (width,), sd[f"{p}input_layernorm.weight"], sd[f"{p}input_layernorm.bias"],
                             v["layer_norm_eps"])
        mlp = F.linear(F.gelu(F.linear(x, sd[f"{p}mlp.fc1.weight"], sd[f"{p}mlp.fc1.bias"])), sd[f"{p}mlp.fc2.weight"],
                       sd[f"{p}mlp.fc2.bias"])
        x = x + F.layer_norm(mlp, (width,), sd[f"{p}post_attention_layernorm.weight"],
                             sd[f"{p}post_attention_layernorm.bias"], v["layer_norm_eps"])
    x = x[:, 1:]
    g = f"{pv}linear_proj."
    x = F.linear(x, sd[f"{g}linear_proj.weight"])
    x = F.gelu(F.layer_norm(x, (x.shape[-1],), sd[f"{g}norm1.weight"], sd[f"{g}norm1.bias"]))
    x = F.linear(F.silu(F.linear(x, sd[f"{g}gate_proj.weight"])) * F.linear(x, sd[f"{g}dense_h_to_4h.weight"]),
                 sd[f"{g}dense_4h_to_h.weight"])
    n = x.shape[0]
    return torch.cat([sd[f"{pv}boi"].expand(n, -1, -1), x, sd[f"{pv}eoi"].expand(n, -1, -1)], 1)


def build_position_ids(token_types: torch.Tensor) -> torch.Tensor:
    """The authors' build_position_ids (no padding): boi/eoi count as language, patches share one position."""
    tmp = token_types.clone()
    edge = torch.zeros_like(tmp, dtype=torch.bool)
    edge[:, 1:] |= (tmp[:, 1:] == VISION_TYPE) & (tmp[:, :-1] == LANGUAGE)
    edge[:, 0] |= tmp[:, 0] == VISION_TYPE
    edge[:, :-1] |= (tmp[:, :-1] == VISION_TYPE) & (tmp[:, 1:] == LANGUAGE)
    edge[:, -1] |= tmp[:, -1] == VISION_TYPE
    tmp[edge] = LANGUAGE
    y = torch.zeros_like(tmp)
    y[:, 1:] = (tmp[:, 1:] == LANGUAGE) | ((tmp[:, 1:] == VISION_TYPE) & (tmp[:, :-1] == LANGUAGE))
    return y.cumsum(-1)


def ref_language(sd: dict[str, torch.Tensor], cfg: dict, embeds: torch.Tensor, token_types: torch.Tensor,
                 positions: torch.Tensor) -> torch.Tensor:
    h, heads, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["rms_norm_eps"]
    hd = h // heads
    vision = torch.zeros_like(token_types, dtype=torch.bool)  # get_expert_mask: this and the next token are vision
    vision[:, :-1] = (token_types[:, :-1] == VISION_TYPE) & (token_types[:, 1:] == VISION_TYPE)

    def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def routed(x: torch.Tensor, vis: str, lang: str) -> torch.Tensor:
        return torch.where(vision[..., None], F.linear(x, sd[vis]), F.linear(x, sd[lang]))

    def mlp(x: torch.Tensor, p: str) -> torch.Tensor:
        return F.linear(F.silu(F.linear(x, sd[f"{p}gate_proj.weight"])) * F.linear(x, sd[f"{p}up_proj.weight"]),
                        sd[f"{p}down_proj.weight"])

    inv = 1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd)
    freqs = positions[0].float()[:, None] * inv[None]
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos()[None, None], emb.sin()[None, None]

    def rot(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([-t[..., hd // 2:], t[..., :hd // 2]], -1)

    x = embeds
    length = x.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        y = rms(x, sd[f"{p}input_layernorm.weight"])
        qkv = routed(y, f"{p}self_attn.vision_expert_query_key_value.weight",
                     f"{p}self_attn.language_expert_query_key_value.weight")
        q, k, val = (t.reshape(1, length, heads, hd).transpose(1, 2) for t in qkv.split(h, -1))
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        att = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ val
        att = att.transpose(1, 2).reshape(1, length, h)
        x = x + routed(att, f"{p}self_attn.vision_expert_dense.weight", f"{p}self_attn.language_expert_dense.weight")
        y = rms(x, sd[f"{p}post_attention_layernorm.weight"])
        x = x + torch.where(vision[..., None], mlp(y, f"{p}mlp.vision_mlp."), mlp(y, f"{p}mlp.language_mlp."))
    return F.linear(rms(x, sd["model.norm.weight"]), sd["lm_head.weight"])


def ref_logits(sd: dict[str, torch.Tensor], cfg: dict, ids: list[int], placeholder: int, pixels: torch.Tensor,
               shared_positions: bool) -> torch.Tensor:
    """One sequence: text ids with one placeholder where the image's features go (boi, patches, eoi)."""
    feats = ref_vision(sd, cfg, pixels[None])[0]
    parts, types = [], []
    for t in ids:
        if t == placeholder:
            parts.append(feats)
            types += [VISION_TYPE] * feats.shape[0]
        else:
            parts.append(sd["model.embed_tokens.weight"][t][None])
            types.append(LANGUAGE)
    embeds, token_types = torch.cat(parts)[None], torch.tensor([types])
    positions = build_position_ids(token_types) if shared_positions else torch.arange(len(types))[None]
    return ref_language(sd, cfg, embeds, token_types, positions)[0]


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """The test pictures are random: the same ones every run, so the recorded differences repeat."""
    torch.manual_seed(0)


# --- tests -----------------------------------------------------------------------------------------------------------

def test_the_hand_written_key_table_is_what_the_converter_places(tmp_path: Path) -> None:
    state = random_state(CONFIG)
    imported = convert_cogvlm(state, CONFIG, tokenizer="byte")
    placed = sum(len(w) for w in imported.weights.values())
    n_inv = CONFIG["num_hidden_layers"]
    # every tensor placed once, except each layer's fused qkv (two of them) which becomes three: +2 per fused tensor
    assert placed == len(state) - n_inv + 2 * 2 * CONFIG["num_hidden_layers"]
    assert any("inv_freq" in n for n in imported.notes)
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) outside CogVLM's key layout \(model.mystery.weight\)"):
        convert_cogvlm({**state, "model.mystery.weight": torch.zeros(1)}, CONFIG, tokenizer="byte")


def test_a_cogvlm_folder_imports_without_running_its_code_and_matches_the_authors_forward(tmp_path: Path) -> None:
    folder, state = cogvlm_folder(tmp_path)
    model = import_checkpoint(folder)  # auto_map present, no trust_remote_code: the converter runs no checkpoint code
    assert model.imported_from["importer"] == "cogvlm"
    assert type(model.encoders["image"]).name == "eva2_clip" and type(model.projectors["image"]).name == "glu"
    grid = (VISION["image_size"] // VISION["patch_size"]) ** 2
    assert model.plan.tokens_per_item("image") == grid + 2  # patches + boi + eoi
    image = Image.fromarray((torch.rand(40, 52, 3) * 255).to(torch.uint8).numpy())
    mark = model.spec.placeholder("image")
    conv = [{"role": "user", "content": f"{mark}What is here?"}, {"role": "assistant", "content": "A dog."}]
    batch = model.batch([conv], [{"image": [image]}])
    ids = batch["input_ids"][0].tolist()
    pid = model.processor.placeholder_ids["image"]
    assert ids[0] == CONFIG["bos_token_id"] and ids[1] == pid  # bos, the image, then "Question: ... Answer:"
    assert model.tokenizer.decode(ids[2:]) == "Question: What is here? Answer: A dog.</s>\n"
    with torch.no_grad():
        ours = model(**batch).logits[0]
        assert ours.shape == (len(ids) - 1 + grid + 2, CONFIG["vocab_size"])
        theirs = ref_logits(state, CONFIG, ids, pid, batch["media"]["image"][0], shared_positions=False)
        shared = ref_logits(state, CONFIG, ids, pid, batch["media"]["image"][0], shared_positions=True)
    diff = float((ours - shared).abs().max())
    gap = float((theirs - shared).abs().max())
    # the shared image position matters: consecutive positions would give other logits
    assert gap > 1e-3, f"CogVLM's shared image positions should change the logits (measured {gap:.2e})"
    assert diff <= 1e-4, f"max abs logit diff vs the authors' forward (build_position_ids) {diff:.2e}"
    print(f"cogvlm: max abs logit diff {diff:.2e}; consecutive positions would differ by {gap:.2e}")


def test_a_folder_with_an_unknown_tensor_is_refused_by_name(tmp_path: Path) -> None:
    folder, state = cogvlm_folder(tmp_path)
    save_file({**state, "model.vision.adapter.weight": torch.zeros(2)}, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"encoders.image: 0 missing .* 1 unexpected \(adapter.weight\)"):
        import_checkpoint(folder)


def test_greedy_generation_equals_the_authors_forward_token_by_token(tmp_path: Path) -> None:
    folder, state = cogvlm_folder(tmp_path, seed=1)
    model = import_checkpoint(folder)
    image = Image.fromarray((torch.rand(33, 47, 3) * 255).to(torch.uint8).numpy())
    mark = model.spec.placeholder("image")
    reply = model.generate([f"{mark}Describe it."], [{"image": [image]}], max_new_tokens=16)[0].token_ids
    batch = model.batch([[{"role": "user", "content": f"{mark}Describe it."}]], [{"image": [image]}],
                        add_generation_prompt=True)
    ids, pid = batch["input_ids"][0].tolist(), model.processor.placeholder_ids["image"]
    stops, theirs = set(model.stop_token_ids()), []
    with torch.no_grad():
        for _ in range(16):
            logits = ref_logits(state, CONFIG, ids, pid, batch["media"]["image"][0], shared_positions=True)[-1]
            logits[pid] = float("-inf")  # nobody writes the image placeholder
            token = int(logits.argmax())
            if token in stops:
                break
            theirs.append(token)
            ids.append(token)
    assert len(theirs) >= 4, f"the reference stopped after {len(theirs)} tokens; pick another seed"
    assert reply == theirs, f"mmhub {reply} vs the authors' forward {theirs}"


def test_mmhub_decode_loop_with_visual_experts_equals_transformers_generate(tmp_path: Path) -> None:
    """With sequential positions (which transformers' generate can take), the decode loop that now runs visual-expert
    models gives the tokens transformers' generate gives with the experts hooked in."""
    folder, _ = cogvlm_folder(tmp_path, seed=2)
    model = import_checkpoint(folder)
    model.backbone.config = model.backbone.config.model_copy(update={"media_positions": "sequential"})
    image = Image.fromarray((torch.rand(30, 30, 3) * 255).to(torch.uint8).numpy())
    mark = model.spec.placeholder("image")
    b = model.batch([[{"role": "user", "content": f"{mark}What?"}], [{"role": "user", "content": "Hi, who are you?"}]],
                    [{"image": [image]}, {}], add_generation_prompt=True, padding_side="left")
    args = (b["input_ids"], b["attention_mask"], b["media"])
    own = model.generate_ids(*args, max_new_tokens=8)
    hf = model.generate_ids(*args, max_new_tokens=8, repetition_penalty=1.0)  # not a loop setting: generate()
    assert own == hf and any(len(r) > 2 for r in own), (own, hf)


def test_the_saved_import_reloads_on_its_own_with_equal_logits(tmp_path: Path) -> None:
    """save_pretrained writes every converted weight (tower, GLU with boi/eoi, LLaMA, the experts) and the CogVLM
    positions setting: the folder reloads without the checkpoint's code and gives the same logits."""
    from mmhub import load

    folder, _ = cogvlm_folder(tmp_path)
    model = import_checkpoint(folder)
    image = Image.fromarray((torch.rand(30, 30, 3) * 255).to(torch.uint8).numpy())
    conv = [{"role": "user", "content": f"{model.spec.placeholder('image')}What?"},
            {"role": "assistant", "content": "Hm."}]
    back = load(model.save_pretrained(tmp_path / "saved"), allow_paths=[str(folder)])  # its tokenizer is there
    assert back.backbone.config.media_positions == "cogvlm"
    with torch.no_grad():
        assert torch.equal(model(**model.batch([conv], [{"image": [image]}])).logits,
                           back(**back.batch([conv], [{"image": [image]}])).logits)


def test_a_base_checkpoint_gets_the_base_prompt(tmp_path: Path) -> None:
    folder, _ = cogvlm_folder(tmp_path, cfg={**CONFIG, "template_version": "base"})
    model = import_checkpoint(folder)
    mark = model.spec.placeholder("image")
    batch = model.batch([[{"role": "user", "content": f"A photo of{mark}"}]], [{"image": [Image.new("RGB", (9, 9))]}])
    ids = batch["input_ids"][0].tolist()
    assert model.spec.template == "cogvlm-base" and ids[1] == model.processor.placeholder_ids["image"]
    assert model.tokenizer.decode(ids[2:]) == "A photo of"


def test_batched_left_padded_generation_equals_one_by_one(tmp_path: Path) -> None:
    """CogVLM's positions under left padding: a batch of prompts of different lengths generates what each prompt
    generates alone."""
    folder, _ = cogvlm_folder(tmp_path, seed=3)
    model = import_checkpoint(folder)
    mark = model.spec.placeholder("image")
    rng = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(28, 40, 3, generator=rng) * 255).to(torch.uint8).numpy()) for _ in range(2)]
    prompts = [f"{mark}Describe this picture in detail, please.", f"{mark}What?"]
    media = [{"image": [im]} for im in images]
    batched = [r.token_ids for r in model.generate(prompts, media, max_new_tokens=8)]
    single = [model.generate([p], [m], max_new_tokens=8)[0].token_ids for p, m in zip(prompts, media, strict=True)]
    assert batched == single and any(len(r) > 2 for r in single), (batched, single)
