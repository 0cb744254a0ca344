"""Tiny random BLIP-2 / InstructBLIP checkpoints written by transformers itself, for the importers' parity tests.

`tiny_blip_folder` builds ``Blip2ForConditionalGeneration`` or ``InstructBlipForConditionalGeneration`` from
their own config classes shrunk (2-layer towers and LMs, widths 32-48, 32-pixel images, a few hundred tokens),
moves every weight away from its initialisation (so a wrong mapping shows in the outputs), and saves it with
its processor: a byte-level LM tokenizer with the family's ``<image>`` token and the tokenizer's own special
tokens (BOS first for OPT, EOS last for T5), a 32-pixel BLIP image processor, and, for InstructBLIP, a small
BERT WordPiece tokenizer for the Q-Former. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import processors

from mmhub.backbones.byte_tokenizer import byte_tokenizer

VISION = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 2,
          "image_size": 32, "patch_size": 8}
QFORMER = {"hidden_size": 32, "intermediate_size": 44, "num_hidden_layers": 3, "num_attention_heads": 4,
           "cross_attention_frequency": 2, "encoder_hidden_size": 32, "max_position_embeddings": 64}
OPT = {"model_type": "opt", "hidden_size": 48, "ffn_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
       "vocab_size": 300, "max_position_embeddings": 128, "word_embed_proj_dim": 48}
T5 = {"model_type": "t5", "d_model": 48, "d_kv": 12, "d_ff": 64, "num_layers": 2, "num_decoder_layers": 2,
      "num_heads": 4, "vocab_size": 300, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}
LLAMA = {"model_type": "llama", "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 256}
LMS = {"opt": OPT, "t5": T5, "llama": LLAMA}
QUERIES = 4
BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "what", "is", "in", "the", "image", "picture", "colour",
              "color", "of", "a", "this", "describe", "question", "answer", ":", "?", ".", ",", "how", "many", "red"]


def lm_tokenizer(kind: str) -> Any:
    """The byte-level tokenizer with ``<image>`` and the LM's own special tokens around a text (BOS first for
    decoder-only LMs, EOS last for T5), as ``tokenizer(text)`` adds them."""
    tok = byte_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<image>"]})
    if kind == "t5":
        tok._tokenizer.post_processor = processors.TemplateProcessing(
            single="$A </s>", special_tokens=[("</s>", tok.eos_token_id)])
    else:
        tok._tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    return tok


def bert_tokenizer() -> Any:
    """A small uncased BERT WordPiece tokenizer (the Q-Former's)."""
    from transformers import BertTokenizerFast

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [f"##{chr(c)}" for c in range(ord("a"), ord("z") + 1)]
    words = BERT_WORDS + [w for w in letters if w not in BERT_WORDS]
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)


def perturb(model: torch.nn.Module, seed: int, std: float = 0.1) -> None:
    """Move every parameter away from its initialisation: N(0, std) weights, 1 + N(0, std) norm scales."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            scale = name.endswith("weight") and p.ndim == 1 and "norm" in name.lower()
            p.copy_((1.0 + noise) if scale else noise)


def tiny_blip_folder(folder: Path, family: Literal["blip-2", "instructblip", "instructblipvideo"] = "blip-2",
                     lm: str = "opt", seed: int = 0) -> Path:
    """Write a tiny random BLIP-2 / InstructBLIP / InstructBLIP-Video checkpoint with its processor to `folder`;
    returns the folder."""
    from transformers import BlipImageProcessor

    folder = Path(folder)
    torch.manual_seed(seed)
    tok = lm_tokenizer(lm)
    text = dict(LMS[lm])
    kind = text.pop("model_type")
    image_id = tok.convert_tokens_to_ids("<image>")
    special = {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}
    if kind == "t5":
        special["decoder_start_token_id"] = tok.pad_token_id
    else:
        special["bos_token_id"] = tok.bos_token_id
    images = BlipImageProcessor(size={"height": VISION["image_size"], "width": VISION["image_size"]})
    if family == "blip-2":
        from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor

        config = Blip2Config(vision_config=VISION, qformer_config=QFORMER, text_config={"model_type": kind, **text,
                                                                                          **special},
                             num_query_tokens=QUERIES, image_token_index=image_id)
        model = Blip2ForConditionalGeneration(config)
        processor = Blip2Processor(images, tok, num_query_tokens=QUERIES)
    elif family == "instructblipvideo":
        from transformers import (
            InstructBlipVideoConfig,
            InstructBlipVideoForConditionalGeneration,
            InstructBlipVideoProcessor,
            InstructBlipVideoVideoProcessor,
        )

        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<image>", "<video>"]})
        qtok = bert_tokenizer()
        qformer = {**QFORMER, "vocab_size": len(qtok) + 3, "pad_token_id": qtok.pad_token_id}
        config = InstructBlipVideoConfig(vision_config=VISION, qformer_config=qformer,
                                         text_config={"model_type": kind, **text, **special}, num_query_tokens=QUERIES,
                                         video_token_index=tok.convert_tokens_to_ids("<video>"))
        model = InstructBlipVideoForConditionalGeneration(config)
        frames = InstructBlipVideoVideoProcessor(size={"height": VISION["image_size"], "width": VISION["image_size"]})
        processor = InstructBlipVideoProcessor(frames, tok, qtok, num_query_tokens=QUERIES)
    else:
        from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration, InstructBlipProcessor

        qtok = bert_tokenizer()
        qformer = {**QFORMER, "vocab_size": len(qtok) + 3, "pad_token_id": qtok.pad_token_id}
        config = InstructBlipConfig(vision_config=VISION, qformer_config=qformer,
                                    text_config={"model_type": kind, **text, **special},
                                    num_query_tokens=QUERIES, image_token_index=image_id)
        model = InstructBlipForConditionalGeneration(config)
        processor = InstructBlipProcessor(images, tok, qtok, num_query_tokens=QUERIES)
    perturb(model, seed)
    model.eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def hf_ids(model: Any, batch: dict[str, Any], modality: str = "image") -> list[list[int]]:
    """mmhub's prompt token ids per row (padding dropped) with each media placeholder repeated once per projected
    token: the ids transformers' BLIP processors give for the same text."""
    pid, n = model.processor.placeholder_ids[modality], model.plan.tokens_per_item(modality)
    rows = []
    for ids, mask, labels in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(),
                                 batch["labels"].tolist(), strict=True):
        rows.append([x for t, m, lab in zip(ids, mask, labels, strict=True) if m and lab == -100
                     for x in ([pid] * n if t == pid else [t])])
    return rows


