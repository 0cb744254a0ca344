"""Qwen(-VL)'s tiktoken vocabulary (``qwen.tiktoken``) as a transformers fast tokenizer, without its Python.

Qwen-VL ships its tokenizer as code (``tokenization_qwen.py``) over a tiktoken rank file: one ``base64(token) rank``
per line. This module reads that file and builds the equivalent byte-level BPE with the ``tokenizers`` package:

* vocabulary: each token's bytes in GPT-2's byte-to-unicode alphabet, id = its rank;
* merges: for every multi-byte token, each split into two tokens that are both in the vocabulary, ordered by the
  merged token's rank (then by the parts' ranks); with ``ignore_merges`` a pre-token that is itself a vocabulary entry
  is emitted whole, as tiktoken does, and otherwise the lowest-rank merge is applied first, as tiktoken's byte-pair
  merge does;
* pre-tokenizer: Qwen's split pattern (single digits, case-insensitive English contractions), then byte-level;
* special tokens after the ranks, in ``tokenization_qwen.py``'s order: ``<|endoftext|>``, ``<|im_start|>``,
  ``<|im_end|>``, ``<|extra_0|>`` ... ``<|extra_204|>``, then Qwen-VL's ``<ref>``, ``</ref>``, ``<box>``, ``</box>``,
  ``<quad>``, ``</quad>``, ``<img>``, ``</img>``, ``<imgpad>`` (so ``<img>`` is ``image_start_id``).

`qwen_tokenizer_folder` writes it once under ``$MMHUB_HOME/tokenizers/`` (keyed by the rank file's sha256), so a spec
can name it as its backbone's tokenizer.
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mmhub.errors import CheckpointError
from mmhub.weights import mmhub_home

QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", *(f"<|extra_{i}|>" for i in range(205)))
IMAGE_SPECIALS = ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>", "<imgpad>")
RANK_FILE_LIMIT = 64 * 1024 * 1024  # bytes: Qwen's is ~2.5 MB


def read_ranks(path: Path) -> dict[bytes, int]:
    """A tiktoken rank file -> {token bytes: rank}; ranks must be 0..n-1, each once."""
    size = path.stat().st_size
    if size > RANK_FILE_LIMIT:
        raise CheckpointError(f"{path} is {size} bytes, over the {RANK_FILE_LIMIT}-byte limit for a tiktoken file")
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as exc:
            raise CheckpointError(f"{path}:{n} is not 'base64-token rank' ({exc})") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise CheckpointError(f"{path}: the ranks are not 0..{len(ranks) - 1}, each once; not a tiktoken rank file")
    return ranks


def _byte_alphabet() -> dict[int, str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return bytes_to_unicode()


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The byte-level BPE vocabulary and ranked merges equivalent to tiktoken's `ranks`."""
    alphabet = _byte_alphabet()

    def text(b: bytes) -> str:
        return "".join(alphabet[x] for x in b)

    vocab = {text(tok): rank for tok, rank in ranks.items()}
    ranked: list[tuple[int, int, int, bytes, bytes]] = []
    for tok, rank in ranks.items():
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in ranks and right in ranks:
                ranked.append((rank, ranks[left], ranks[right], left, right))
    ranked.sort(key=lambda m: m[:3])
    return vocab, [(text(left), text(right)) for *_, left, right in ranked]


def qwen_tokenizer(ranks: dict[bytes, int]) -> Any:
    """Qwen(-VL)'s tokenizer over `ranks` as a transformers ``PreTrainedTokenizerFast``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab, merges = vocab_and_merges(ranks)
    bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=True)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   unk_token=None, bos_token=None)
    fast.add_special_tokens({"additional_special_tokens": list(SPECIALS + IMAGE_SPECIALS)})
    expected = len(ranks)
    for token in SPECIALS + IMAGE_SPECIALS:
        if fast.convert_tokens_to_ids(token) != expected:
            raise CheckpointError(f"the converted Qwen tokenizer gave {token} the id "
                                  f"{fast.convert_tokens_to_ids(token)}, not {expected} as tokenization_qwen.py does")
        expected += 1
    return fast


def qwen_tokenizer_folder(rank_file: Path) -> Path:
    """The converted tokenizer of `rank_file`, saved (once) under ``$MMHUB_HOME/tokenizers/``; its folder."""
    digest = hashlib.sha256(rank_file.read_bytes()).hexdigest()[:16]
    folder = mmhub_home() / "tokenizers" / f"qwen-tiktoken-{digest}"
    if (folder / "tokenizer.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    if folder.exists():  # a damaged earlier write
        shutil.rmtree(folder)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    qwen_tokenizer(read_ranks(rank_file)).save_pretrained(str(staging))
    try:
        staging.rename(folder)
    except OSError:  # another process finished the same folder first
        shutil.rmtree(staging, ignore_errors=True)
    return folder
