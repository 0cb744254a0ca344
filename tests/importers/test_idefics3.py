"""Idefics3 and SmolVLM import: a tiny random model of each written by transformers (with its processor and chat
template, no image splitting) imports as hf_vision -> pixel_shuffle -> Llama and matches transformers on the
processor's own inputs: the same text from the chat template, the same pixels, logits at every real position, greedy
tokens; the connector alone equals Idefics3Connector; what the import does not reproduce is stated in its notes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor

from mmhub.importers import import_checkpoint
from mmhub.importers.idefics3 import preprocessing
from mmhub.projectors.pixel_shuffle import PixelShuffleConfig, PixelShuffleProjector

TOL = 1e-4
VISION = {"model_type": "idefics3_vision", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 2, "image_size": 32, "patch_size": 8}
TEXT = {"model_type": "llama", "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 320, "max_position_embeddings": 256,
        "bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258}
# Idefics3-8B-Llama3's chat template, with this tokenizer's bos in place of <|begin_of_text|>
CHAT_TEMPLATE = ("<s>{% for message in messages %}{{message['role'] | capitalize}}"
                 "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
                 "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
                 "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
                 "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
QUESTIONS = ["What is this?", "Describe the colours in detail."]
ANSWERS = ["A cat.", "Grey and red."]


def tokenizer(smolvlm: bool) -> Any:
    from mmhub.backbones.byte_tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    specials = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
    tok.add_special_tokens({"extra_special_tokens": specials + [f"<row_{i}_col_{j}>" for i in range(1, 7)
                                                                for j in range(1, 7)]},
                           replace_extra_special_tokens=False)
    if smolvlm:  # SmolVLM's bos is <|im_start|>, which its chat template writes first
        tok.bos_token = "<|im_start|>"
    return tok


def idefics3_folder(folder: Path, family: str = "idefics3", seed: int = 0) -> Path:
    """An Idefics3 or SmolVLM folder written by transformers: shrunk config, weights moved off their init, its
    processor (PIL image processor, no image splitting, first resize to 48 px, 4 image tokens) and chat template."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor

    smolvlm = family == "smolvlm"
    tok = tokenizer(smolvlm)
    if smolvlm:
        pytest.importorskip("num2words")  # SmolVLMProcessor refuses to start without it (video frame timestamps)
        from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMProcessor, SmolVLMVideoProcessor
        from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil as Images
        from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

        config_cls, model_cls = SmolVLMConfig, SmolVLMForConditionalGeneration
        vision = {**VISION, "model_type": "smolvlm_vision"}
        text = {**TEXT, "bos_token_id": tok.bos_token_id}
    else:
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil as Images

        config_cls, model_cls, vision, text = Idefics3Config, Idefics3ForConditionalGeneration, VISION, TEXT
    config = config_cls(vision_config=vision, text_config=text, scale_factor=2,
                        image_token_id=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    hf = model_cls(config)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    hf.save_pretrained(str(folder))
    images = Images(size={"longest_edge": 48}, max_image_size={"longest_edge": 32}, do_image_splitting=False)
    if smolvlm:
        processor = SmolVLMProcessor(image_processor=images, tokenizer=tok, video_processor=SmolVLMVideoProcessor(),
                                     image_seq_len=4, chat_template=DEFAULT_CHAT_TEMPLATE)
    else:
        processor = Idefics3Processor(image_processor=images, tokenizer=tok, image_seq_len=4,
                                      chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module", params=["idefics3", "smolvlm"])
def folder(request, tmp_path_factory) -> Path:
    return idefics3_folder(tmp_path_factory.mktemp(request.param) / "tiny", request.param)


@pytest.fixture(scope="module")
def pictures() -> list[Image.Image]:
    rng = np.random.default_rng(5)  # not square: the processor's aspect-keeping resize comes first
    return [Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)) for shape in ((45, 32, 3), (50, 71, 3))]


def reference(folder: Path) -> tuple[Any, Any]:
    """transformers' model and processor, with the image processor's PIL backend (it resizes as mmhub does)."""
    processor = AutoProcessor.from_pretrained(str(folder))  # (SmolVLM's video processor has no PIL backend)
    processor.image_processor = AutoImageProcessor.from_pretrained(str(folder), backend="pil")
    return AutoModelForImageTextToText.from_pretrained(str(folder)).eval(), processor