def first_stop(ids: list[int], stops: set[int]) -> list[int]:
    """`ids` up to (not including) the first stop token."""
    for i, t in enumerate(ids):
        if t in stops:
            return ids[:i]
    return ids


def logit_diff(model: Any, hf: Any, processor: Any, pictures: list[Any], prompts: list[str],
               answers: list[str], modality: str = "image") -> float:
    """Max |mmhub - transformers| logit over every real position of a batch of (image, prompt, answer) samples, after
    checking that mmhub's prompt token ids and pixels equal the family processor's (AssertionError otherwise)."""
    mark = model.spec.placeholder(modality)
    convs = [[{"role": "user", "content": f"{mark}{p}"}, {"role": "assistant", "content": a}]
             for p, a in zip(prompts, answers, strict=True)]
    batch = model.batch(convs, [{modality: [im]} for im in pictures])
    enc = processor(images=pictures, text=prompts, padding=True, return_tensors="pt")
    theirs_ids = [row[mask.bool()].tolist() for row, mask in zip(enc["input_ids"], enc["attention_mask"], strict=True)]
    assert hf_ids(model, batch, modality) == theirs_ids, "mmhub's prompt tokens differ from the processor's"
    assert torch.allclose(batch["media"][modality], enc["pixel_values"], atol=1e-6), "pixels differ"
    extra = {k: v for k, v in enc.items() if k.startswith("qformer_")}
    with torch.no_grad():
        out = model(**batch)
        if model.is_encoder_decoder:  # the decoder is teacher-forced on the answer behind the start token, as in mmhub
            target, keep = out.labels, out.labels != -100
            start = torch.full_like(target[:, :1], model.backbone.decoder_start_token_id)
            dec = torch.cat([start, target[:, :-1].masked_fill(~keep[:, :-1], model.processor.pad_id)], 1)
            dec_mask = torch.cat([torch.ones_like(keep[:, :1]), keep[:, :-1]], 1).long()
            theirs = hf(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                        pixel_values=enc["pixel_values"], decoder_input_ids=dec, decoder_attention_mask=dec_mask,
                        **extra).logits
            real = keep
            ours = out.logits
        else:  # the whole sequence (prompt + answer) in one causal pass
            full = [hf_ids(model, {**batch, "labels": torch.full_like(batch["labels"], -100)}, modality)[i]
                    for i in range(len(prompts))]
            ids = torch.full((len(full), max(map(len, full))), model.processor.pad_id)
            mask = torch.zeros_like(ids)
            for i, row in enumerate(full):
                ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
            theirs = hf(input_ids=ids, attention_mask=mask, pixel_values=enc["pixel_values"], **extra).logits
            real = mask.bool()
            ours = out.logits[:, :ids.shape[1]]
    vocab = ours.shape[-1]
    return float((ours[real] - theirs[..., :vocab][real]).abs().max())


def greedy_pair(model: Any, hf: Any, processor: Any, pictures: list[Any], prompts: list[str],
                new_tokens: int, modality: str = "image") -> tuple[list[list[int]], list[list[int]]]:
    """Greedy tokens per prompt (stop tokens cut): mmhub's chat API (one batch) and transformers' generate (one
    prompt at a time)."""
    mark = model.spec.placeholder(modality)
    replies = model.generate([f"{mark}{p}" for p in prompts], [{modality: [im]} for im in pictures],
                             max_new_tokens=new_tokens)
    stops = set(model.stop_token_ids())
    theirs = []
    for p, im in zip(prompts, pictures, strict=True):
        enc = processor(images=[im], text=[p], return_tensors="pt")
        with torch.no_grad():
            out = hf.generate(**enc, max_new_tokens=new_tokens, do_sample=False)[0].tolist()
        out = out[1:] if model.is_encoder_decoder else out[enc["input_ids"].shape[1]:]  # drop start token / prompt
        theirs.append(first_stop(out, stops))
    return [r.token_ids for r in replies], theirs
