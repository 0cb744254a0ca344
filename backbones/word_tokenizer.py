"""A word-level tokenizer built in code from a word list, for tiny from-scratch models on a closed vocabulary.

``tokenizer: words:URI`` (URI names a text file with one word or symbol per line)
gives every word one id after the special tokens (``<s> </s> <pad> <unk>`` and the
ChatML markers); text splits on whitespace and punctuation, and decoding joins
words with spaces. A model over easy-VQA's 28 words then reads a question in ~8
tokens instead of ~35 bytes.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<s>", "</s>", "<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]


def word_tokenizer(word_file: Path) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer over the words in `word_file` (one per line; blank lines ignored)."""
    words = [w.strip() for w in Path(word_file).read_text(encoding="utf-8").splitlines() if w.strip()]
    if not words:
        raise ValueError(f"{word_file} holds no words; write one word or symbol per line")
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return fast