def hf_messages(question: str, answer: str | None) -> list[dict[str, Any]]:
    turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if answer is not None:
        turns.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return turns


def test_connector_equals_idefics3_connector() -> None:
    from transformers import Idefics3Config
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

    for scale in (2, 3):
        config = Idefics3Config(vision_config={**VISION, "hidden_size": 8}, text_config=TEXT, scale_factor=scale)
        theirs = Idefics3Connector(config)
        ours = PixelShuffleProjector(PixelShuffleConfig(in_dim=8, out_dim=48, scale_factor=scale), None)
        ours.proj.load_state_dict(theirs.modality_projection.proj.state_dict())
        x = torch.randn(3, 36, 8)
        assert torch.equal(ours(x), theirs(x)), f"scale_factor {scale}"
    with pytest.raises(ValueError, match="7 x 7 token grid does not split into 2 x 2 blocks; fix: set scale_factor"):
        PixelShuffleProjector.num_tokens(PixelShuffleConfig(scale_factor=2), 49)


def test_imported_idefics3_logits_equal_transformers(folder: Path, pictures) -> None:
    model = import_checkpoint(folder)
    assert model.imported_from == {"folder": str(folder), "importer": "idefics3",
                                   "model_type": json.loads((folder / "config.json").read_text())["model_type"]}
    assert not model.import_notes
    assert model.spec.projectors["image"].type == "pixel_shuffle" and model.plan.tokens_per_item("image") == 4
    hf, processor = reference(folder)
    convs = [[{"role": "user", "content": "<image>" + q}, {"role": "assistant", "content": a}]
             for q, a in zip(QUESTIONS, ANSWERS, strict=True)]
    ours_in = model.batch(convs, [{"image": [p]} for p in pictures])
    texts = [processor.apply_chat_template(hf_messages(q, a)) for q, a in zip(QUESTIONS, ANSWERS, strict=True)]
    theirs_in = processor(images=[[p] for p in pictures], text=texts, padding="longest", return_tensors="pt")
    assert torch.equal(ours_in["media"]["image"], theirs_in["pixel_values"][:, 0])  # the same pixels
    with torch.no_grad():
        out = model(**ours_in)
        theirs = hf(**theirs_in).logits
    real = theirs_in["attention_mask"].bool()
    ids = theirs_in["input_ids"]
    # the same token sequence: every text token of the processor's sits where mmhub's spliced labels put it
    labelled = out.labels[:, :real.shape[1]] != -100
    assert labelled.any() and torch.equal(out.labels[:, :real.shape[1]][labelled], ids[labelled])
    diff = float((out.logits[:, :real.shape[1]][real] - theirs[real]).abs().max())
    family = model.imported_from["model_type"]
    assert diff <= TOL, f"{family}: max abs logit diff {diff:.3g} > {TOL}"
    print(f"{family} max abs logit diff {diff:.3g}")


def test_the_chat_template_and_the_mmhub_template_give_the_same_text(folder: Path) -> None:
    model = import_checkpoint(folder)
    _, processor = reference(folder)
    for question, answer in zip(QUESTIONS, ANSWERS, strict=True):
        for reply in (answer, None):
            conv = [{"role": "user", "content": "<image>" + question}]
            conv += [{"role": "assistant", "content": reply}] if reply else []
            ours = "".join(t for t, _ in model.plan.template.render(conv, model.tokenizer, reply is None))
            theirs = processor.apply_chat_template(hf_messages(question, reply), add_generation_prompt=reply is None)
            wrapped = "<fake_token_around_image><global-img><image><fake_token_around_image>"
            assert ours == theirs.replace("<image>", wrapped)


