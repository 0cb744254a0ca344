"""GGUF export (`mmhub export --format gguf`): the language model and llama.cpp's mmproj, read back with gguf-py.

The files are checked against the model they came from: every tensor where llama.cpp expects it (q/k rows in
adjacent-pair RoPE order, Q8_0 blocks within their rounding), the metadata llama.cpp requires, the vision tower cut
at the projector's layer, the tokenizer one token per embedding row. That llama.cpp itself loads them and answers
as mmhub does is `benchmarks/gguf_agreement.py` (it builds llama.cpp, minutes).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import mmhub
from mmhub.errors import ExportError
from mmhub.export.gguf import export_gguf
from mmhub.export.gguf_llm import permute_rows

from conftest import TINY_LLAMA

gguf = pytest.importorskip("gguf")

VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
          "image_size": 32, "patch_size": 8, "initializer_range": 0.5}
LLAMA = {**TINY_LLAMA, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 320}


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> Path:
    """A small byte-level BPE tokenizer folder (as SmolLM2's, Llama 3's), trained here on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["what colour is the circle", "a red triangle and a blue square", "is there a shape in the picture?"] * 20
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=special,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    out = tmp_path_factory.mktemp("bpe")
    fast.save_pretrained(out)
    return out


def spec(bpe: Path, family: str = "siglip_vision_model", **over: Any) -> dict[str, Any]:
    s = {"name": "gguf-tiny", "seed": 3,
         "encoders": {"image": {"type": "hf_vision", "config": {**VISION, "model_type": family}, "select_layer": -2}},
         "projectors": {"image": {"type": "mlp", "depth": 2, "activation": "gelu"}},
         "backbone": {"type": "hf_causal_lm", "config": LLAMA, "tokenizer": str(bpe)},
         "template": "chatml", "placeholders": {"image": "<image>"}}
    for path, value in over.items():
        node = s
        keys = path.split(".")
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return s


def fields(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A GGUF file's metadata (key -> value) and tensors (name -> ReaderTensor)."""
    r = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in r.fields.items()}, {t.name: t for t in r.tensors}


def values(t: Any) -> np.ndarray:
    """A read-back tensor as float32 in numpy (transformers) layout, dequantized."""
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(x) for x in reversed(t.shape)))


