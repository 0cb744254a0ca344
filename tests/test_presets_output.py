"""The any-to-any presets (NExT-GPT, MiniGPT-5, CoDi-2) end to end at tiny size: taught for a few steps to
answer a generation request with signal tokens, each turns a prompt into text plus generated media of the
right kinds and shapes through its own output projectors and diffusers generators."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmhub import build
from mmhub.interfaces import Audio
from mmhub.signals import group_marker

REQUESTS = {"image": ("draw a red circle", "a red circle"), "video": ("film a red ball", "a red ball rolling"),
            "audio": ("play a low tone", "a low tone")}
EXPECT = {"next-gpt": ("output_transformer", {"image", "video", "audio"}),
          "minigpt-5": ("output_qformer", {"image"}),
          "codi-2": ("output_mlp", {"image", "video", "audio"})}


def teach(model, modalities) -> tuple[float, float, float]:
    """A few full-model steps on one request per output modality; returns the first and last alignment
    losses and the last language-model loss."""
    encs = []
    for m in sorted(modalities):
        prompt, caption = REQUESTS[m]
        e = model.processor.encode([{"role": "user", "content": prompt},
                                    {"role": "assistant", "content": f"ok {group_marker(m)}"}])
        e.outputs = {m: [caption]}
        encs.append(e)
    b = model.processor.collate(encs)
    model.train()
    model.requires_grad_(True)
    opt = torch.optim.Adam([p for n, p in model.named_parameters() if not n.startswith(("generators.", "encoders."))],
                           3e-3)
    first = None
    for step in range(300):  # at least 100 steps; on until each reply's marker is learnt (the LM loss is small)
        out = model(b["input_ids"], b["attention_mask"], b["labels"], outputs=b["outputs"])
        first = float(out.output_loss.detach()) if first is None else first
        if step >= 100 and float((out.loss - out.output_loss).detach()) < 0.02:
            break
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model.eval()
    return first, float(out.output_loss.detach()), float((out.loss - out.output_loss).detach())


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_any_to_any_preset_generates_text_and_media(name: str) -> None:
    torch.manual_seed(0)
    model = build(f"{name}:tiny")
    projector, outputs = EXPECT[name]
    assert set(model.generators) == outputs == set(model.output_projectors)
    assert {p.name for p in model.output_projectors.values()} == {projector}
    for m in outputs:  # validation matched each projector to its generator's conditioning
        facts = model.plan.generator_facts[m]
        cfg = model.plan.output_projectors[m].config
        assert (cfg.out_len, cfg.out_dim) == (facts.cond_len, facts.cond_dim)
    align_first, align_last, lm = teach(model, outputs)
    assert lm < 0.3 and align_last < 0.5 * align_first, (lm, align_first, align_last)
    for m in sorted(outputs):
        reply = model.generate([REQUESTS[m][0]], max_new_tokens=16, seed=0)[0]
        assert "<" not in reply.text and reply.text.strip() == "ok", reply
        assert list(reply.media) == [m], (m, reply.media)
        item = reply.media[m][0]
        if m == "image":
            assert isinstance(item, Image.Image) and item.size == (32, 32)
        elif m == "video":
            assert len(item) == 2 and all(isinstance(f, Image.Image) and f.size == (32, 32) for f in item)
        else:
            assert isinstance(item, Audio) and item.sample_rate == 16000 and item.samples.ndim == 1
            assert item.samples.dtype == np.float32 and np.isfinite(item.samples).all()