def test_greedy_generation_equals_transformers(folder: Path, pictures) -> None:
    model = import_checkpoint(folder)
    hf, processor = reference(folder)
    stops = [processor.tokenizer.convert_tokens_to_ids("<end_of_utterance>"), TEXT["eos_token_id"]]
    for question, picture in zip(QUESTIONS, pictures, strict=True):
        ours = model.generate(["<image>" + question], [{"image": [picture]}], max_new_tokens=16)[0].token_ids
        text = processor.apply_chat_template(hf_messages(question, None), add_generation_prompt=True)
        inputs = processor(images=[[picture]], text=[text], return_tensors="pt")
        with torch.no_grad():
            out = hf.generate(**inputs, max_new_tokens=16, do_sample=False, eos_token_id=stops)
        theirs = out[0, inputs["input_ids"].shape[1]:].tolist()
        cut = next((i for i, t in enumerate(theirs) if t in stops), len(theirs))
        assert ours == theirs[:cut], f"greedy tokens differ on {question!r}: mmhub {ours} vs transformers {theirs}"
        assert len(set(ours)) > 1, f"degenerate generation {ours}: a wrong token could hide"  # (a stop may end it)


def test_what_is_not_reproduced_is_in_the_notes() -> None:
    settings, notes = preprocessing({"size": {"longest_edge": 1456}, "max_image_size": {"longest_edge": 364},
                                     "resample": 1, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}, 364, "here")
    assert settings == {"image_size": 364, "resize": "squash", "interpolation": "lanczos", "mean": (0.5,) * 3,
                        "std": (0.5,) * 3, "longest_edge": 1456}
    assert len(notes) == 1 and "tiles" in notes[0]
    with pytest.raises(Exception, match="max_image_size.longest_edge 512 != the tower's image_size 364"):
        preprocessing({"max_image_size": {"longest_edge": 512}}, 364, "here")


def test_saved_import_reloads_with_the_same_logits(folder: Path, pictures, tmp_path) -> None:
    """save_pretrained writes every weight (the imported spec has no source:) and the folder reloads on its own,
    reading the tokenizer from the checkpoint folder (a path outside it that the caller allows)."""
    import mmhub

    model = import_checkpoint(folder)
    out = model.save_pretrained(tmp_path / "saved")
    again = mmhub.load(str(out), allow_paths=[str(folder)]).eval()
    batch = model.batch(["<image>Is it red?"], [{"image": [pictures[0]]}])
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, again(**batch).logits)


def test_export_reloads_in_transformers_with_the_same_logits(folder: Path, pictures, tmp_path) -> None:
    """import -> export -> transformers reload (Idefics3 or SmolVLM, by the tower): the exported processor and chat
    template give the same text, ids and pixels, and the reloaded model the original's logits."""
    from mmhub.importers.idefics3 import Idefics3Importer

    out = Idefics3Importer().export(import_checkpoint(folder), tmp_path / "exported")
    assert not list(tmp_path.glob(".exported.*"))  # written through a temporary folder, nothing left behind
    original, processor = reference(folder)
    exported, exported_processor = reference(out)
    assert type(exported) is type(original)
    inputs = []
    for proc in (processor, exported_processor):
        texts = [proc.apply_chat_template(hf_messages(q, a)) for q, a in zip(QUESTIONS, ANSWERS, strict=True)]
        inputs.append(proc(images=[[p] for p in pictures], text=texts, padding="longest", return_tensors="pt"))
    assert set(inputs[0]) == set(inputs[1]) and all(torch.equal(inputs[0][k], inputs[1][k]) for k in inputs[0])
    with torch.no_grad():
        diff = float((original(**inputs[0]).logits - exported(**inputs[0]).logits).abs().max())
    assert diff <= TOL, f"exported vs original max abs logit diff {diff:.3g}"


def test_export_names_what_idefics3_has_no_place_for(folder: Path) -> None:
    from mmhub import build
    from mmhub.errors import ExportError
    from mmhub.importers.idefics3 import Idefics3Importer

    spec = import_checkpoint(folder).spec.model_dump(exclude_none=True)
    spec["projectors"]["image"] = {"type": "linear"}
    spec["backbone"]["prefix_lm"] = True
    with pytest.raises(ExportError, match="projectors.image: linear .*backbone: prefix_lm"):
        Idefics3Importer().export(build(spec), Path("unused"))