def test_siglip_llava_exports_exactly_at_f32(bpe: Path, tmp_path: Path) -> None:
    model = mmhub.build(spec(bpe))
    llm, mmproj = export_gguf(model, tmp_path / "out", "f32")
    assert (llm.name, mmproj.name) == ("gguf-tiny.gguf", "mmproj-gguf-tiny.gguf")
    meta, tensors = fields(llm)
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 2
    assert (meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]) == (4, 2)
    assert meta["llama.embedding_length"] == 64 and meta["llama.rope.dimension_count"] == 16
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.merges"]
    lm = model.backbone.language_model()
    rows = lm.get_input_embeddings().weight.shape[0]
    assert len(meta["tokenizer.ggml.tokens"]) == rows == tensors["token_embd.weight"].shape[1]
    vocab = model.tokenizer.get_vocab()
    assert all(meta["tokenizer.ggml.tokens"][i] == t for t, i in vocab.items())
    image_id = vocab["<image>"]
    assert meta["tokenizer.ggml.token_type"][image_id] == int(gguf.TokenType.CONTROL)
    assert meta["tokenizer.ggml.eos_token_id"] == model.tokenizer.eos_token_id
    sd = {k: v.detach() for k, v in lm.state_dict().items()}
    q, k = sd["model.layers.1.self_attn.q_proj.weight"], sd["model.layers.1.self_attn.k_proj.weight"]
    got_q, got_k = values(tensors["blk.1.attn_q.weight"]), values(tensors["blk.1.attn_k.weight"])
    assert np.array_equal(got_q, permute_rows(q, 4).numpy()) and not np.array_equal(got_q, q.numpy())
    assert np.array_equal(got_k, permute_rows(k, 2).numpy())
    d = 16  # head dim: row 2j of a head is row j, row 2j+1 is row j + d/2 (llama.cpp's adjacent-pair RoPE)
    assert np.array_equal(got_q[2 * 3], q[3].numpy()) and np.array_equal(got_q[2 * 3 + 1], q[3 + d // 2].numpy())
    assert np.array_equal(values(tensors["blk.0.ffn_gate.weight"]), sd["model.layers.0.mlp.gate_proj.weight"].numpy())
    assert np.array_equal(values(tensors["output.weight"]), sd["lm_head.weight"].numpy())
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32

    meta, tensors = fields(mmproj)
    assert meta["general.architecture"] == "clip" and meta["clip.projector_type"] == "mlp"
    assert meta["clip.vision.block_count"] == 2 and meta["clip.vision.feature_layer"] == [2]  # -2 of 3 layers
    assert {"v.blk.0.attn_q.weight", "v.blk.1.ffn_down.weight"} <= set(tensors)
    assert not any(n.startswith(("v.blk.2.", "v.post_ln", "v.class_embd")) for n in tensors)  # SigLIP: no CLS
    assert meta["clip.use_gelu"] is True  # SigLIP's gelu_pytorch_tanh
    proj = dict(model.projectors["image"].named_parameters())
    assert np.array_equal(values(tensors["mm.0.weight"]), proj["net.0.weight"].detach().numpy())
    assert np.array_equal(values(tensors["mm.2.bias"]), proj["net.2.bias"].detach().numpy())
    tower = model.encoders["image"].model.state_dict()
    fc1 = next(v for k, v in tower.items() if k.endswith("layers.1.mlp.fc1.weight"))
    assert np.array_equal(values(tensors["v.blk.1.ffn_up.weight"]), fc1.numpy())
    assert meta["clip.vision.image_size"] == 32 and len(meta["clip.vision.image_mean"]) == 3


def test_q8_0_and_f16_round_within_their_precision_and_clip_keeps_its_class_token(bpe: Path, tmp_path: Path) -> None:
    model = mmhub.build(spec(bpe, "clip_vision_model"))
    sd = {k: v.detach() for k, v in model.backbone.language_model().state_dict().items()}
    w = sd["model.layers.0.mlp.down_proj.weight"].numpy()
    for qtype, kind, tol in (("q8_0", gguf.GGMLQuantizationType.Q8_0, 0.01), ("f16", gguf.GGMLQuantizationType.F16,
                                                                           1e-3)):
        with pytest.warns(UserWarning, match="class token of CLIP towers"):  # llama.cpp computes it otherwise
            llm, mmproj = export_gguf(model, tmp_path / qtype, qtype)
        _, tensors = fields(llm)
        t = tensors["blk.0.ffn_down.weight"]
        assert t.tensor_type == kind
        err = np.abs(values(t) - w).max() / np.abs(w).max()
        assert 0 < err < tol, (qtype, err)
        assert tensors["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
        meta, vt = fields(mmproj)
        assert vt["mm.0.weight"].tensor_type == gguf.GGMLQuantizationType.F16  # mmproj matrices: f16
        assert {"v.class_embd", "v.pre_ln.weight"} <= set(vt) and meta["clip.use_gelu"] is False  # quick GELU
        assert vt["v.position_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def _variant(bpe: Path, **over: Any) -> dict[str, Any]:
    return spec(bpe, **over)


@pytest.mark.parametrize("name, change, blocking", [
    ("timm-tower", {"encoders.image": {"type": "timm", "model": "resnet10t"}},
     ["encoders.image (timm)"]),
    ("linear-projector", {"projectors.image": {"type": "linear"}}, ["projectors.image: llama.cpp's mlp projector"]),
    ("relu-projector", {"projectors.image.activation": "relu"}, ["linear -> relu -> linear"]),
    ("word-tokenizer", {"backbone.tokenizer": "words:mmhub:recipes/easyvqa-words.txt"},
     ["GGUF export writes byte-level BPE tokenizers", "this one is WordLevel"]),
    ("qwen2-llm", {"backbone.config": {**LLAMA, "model_type": "qwen2"}}, ["backbone (model_type qwen2)"]),
    ("clip-keeps-cls", {"encoders.image.config": {**VISION, "model_type": "clip_vision_model"},
                        "encoders.image.drop_cls": False}, ["drop_cls: false"]),
])
def test_models_llama_cpp_cannot_express_name_the_blocking_slot(name: str, change: dict, blocking: list[str],
                                                                 bpe: Path, tmp_path: Path) -> None:
    model = mmhub.build(_variant(bpe, **copy.deepcopy(change)))
    with pytest.raises(ExportError) as exc:
        export_gguf(model, tmp_path / name, "f16")
    for text in blocking:
        assert text in str(exc.value), str(exc.value)
    assert not (tmp_path / name).exists()  # nothing written


def test_cli_export_gguf(bpe: Path, tmp_path: Path, capsys) -> None:
    from mmhub.cli import main

    mmhub.build(spec(bpe)).save_pretrained(tmp_path / "m")
    assert main(["export", str(tmp_path / "m"), str(tmp_path / "g"), "--format", "gguf", "--type", "q8_0",
                 "--allow-path", str(bpe)]) == 0
    out = capsys.readouterr().out
    assert "gguf-tiny.gguf" in out and "mmproj-gguf-tiny.gguf" in out and "llama-mtmd-cli" in out
    meta, _ = fields(tmp_path / "g" / "gguf-tiny.gguf")
    assert meta["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    with pytest.raises(SystemExit):  # argparse names the types it takes
        main(["export", str(tmp_path / "m"), str(tmp_path / "h"), "--format", "gguf", "--type", "q4"])
    assert "invalid choice: 'q4' (choose from 'f32', 'f16', 'q8_0')" in capsys.readouterr().err


def test_every_blocking_problem_is_listed_before_the_adapters_are_merged(bpe: Path, tmp_path: Path,
                                                                         monkeypatch) -> None:
    """Two blocking parts at once (a Qwen2 LLM and a word tokenizer) in one error, found before the LoRA-merged copy
    (twice the model's memory) or any tensor map is built."""
    import mmhub.adapters
    from mmhub.adapters import inject_adapter
    from mmhub.spec import LoraSpec

    model = mmhub.build(_variant(bpe, **{"backbone.config": {**LLAMA, "model_type": "qwen2"},
                                         "backbone.tokenizer": "words:mmhub:recipes/easyvqa-words.txt"}))
    inject_adapter(model, "backbone", LoraSpec(r=2, alpha=4, target_modules=["q_proj"]))

    def no_copy(_model):
        raise AssertionError("the merged copy was built before the problems were found")

    monkeypatch.setattr(mmhub.adapters, "merged_copy", no_copy)
    with pytest.raises(ExportError) as exc:
        export_gguf(model, tmp_path / "both", "f16")
    text = str(exc.value)
    assert "2 problem(s)" in text and "backbone (model_type qwen2)" in text and "this one is WordLevel" in text, text
    assert not (tmp_path / "both").exists()
