"""Qwen-VL (v1) converter: a random state dict with the authors' key names and shapes (the table below is written by
hand from their ``modeling_qwen.py`` / ``visual.py`` module structure at a tiny width) imports into mmhub's
qwen_vl_vit -> cross_attn_resampler (layout qwen_vl) -> Qwen2 with nothing missing or left over, without running any
checkpoint code, and computes what the authors' forward computes (re-implemented below in plain torch)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from mmhub.backbones.byte_tokenizer import byte_tokenizer
from mmhub.errors import CheckpointError
from mmhub.importers import import_checkpoint
from mmhub.importers.convert_qwen_vl import convert_qwen_vl
from mmhub.projectors.cross_attn_resampler import mae_sincos_2d

QUERIES = 16  # the authors' default is 256 (a 16 x 16 grid); the layout is the same at 4 x 4
VISUAL = {"heads": 2, "image_size": 32, "image_start_id": 261, "layers": 2, "mlp_ratio": 2.0, "output_dim": 256,
          "patch_size": 8, "width": 32}
CONFIG = {"architectures": ["QWenLMHeadModel"], "model_type": "qwen",
          "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig",
                       "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
          "hidden_size": 256, "intermediate_size": 512, "kv_channels": 64, "layer_norm_epsilon": 1e-6,
          "max_position_embeddings": 8192, "no_bias": True, "num_attention_heads": 4, "num_hidden_layers": 2,
          "rotary_emb_base": 10000, "rotary_pct": 1.0, "seq_length": 2048, "tie_word_embeddings": False,
          "use_dynamic_ntk": True, "use_logn_attn": True, "vocab_size": 320, "visual": VISUAL}


def official_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of QWenLMHeadModel (Qwen-VL) by name -> shape, from the authors' module structure."""
    v, h, vocab = cfg["visual"], cfg["hidden_size"], cfg["vocab_size"]
    ff = cfg["intermediate_size"] // 2
    w, out, mlp = v["width"], v["output_dim"], int(v["width"] * v["mlp_ratio"])
    shapes: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (vocab, h), "transformer.ln_f.weight": (h,),
                                          "lm_head.weight": (vocab, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        shapes |= {f"{p}ln_1.weight": (h,), f"{p}attn.c_attn.weight": (3 * h, h), f"{p}attn.c_attn.bias": (3 * h,),
                   f"{p}attn.c_proj.weight": (h, h), f"{p}ln_2.weight": (h,), f"{p}mlp.w1.weight": (ff, h),
                   f"{p}mlp.w2.weight": (ff, h), f"{p}mlp.c_proj.weight": (h, ff)}
    pv = "transformer.visual."
    shapes |= {f"{pv}conv1.weight": (w, 3, v["patch_size"], v["patch_size"]), f"{pv}positional_embedding": (256, w),
               f"{pv}ln_pre.weight": (w,), f"{pv}ln_pre.bias": (w,)}
    for i in range(v["layers"]):
        p = f"{pv}transformer.resblocks.{i}."
        shapes |= {f"{p}ln_1.weight": (w,), f"{p}ln_1.bias": (w,), f"{p}attn.in_proj.weight": (3 * w, w),
                   f"{p}attn.in_proj.bias": (3 * w,), f"{p}attn.out_proj.weight": (w, w),
                   f"{p}attn.out_proj.bias": (w,), f"{p}ln_2.weight": (w,), f"{p}ln_2.bias": (w,),
                   f"{p}mlp.c_fc.weight": (mlp, w), f"{p}mlp.c_fc.bias": (mlp,), f"{p}mlp.c_proj.weight": (w, mlp),
                   f"{p}mlp.c_proj.bias": (w,)}
    pa = f"{pv}attn_pool."
    shapes |= {f"{pa}pos_embed": (QUERIES, out), f"{pa}query": (QUERIES, out), f"{pa}kv_proj.weight": (out, w),
               f"{pa}attn.in_proj_weight": (3 * out, out), f"{pa}attn.in_proj_bias": (3 * out,),
               f"{pa}attn.out_proj.weight": (out, out), f"{pa}attn.out_proj.bias": (out,),
               f"{pa}ln_q.weight": (out,), f"{pa}ln_q.bias": (out,), f"{pa}ln_kv.weight": (out,),
               f"{pa}ln_kv.bias": (out,), f"{pv}ln_post.weight": (out,), f"{pv}ln_post.bias": (out,),
               f"{pv}proj": (out, out)}
    return shapes


def mae_get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """MAE's get_2d_sincos_pos_embed (what Qwen-VL's Resampler stores in pos_embed), as the authors' code has it."""
    def one_d(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


def random_state(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in official_shapes(cfg).items():
        if name.endswith("attn_pool.pos_embed"):
            state[name] = torch.from_numpy(mae_get_2d_sincos_pos_embed(shape[1], math.isqrt(shape[0]))).float()
        elif re.search(r"(ln_\w+|ln_f|ln_pre|ln_post)\.weight$", name):
            state[name] = 1 + 0.1 * torch.randn(shape, generator=gen)
        else:
            state[name] = 0.1 * torch.randn(shape, generator=gen)
    return state


def tokenizer():
    tok = byte_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<img>", "</img>"]})
    assert tok.convert_tokens_to_ids("<img>") == VISUAL["image_start_id"]
    return tok


def qwen_vl_folder(root: Path, cfg: dict = CONFIG, seed: int = 0, with_tokenizer: bool = True
                   ) -> tuple[Path, dict[str, torch.Tensor]]:
    folder = root / "qwen-vl-chat-tiny"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    state = random_state(cfg, seed)
    save_file(state, str(folder / "model.safetensors"))
    if with_tokenizer:
        tokenizer().save_pretrained(str(folder))
    return folder, state


# --- the authors' forward, re-implemented from visual.py / modeling_qwen.py -----------------------------------------

def get_abs_pos(abs_pos: torch.Tensor, tgt_size: int) -> torch.Tensor:
    src, tgt = math.isqrt(abs_pos.shape[0]), math.isqrt(tgt_size)
    if src == tgt:
        return abs_pos
    return F.interpolate(abs_pos.float().reshape(1, src, src, -1).permute(0, 3, 1, 2), size=(tgt, tgt),
                         mode="bicubic", align_corners=False).permute(0, 2, 3, 1).flatten(0, 2)


def ref_visual(sd: dict[str, torch.Tensor], cfg: dict, pixels: torch.Tensor) -> torch.Tensor:
    v, pv = cfg["visual"], "transformer.visual."
    w, heads = v["width"], v["heads"]
    x = F.conv2d(pixels, sd[f"{pv}conv1.weight"], stride=v["patch_size"]).flatten(2).permute(0, 2, 1)
    x = x + get_abs_pos(sd[f"{pv}positional_embedding"], x.shape[1])
    x = F.layer_norm(x, (w,), sd[f"{pv}ln_pre.weight"], sd[f"{pv}ln_pre.bias"], 1e-6).permute(1, 0, 2)  # LND
    for i in range(v["layers"]):
        p = f"{pv}transformer.resblocks.{i}."
        y = F.layer_norm(x, (w,), sd[f"{p}ln_1.weight"], sd[f"{p}ln_1.bias"], 1e-6)
        sq, b, _ = y.shape
        mixed = F.linear(y, sd[f"{p}attn.in_proj.weight"], sd[f"{p}attn.in_proj.bias"])
        mixed = mixed.view(sq, b, heads, 3 * (w // heads))  # VisualAttention: [sq, b, np, 3 * hn]
        q, k, val = mixed.split(w // heads, dim=-1)
        q, k, val = (t.reshape(sq, b * heads, -1).transpose(0, 1) for t in (q, k, val))
        probs = torch.bmm(q / math.sqrt(w // heads), k.transpose(-2, -1)).softmax(-1)
        ctx = torch.bmm(probs, val).view(b, heads, sq, -1).permute(2, 0, 1, 3).reshape(sq, b, w)
        x = x + F.linear(ctx, sd[f"{p}attn.out_proj.weight"], sd[f"{p}attn.out_proj.bias"])
        y = F.layer_norm(x, (w,), sd[f"{p}ln_2.weight"], sd[f"{p}ln_2.bias"], 1e-6)
        x = x + F.linear(F.gelu(F.linear(y, sd[f"{p}mlp.c_fc.weight"], sd[f"{p}mlp.c_fc.bias"])),
                         sd[f"{p}mlp.c_proj.weight"], sd[f"{p}mlp.c_proj.bias"])
    x = x.permute(1, 0, 2)  # NLD
    pa, out = f"{pv}attn_pool.", v["output_dim"]
    attn = torch.nn.MultiheadAttention(out, out // 128)  # the Resampler's own module class
    attn.load_state_dict({k[len(pa + "attn."):]: t for k, t in sd.items() if k.startswith(pa + "attn.")})
    pos = sd[f"{pa}pos_embed"]
    key_pos = get_abs_pos(pos, x.shape[1])
    x = F.layer_norm(F.linear(x, sd[f"{pa}kv_proj.weight"]), (out,), sd[f"{pa}ln_kv.weight"], sd[f"{pa}ln_kv.bias"],
                     1e-6).permute(1, 0, 2)
    q = F.layer_norm(sd[f"{pa}query"], (out,), sd[f"{pa}ln_q.weight"], sd[f"{pa}ln_q.bias"], 1e-6)
    n = x.shape[1]
    res = attn(q.unsqueeze(1).repeat(1, n, 1) + pos.unsqueeze(1), x + key_pos.unsqueeze(1), x)[0].permute(1, 0, 2)
    res = F.layer_norm(res, (out,), sd[f"{pv}ln_post.weight"], sd[f"{pv}ln_post.bias"], 1e-6)
    return res @ sd[f"{pv}proj"]


def ref_logits(sd: dict[str, torch.Tensor], cfg: dict, ids: list[int], placeholder: int,
               pixels: torch.Tensor) -> torch.Tensor:
    """QWenModel.forward for one sequence: the image features written between <img> and </img>."""
    feats = ref_visual(sd, cfg, pixels[None])[0]
    parts = [feats if t == placeholder else sd["transformer.wte.weight"][t][None] for t in ids]
    x = torch.cat(parts)[None]
    h, heads, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["layer_norm_epsilon"]
    hd, length = h // heads, x.shape[1]

    def rms(t: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * weight

    inv = 1.0 / cfg["rotary_emb_base"] ** (torch.arange(0, hd, 2).float() / hd)
    freqs = torch.outer(torch.arange(length).float(), inv)
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos()[None, :, None], emb.sin()[None, :, None]

    def rot(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([-t[..., hd // 2:], t[..., :hd // 2]], -1)

    causal = torch.ones(length, length, dtype=torch.bool).tril()
    for i in range(cfg["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        y = rms(x, sd[f"{p}ln_1.weight"])
        q, k, val = F.linear(y, sd[f"{p}attn.c_attn.weight"], sd[f"{p}attn.c_attn.bias"]).split(h, -1)
        q, k, val = (t.reshape(1, length, heads, hd) for t in (q, k, val))
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        q, k, val = (t.transpose(1, 2) for t in (q, k, val))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        att = (scores.masked_fill(~causal, float("-inf")).softmax(-1) @ val).transpose(1, 2).reshape(1, length, h)
        x = x + F.linear(att, sd[f"{p}attn.c_proj.weight"])
        y = rms(x, sd[f"{p}ln_2.weight"])
        x = x + F.linear(F.linear(y, sd[f"{p}mlp.w1.weight"]) * F.silu(F.linear(y, sd[f"{p}mlp.w2.weight"])),
                         sd[f"{p}mlp.c_proj.weight"])
    return F.linear(rms(x, sd["transformer.ln_f.weight"]), sd["lm_head.weight"])[0]


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """The test pictures are random: the same ones every run, so the recorded differences repeat."""
    torch.manual_seed(0)


# --- tests -----------------------------------------------------------------------------------------------------------

def test_the_resampler_table_is_maes_sincos_and_the_key_table_is_what_the_converter_places() -> None:
    for side, width in ((4, 256), (16, 64), (3, 8)):
        ours = mae_sincos_2d(side, width)
        theirs = torch.from_numpy(mae_get_2d_sincos_pos_embed(width, side)).float()
        assert torch.allclose(ours, theirs, atol=1e-6), f"side {side} width {width}: {(ours - theirs).abs().max()}"
    state = random_state(CONFIG)
    imported = convert_qwen_vl(state, CONFIG)
    placed = sum(len(w) for w in imported.weights.values())
    fused = 2 * CONFIG["num_hidden_layers"] + 2  # c_attn weight/bias per layer, the resampler's in_proj weight/bias
    assert placed == len(state) + 2 * fused
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) outside Qwen-VL's key layout \(transformer.h.0.extra\)"):
        convert_qwen_vl({**state, "transformer.h.0.extra": torch.zeros(1)}, CONFIG)


def test_a_qwen_vl_folder_imports_without_running_its_code_and_matches_the_authors_forward(tmp_path: Path) -> None:
    folder, state = qwen_vl_folder(tmp_path)
    model = import_checkpoint(folder)  # auto_map present, no trust_remote_code: nothing of the folder's code runs
    assert model.imported_from["importer"] == "qwen_vl"
    assert model.plan.tokens_per_item("image") == QUERIES
    image = Image.fromarray((torch.rand(45, 37, 3) * 255).to(torch.uint8).numpy())
    mark = model.spec.placeholder("image")
    conv = [{"role": "user", "content": f"{mark}What is here?"}, {"role": "assistant", "content": "A dog."}]
    batch = model.batch([conv], [{"image": [image]}])
    ids = batch["input_ids"][0].tolist()
    pid = model.processor.placeholder_ids["image"]
    at = ids.index(pid)
    img, end = model.tokenizer.convert_tokens_to_ids(["<img>", "</img>"])
    assert ids[at - 1] == img == VISUAL["image_start_id"] and ids[at + 1] == end
    text = model.tokenizer.decode([t for t in ids if t != pid])
    assert "<|im_start|>user\nPicture 1: <img></img>\nWhat is here?<|im_end|>" in text, text
    with torch.no_grad():
        ours = model(**batch).logits[0]
        assert ours.shape == (len(ids) - 1 + QUERIES, CONFIG["vocab_size"])
        theirs = ref_logits(state, CONFIG, ids, pid, batch["media"]["image"][0])
    diff = float((ours - theirs).abs().max())
    assert diff <= 1e-4, f"max abs logit diff vs the authors' forward {diff:.2e}"
    print(f"qwen_vl: max abs logit diff {diff:.2e}")


def test_without_a_tokenizer_json_the_import_says_the_tokenizer_is_remote_code(tmp_path: Path) -> None:
    folder, _ = qwen_vl_folder(tmp_path, with_tokenizer=False)
    with pytest.raises(CheckpointError, match="no tokenizer.json and no qwen.tiktoken.* trust_remote_code=True"):
        import_checkpoint(folder)


def test_a_text_only_qwen_folder_is_refused(tmp_path: Path) -> None:
    cfg = {k: v for k, v in CONFIG.items() if k != "visual"}
    folder, _ = qwen_vl_folder(tmp_path, cfg={**cfg, "visual": VISUAL})
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="without a visual config is the text-only Qwen"):
        import_checkpoint(folder)


def test_greedy_generation_equals_the_authors_forward_token_by_token(tmp_path: Path) -> None:
    folder, state = qwen_vl_folder(tmp_path, seed=1)
    model = import_checkpoint(folder)
    image = Image.fromarray((torch.rand(30, 41, 3) * 255).to(torch.uint8).numpy())
    mark = model.spec.placeholder("image")
    reply = model.generate([f"{mark}Describe it."], [{"image": [image]}], max_new_tokens=16)[0].token_ids
    batch = model.batch([[{"role": "user", "content": f"{mark}Describe it."}]], [{"image": [image]}],
                        add_generation_prompt=True)
    ids, pid = batch["input_ids"][0].tolist(), model.processor.placeholder_ids["image"]
    stops, theirs = set(model.stop_token_ids()), []
    with torch.no_grad():
        for _ in range(16):
            logits = ref_logits(state, CONFIG, ids, pid, batch["media"]["image"][0])[-1]
            logits[pid] = float("-inf")  # nobody writes the image placeholder
            token = int(logits.argmax())
            if token in stops:
                break
            theirs.append(token)
            ids.append(token)
    assert len(theirs) >= 4, f"the reference stopped after {len(theirs)} tokens; pick another seed"
    assert reply == theirs, f"mmhub {reply} vs the authors' forward {theirs}"


def test_the_saved_import_reloads_on_its_own_with_equal_logits(tmp_path: Path) -> None:
    """save_pretrained writes every converted weight, the resampler's stored sin-cos table included."""
    from mmhub import load

    folder, _ = qwen_vl_folder(tmp_path)
    model = import_checkpoint(folder)
    image = Image.fromarray((torch.rand(30, 30, 3) * 255).to(torch.uint8).numpy())
    conv = [{"role": "user", "content": f"{model.spec.placeholder('image')}What?"},
            {"role": "assistant", "content": "Hm."}]
    back = load(model.save_pretrained(tmp_path / "saved"), allow_paths=[str(folder)])
    with torch.no_grad():
        assert torch.equal(model(**model.batch([conv], [{"image": [image]}])).logits,
                           back(**back.batch([conv], [{"image": [image]}])).logits)


def test_swap_the_llm_behind_the_imported_vit_and_resampler_and_train_one_step(tmp_path: Path) -> None:
    """The converted ViT and resampler are plain mmhub parts: behind a LLaMA of another width they compute the same
    resampled states, and one optimiser step trains the resampler (its output linear re-inferred for the new LLM)."""
    from mmhub import build
    from mmhub.importers import load_strict
    from mmhub.train.trainable import apply_stage

    folder, state = qwen_vl_folder(tmp_path)
    imported = import_checkpoint(folder)
    converted = convert_qwen_vl(state, CONFIG)
    spec = dict(converted.spec)
    spec["backbone"] = {"type": "hf_causal_lm", "tokenizer": "byte", "config": {
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 512}}
    spec["template"] = "chatml"
    spec["stages"] = [{"name": "align", "train": {"projectors": "full"}}]
    model = build(spec)
    load_strict(model.encoders["image"], converted.weights["encoders.image"], "ViT")
    pool = {k: v for k, v in converted.weights["projectors.image"].items() if not k.startswith("proj.")}
    proj = model.projectors["image"]
    load_strict(proj, {**pool, "proj.weight": proj.proj.weight.detach().clone()}, "resampler")
    assert proj.proj.out_features == 64 and proj.proj.bias is None
    image = Image.fromarray((torch.rand(30, 30, 3) * 255).to(torch.uint8).numpy())
    pixels = imported.processor.preprocess["image"](image)[None]

    def states(m: torch.nn.Module) -> torch.Tensor:  # the resampler output before its output linear
        seen = {}
        handle = m.projectors["image"].proj.register_forward_hook(lambda mod, args, out: seen.update(x=args[0]))
        m.projectors["image"](m.encoders["image"](pixels, "image"))
        handle.remove()
        return seen["x"]

    with torch.no_grad():
        assert float((states(imported) - states(model)).abs().max()) <= 1e-6
    plan = apply_stage(model, model.spec.stages[0])
    assert {k for k, n in plan.trainable.items() if n} == {"projectors.image"}, plan.trainable
    batch = model.batch([[{"role": "user", "content": "<image>What is this?"}, {"role": "assistant", "content": "a"}]],
                        [{"image": [image]}])
    before = proj.query.detach().clone()
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    loss = model(**batch).loss
    loss.backward()
    optimiser.step()
    assert torch.isfinite(loss) and not torch.equal(before, proj.query.detach())


def test_a_tokenizer_whose_image_markers_are_not_the_models_is_refused(tmp_path: Path) -> None:
    cfg = {**CONFIG, "visual": {**VISUAL, "image_start_id": 270}}
    folder, _ = qwen_vl_folder(tmp_path, cfg=cfg)
    with pytest.raises(CheckpointError, match=r"<img>, </img> the ids \[261, 262\], but .* says \[270, 271\]"):
        import_checkpoint(folder)


def test_the_template_numbers_the_pictures_of_a_turn(tmp_path: Path) -> None:
    folder, _ = qwen_vl_folder(tmp_path)
    model = import_checkpoint(folder)
    mark, pid = model.spec.placeholder("image"), model.processor.placeholder_ids["image"]
    image = Image.new("RGB", (20, 20), (10, 200, 30))
    batch = model.batch([[{"role": "user", "content": f"{mark}{mark}Compare them."}]], [{"image": [image, image]}],
                        add_generation_prompt=True)
    text = model.tokenizer.decode([t for t in batch["input_ids"][0].tolist() if t != pid])
    assert "user\nPicture 1: <img></img>\nPicture 2: <img></img>\nCompare them.<|im_end|>\n<|im_start|>assistant\n" \
        in text, text
