"""Video-LLaMA converter: a random state dict under Video-LLaMA's own key names and shapes (written by hand from
``VideoLLAMA.__init__`` in its ``video_llama.py`` and LAVIS' EVA ViT / BERT Q-Former at tiny width) converts to the
video encoder (EVA frames) -> video_qformer -> LLaMA with no missing or unexpected keys, and the video tokens equal
``encode_videoQformer_visual`` re-implemented on transformers' BLIP-2 vision model and Q-Former (the modules
transformers' own BLIP-2 conversion maps LAVIS' onto)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    Blip2QFormerConfig,
    Blip2QFormerModel,
    Blip2VisionConfig,
    Blip2VisionModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from mmhub.assembly import build
from mmhub.errors import CheckpointError
from mmhub.importers.convert_video_llama import convert_video_llama
from mmhub.importers.run import apply_imported

D, PATCH, IMAGE, DEPTH, MLP, VHEADS = 32, 8, 32, 2, 37, 2  # EVA tower
W, QLAYERS, EVERY, QMLP, QHEADS, Q = 32, 3, 2, 44, 4, 4  # image Q-Former (BERT-base at full size)
VQ, VLAYERS, FRAMES, MAX_POS = 3, 2, 3, 5  # video Q-Former (Video-LLaMA: 32 queries, 2 layers), frames, frame table
LLAMA = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 256}
SETTINGS = {"frames": FRAMES, "vision_heads": VHEADS, "qformer_heads": QHEADS}


def video_llama_state(seed: int = 0, audio: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.2

    def norm(prefix: str, width: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": 1 + r(width), f"{prefix}.bias": r(width)}

    def linear(prefix: str, out: int, inp: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": r(out, inp), f"{prefix}.bias": r(out)}

    def qformer(prefix: str, layers: int, every: int, kv: int) -> dict[str, torch.Tensor]:
        # Video-LLaMA sets word/position embeddings, cls and the text FFN (intermediate/output) to None
        s = norm(f"{prefix}.bert.embeddings.LayerNorm", W)
        for i in range(layers):
            b = f"{prefix}.bert.encoder.layer.{i}"
            for part in ["attention"] + (["crossattention"] if i % every == 0 else []):
                width = kv if part == "crossattention" else W
                s |= {**linear(f"{b}.{part}.self.query", W, W), **linear(f"{b}.{part}.self.key", W, width),
                      **linear(f"{b}.{part}.self.value", W, width), **linear(f"{b}.{part}.output.dense", W, W),
                      **norm(f"{b}.{part}.output.LayerNorm", W)}
            s |= {**linear(f"{b}.intermediate_query.dense", QMLP, W), **linear(f"{b}.output_query.dense", W, QMLP),
                  **norm(f"{b}.output_query.LayerNorm", W)}
        return s

    n = (IMAGE // PATCH) ** 2
    s = {"visual_encoder.cls_token": r(1, 1, D), "visual_encoder.pos_embed": r(1, n + 1, D),
         "visual_encoder.patch_embed.proj.weight": r(D, 3, PATCH, PATCH), "visual_encoder.patch_embed.proj.bias": r(D),
         **norm("ln_vision", D), "query_tokens": r(1, Q, W), **qformer("Qformer", QLAYERS, EVERY, D),
         "video_frame_position_embedding.weight": r(MAX_POS, W), "video_query_tokens": r(1, VQ, W),
         **qformer("video_Qformer", VLAYERS, 1, W), **linear("llama_proj", LLAMA["hidden_size"], W)}
    for i in range(DEPTH):
        b = f"visual_encoder.blocks.{i}"
        s |= {**norm(f"{b}.norm1", D), **norm(f"{b}.norm2", D), f"{b}.attn.qkv.weight": r(3 * D, D),
              f"{b}.attn.q_bias": r(D), f"{b}.attn.v_bias": r(D), **linear(f"{b}.attn.proj", D, D),
              **linear(f"{b}.mlp.fc1", MLP, D), **linear(f"{b}.mlp.fc2", D, MLP)}
    if audio:
        s |= {"audio_query_tokens": r(1, 2, W), **linear("audio_llama_proj", LLAMA["hidden_size"], W),
              "audio_position_embedding.weight": r(8, D), "audio_encoder.modality_heads.audio.1.weight": r(D, D)}
    torch.manual_seed(seed)
    llama = LlamaForCausalLM(LlamaConfig(**LLAMA))
    s |= {f"llama_model.{k}": v.detach().clone() + r(*v.shape) for k, v in llama.state_dict().items()}
    return s


def reference_video_tokens(s: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    """encode_videoQformer_visual for (T, 3, H, W) frames: ln_vision(EVA(frame)) -> Q-Former -> + frame position ->
    video Q-Former -> llama_proj, on transformers' BLIP-2 modules with LAVIS' tensors renamed as transformers'
    conversion renames them."""
    vision = Blip2VisionModel(Blip2VisionConfig(hidden_size=D, intermediate_size=MLP, num_hidden_layers=DEPTH,
                                                num_attention_heads=VHEADS, image_size=IMAGE, patch_size=PATCH,
                                                qkv_bias=True, layer_norm_eps=1e-6)).eval()
    v = {"embeddings.class_embedding": s["visual_encoder.cls_token"],
         "embeddings.position_embedding": s["visual_encoder.pos_embed"],
         "embeddings.patch_embedding.weight": s["visual_encoder.patch_embed.proj.weight"],
         "embeddings.patch_embedding.bias": s["visual_encoder.patch_embed.proj.bias"],
         "post_layernorm.weight": s["ln_vision.weight"], "post_layernorm.bias": s["ln_vision.bias"]}
    for i in range(DEPTH):
        b = f"visual_encoder.blocks.{i}."
        for ours, theirs in (("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("attn.proj", "self_attn.projection"),
                             ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            for leaf in ("weight", "bias"):
                v[f"encoder.layers.{i}.{theirs}.{leaf}"] = s[f"{b}{ours}.{leaf}"]
        v[f"encoder.layers.{i}.self_attn.qkv.weight"] = s[f"{b}attn.qkv.weight"]
        q_bias, v_bias = s[f"{b}attn.q_bias"], s[f"{b}attn.v_bias"]
        v[f"encoder.layers.{i}.self_attn.qkv.bias"] = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])
    vision.load_state_dict(v)

    def hf_qformer(prefix: str, layers: int, every: int, kv: int) -> Blip2QFormerModel:
        config = Blip2QFormerConfig(hidden_size=W, num_hidden_layers=layers, num_attention_heads=QHEADS,
                                    intermediate_size=QMLP, cross_attention_frequency=every, encoder_hidden_size=kv,
                                    layer_norm_eps=1e-12)
        model = Blip2QFormerModel(config).eval()
        state = {}
        for k, t in s.items():
            if k.startswith(prefix + ".bert."):
                rest = k[len(prefix + ".bert."):].replace("embeddings.LayerNorm", "layernorm")
                state[rest.replace("attention.self.", "attention.attention.")] = t
        model.load_state_dict(state)
        return model

    frames = vision(pixel_values=pixels).last_hidden_state  # ln_vision(visual_encoder(frames)): (T, P + 1, D)
    image_q = hf_qformer("Qformer", QLAYERS, EVERY, D)
    states = image_q(query_embeds=s["query_tokens"].expand(len(pixels), -1, -1),
                     encoder_hidden_states=frames).last_hidden_state  # (T, Q, W)
    states = states + s["video_frame_position_embedding.weight"][: len(pixels)][:, None]
    video_q = hf_qformer("video_Qformer", VLAYERS, 1, W)
    out = video_q(query_embeds=s["video_query_tokens"],
                  encoder_hidden_states=states.reshape(1, -1, W)).last_hidden_state  # (1, VQ, W)
    return torch.nn.functional.linear(out, s["llama_proj.weight"], s["llama_proj.bias"])


def clip(seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)) for _ in range(FRAMES)]


def test_video_llama_keys_all_placed_and_the_video_tokens_equal_encode_video_qformer_visual() -> None:
    state = video_llama_state()
    imported = convert_video_llama(state, SETTINGS, text_config=LLAMA)
    model = build(imported.spec)
    apply_imported(model, imported, "Video-LLaMA state dict")  # strict: nothing missing, nothing unexpected
    model.eval()
    assert model.plan.tokens_per_item("video") == VQ
    video = model.encoders["video"]
    pixels = torch.stack([video.preprocess(clip(0), "video")])  # (1, T, 3, H, W)
    with torch.no_grad():
        ours = model.projectors["video"](video(pixels, "video"))
        theirs = reference_video_tokens(state, pixels[0])
    diff = float((ours - theirs).abs().max())
    assert float(theirs.std()) > 0.05, "the reference tokens are degenerate, so the comparison would prove nothing"
    assert ours.shape == (1, VQ, LLAMA["hidden_size"]) and diff <= 1e-5, f"video tokens max abs diff {diff:.2e}"
    print(f"video_llama: video tokens max abs diff {diff:.2e}")
    mark = model.spec.placeholder("video")
    batch = model.batch([[{"role": "user", "content": f"{mark}What happens?"}, {"role": "assistant", "content": "x"}]],
                        [{"video": [clip(1)]}])
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1] - 1 + VQ, LLAMA["vocab_size"])
    pid = model.processor.placeholder_ids["video"]
    ids = [t for t in batch["input_ids"][0].tolist() if t != pid]
    # the demo's prompt: bos, "###Human: <Video>", the video tokens, "</Video> What happens?###Assistant:", the answer
    assert model.tokenizer.decode(ids[1:]) == "###Human: <Video></Video> What happens?###Assistant: x"


def test_the_audio_branch_is_named_and_refused_unless_dropped() -> None:
    state = video_llama_state(audio=True)
    with pytest.raises(CheckpointError, match=r"5 audio-branch tensor\(s\) .*audio_encoder.* drop_audio=True"):
        convert_video_llama(state, SETTINGS, text_config=LLAMA)
    imported = convert_video_llama(state, SETTINGS, text_config=LLAMA, drop_audio=True)
    assert any("dropped the audio branch (5 tensors" in n for n in imported.notes)


def test_an_unknown_key_is_named() -> None:
    state = {**video_llama_state(), "video_Qformer.adapter.weight": torch.zeros(2)}
    with pytest.raises(CheckpointError, match=r"1 key\(s\) with no place in mmhub \(video_Qformer.adapter.weight\)"):
        convert_video_llama(state, SETTINGS, text_config=LLAMA)


def test_the_image_path_is_the_same_weights_read_as_one_frame_clips() -> None:
    """Video-LLaMA encodes an image as a 1-frame clip: converted with frames 1, a still image's tokens equal
    encode_videoQformer_visual on that single frame (frame position 0 only)."""
    state = video_llama_state(seed=4)
    imported = convert_video_llama(state, {**SETTINGS, "frames": 1}, text_config=LLAMA)
    model = build(imported.spec)
    apply_imported(model, imported, "Video-LLaMA state dict")
    model.eval()
    video = model.encoders["video"]
    still = Image.fromarray(np.random.default_rng(5).integers(0, 256, (36, 30, 3), dtype=np.uint8))
    pixels = torch.stack([video.preprocess([still], "video")])  # a one-frame clip: (1, 1, 3, H, W)
    with torch.no_grad():
        ours = model.projectors["video"](video(pixels, "video"))
        theirs = reference_video_tokens(state, pixels[0])
    assert pixels.shape[1] == 1 and float((ours - theirs).abs().max()) <= 1e-5
