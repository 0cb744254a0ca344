"""Qwen's tiktoken rank file as a transformers tokenizer: on a small rank file trained here (random byte order, merges
learned from a sample text), the converted tokenizer encodes like tiktoken's algorithm (Qwen's split pattern, then
lowest-rank byte-pair merges; re-implemented below), decodes back exactly, and puts Qwen-VL's special tokens at the ids
tokenization_qwen.py gives them; a Qwen-VL folder with only qwen.tiktoken imports without trust_remote_code."""

from __future__ import annotations

import base64
import json
import random
from collections import Counter
from pathlib import Path

import pytest
import regex
import torch
from PIL import Image
from safetensors.torch import save_file

from mmhub.errors import CheckpointError
from mmhub.importers import import_checkpoint
from mmhub.importers.convert_qwen_tiktoken import QWEN_PATTERN, qwen_tokenizer, read_ranks

SAMPLE = ("The quick brown fox jumps over the lazy dog. The dog didn't mind; it's 2024 and 31415 foxes\n\n"
          "said: 'they're here!'  Über-naïve café — 東京 タワー 123.\tTabs\r\nand  spaces   end ") * 3


def train_ranks(text: str, merges: int, seed: int = 0) -> dict[bytes, int]:
    """A tiktoken-style rank table: the 256 bytes in a shuffled order, then `merges` BPE merges learned on `text`
    (pieces from Qwen's split pattern, the most frequent adjacent pair merged each round)."""
    order = list(range(256))
    random.Random(seed).shuffle(order)
    ranks = {bytes([b]): i for i, b in enumerate(order)}
    words = [[bytes([b]) for b in piece.encode()] for piece in regex.findall(QWEN_PATTERN, text)]
    for _ in range(merges):
        pairs = Counter((w[i], w[i + 1]) for w in words for i in range(len(w) - 1))
        if not pairs:
            break
        (left, right), _ = max(pairs.items(), key=lambda kv: (kv[1], -ranks[kv[0][0]], -ranks[kv[0][1]]))
        ranks.setdefault(left + right, len(ranks))
        for w in words:
            i = 0
            while i < len(w) - 1:
                if w[i] == left and w[i + 1] == right:
                    w[i:i + 2] = [left + right]
                i += 1
    return ranks


def tiktoken_encode(ranks: dict[bytes, int], text: str) -> list[int]:
    """tiktoken's encoding: split with the pattern; a piece in the table is one token, otherwise its bytes are merged
    pair by pair, always the adjacent pair whose merge has the lowest rank (the leftmost on a tie)."""
    out = []
    for piece in regex.findall(QWEN_PATTERN, text):
        data = piece.encode()
        if data in ranks:
            out.append(ranks[data])
            continue
        parts = [bytes([b]) for b in data]
        while len(parts) > 1:
            best = min(((ranks.get(parts[i] + parts[i + 1], None), i) for i in range(len(parts) - 1)),
                       key=lambda m: (m[0] is None, m[0] if m[0] is not None else 0, m[1]))
            if best[0] is None:
                break
            parts[best[1]:best[1] + 2] = [parts[best[1]] + parts[best[1] + 1]]
        out += [ranks[p] for p in parts]
    return out


def write_ranks(path: Path, ranks: dict[bytes, int]) -> Path:
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return path


def test_the_converted_tokenizer_encodes_as_tiktoken_and_places_the_special_tokens(tmp_path: Path) -> None:
    ranks = train_ranks(SAMPLE, merges=120)
    assert len(ranks) > 300
    tok = qwen_tokenizer(read_ranks(write_ranks(tmp_path / "qwen.tiktoken", ranks)))
    rng = random.Random(1)  # new words glued from pieces of the sample: partly mergeable, rarely whole tokens
    glued = ["".join(SAMPLE[i:i + rng.randint(2, 6)] for i in rng.sample(range(len(SAMPLE) - 6), 8)) for _ in range(40)]
    texts = [SAMPLE, "the foxes' café didn't", "  leading spaces and 99 digits\n", "unseen: zebra quartz ǅ 🙂", *glued]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == tiktoken_encode(ranks, text), text
        assert tok.decode(ids) == text
    n = len(ranks)
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|extra_204|>"]) == \
        [n, n + 1, n + 2, n + 207]
    assert tok.convert_tokens_to_ids(["<ref>", "<img>", "</img>", "<imgpad>"]) == [n + 208, n + 214, n + 215, n + 216]
    assert tok("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"][0] == n + 1


def test_a_damaged_rank_file_is_refused_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "qwen.tiktoken"
    path.write_text("YQ== 0\nnot-base64!! 1\n")
    with pytest.raises(CheckpointError, match=r"qwen.tiktoken:2 is not 'base64-token rank'"):
        read_ranks(path)
    path.write_text("YQ== 0\nYg== 5\n")
    with pytest.raises(CheckpointError, match="ranks are not 0..1"):
        read_ranks(path)


def test_a_qwen_vl_folder_with_only_qwen_tiktoken_imports_without_its_code(tmp_path: Path, monkeypatch) -> None:
    from test_convert_qwen_vl import CONFIG, VISUAL, random_state

    monkeypatch.setenv("MMHUB_HOME", str(tmp_path / "home"))
    ranks = train_ranks(SAMPLE, merges=40)
    cfg = {**CONFIG, "vocab_size": len(ranks) + 224, "visual": {**VISUAL, "image_start_id": len(ranks) + 214}}
    folder = tmp_path / "qwen-vl-tiktoken"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file(random_state(cfg), str(folder / "model.safetensors"))
    write_ranks(folder / "qwen.tiktoken", ranks)
    (folder / "tokenization_qwen.py").write_text("raise SystemExit('the checkpoint code ran')\n")
    model = import_checkpoint(folder)  # auto_map and tokenizer code present; neither runs
    assert any("qwen.tiktoken converted" in n for n in model.import_notes)
    assert model.tokenizer.convert_tokens_to_ids("<img>") == cfg["visual"]["image_start_id"]
    batch = model.batch([[{"role": "user", "content": f"{model.spec.placeholder('image')}the fox?"},
                          {"role": "assistant", "content": "a dog"}]],
                        [{"image": [Image.new("RGB", (32, 32), (200, 30, 90))]}])
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()
