"""A byte-level tokenizer built in code, for backbones built from a config with random weights.

Tiny test models need a real tokenizer without downloading one: this maps each
UTF-8 byte to one token (256 ids) plus ``<s>``, ``</s>``, ``<pad>`` and the ChatML
markers, so every text round-trips exactly and every named template works.
"""

from __future__ import annotations

from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]


@lru_cache(maxsize=1)
def _byte_vocab() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte -> that byte's value (so id == byte)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    assert set(chars.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    return {c: b for b, c in chars.items()}


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh 261-token byte-level tokenizer (ids 0-255 are bytes, then the special tokens)."""
    tok = Tokenizer(models.BPE(vocab=dict(_byte_vocab()), merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return fast
