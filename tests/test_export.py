"""Export to transformers' LLaVA and import back: equal logits and generations, LoRA merged, the image processor,
unsupported models named by their blocking component, general LLaVA folders, and the CLI."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

from mmhub import MMModel, build
from mmhub.cli import main
from mmhub.errors import MMHubError
from mmhub.export import export_hf_llava, import_hf_llava

from conftest import TINY_LLAMA

CLIP = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "image_size": 32, "patch_size": 8, "initializer_range": 0.5}
SIGLIP = {**CLIP, "model_type": "siglip_vision_model"}
OPEN_CLIP = {"type": "open_clip", "arch": None, "embed_dim": 32,
             "vision_cfg": {"image_size": 32, "patch_size": 8, "layers": 2, "width": 32, "head_width": 16}}
CONVS = [[{"role": "user", "content": "<image>\nWhat is this?"}, {"role": "assistant", "content": "A cat."}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Look: <image>\nAnd the colour?"}]]
PROMPT = "<image>\nWhat is this?"
TOL = 1e-4
MEASURED: dict[str, float] = {}  # max abs differences (logits, or tower tokens), printed at the end (pytest -s)


def spec(encoder: dict | None = None, projector: dict | None = None, llama: dict | None = None,
         template: str = "vicuna_v1",
         **top: Any) -> dict[str, Any]:
    enc = encoder if encoder and "type" in encoder else {"type": "hf_vision", "config": CLIP, **(encoder or {})}
    return {"name": "export-tiny", "encoders": {"image": enc},
            "projectors": {"image": projector or {"type": "mlp", "depth": 2, "activation": "gelu"}},
            "backbone": {"type": "hf_causal_lm", "config": {**TINY_LLAMA, **(llama or {})}, "tokenizer": "byte"},
            "template": template, **top}


@pytest.fixture(scope="module")
def pictures() -> list[Image.Image]:
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)) for shape in ((40, 40, 3), (48, 40, 3))]


def expanded(model: MMModel, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """mmhub's token ids with each image placeholder repeated once per image token, as LLaVA takes them."""
    pid, n = model.processor.placeholder_ids["image"], model.plan.tokens_per_item("image")
    rows = []
    for ids, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(), strict=True):
        rows.append([x for t, m in zip(ids, mask, strict=True) if m for x in ([pid] * n if t == pid else [t])])
    ids = torch.full((len(rows), max(map(len, rows))), model.processor.pad_id)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
    return ids, mask


def logit_diff(model: MMModel, hf: Any, pictures: list[Image.Image]) -> float:
    """Max |mmhub - transformers| logit over every real position of a 2-conversation batch (same pixels, same ids)."""
    batch = model.batch(CONVS, [{"image": [pictures[0]]}, {"image": [pictures[1]]}])
    ids, mask = expanded(model, batch)
    with torch.no_grad():
        ours = model(**batch).logits
        theirs = hf(input_ids=ids, attention_mask=mask, pixel_values=batch["media"]["image"]).logits
    vocab = ours.shape[-1]
    assert theirs.shape[-1] >= vocab
    real = mask.bool()
    assert ours.shape[1] >= real.shape[1]
    return float((ours[:, :real.shape[1]][real] - theirs[..., :vocab][real]).abs().max())


def load_hf(folder: Path) -> Any:
    return LlavaForConditionalGeneration.from_pretrained(str(folder)).eval()


VARIANTS = {
    "mlp-clip-vicuna": spec(),
    "linear-tied-chatml": spec(projector={"type": "linear"}, llama={"tie_word_embeddings": True}, template="chatml"),
    "siglip-relu-llama2": spec(encoder={"config": SIGLIP}, projector={"type": "mlp", "activation": "relu"},
                               template="llama-2"),
    "cls-layer1-size48": spec(encoder={"drop_cls": False, "select_layer": 1, "image_size": 48}),
    "image-id-past-vocab": spec(llama={"vocab_size": 261}),  # the byte tokenizer has 261 tokens: <image> gets id 261
    "past-vocab-tied-plain": spec(projector={"type": "linear", "bias": False},
                                  llama={"vocab_size": 261, "tie_word_embeddings": True}, template="plain"),
    # open_clip ViT -> transformers CLIP: nn.MultiheadAttention vs CLIP's attention differ in float rounding (~1e-6 in
    # the tower); logits of a few units (initializer_range 0.1) keep that below 1e-5 (at 0.5 it reaches ~1e-4)
    "open_clip-chatml": spec(encoder=OPEN_CLIP, llama={"initializer_range": 0.1}, template="chatml"),
    "open_clip-cls-layer1-mlp1": spec(encoder={**OPEN_CLIP, "drop_cls": False, "select_layer": 1},
                                      projector={"type": "mlp", "depth": 1}, llama={"initializer_range": 0.1}),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_exported_logits_equal_mmhub(name: str, pictures, tmp_path) -> None:
    model = build(VARIANTS[name])
    out = export_hf_llava(model, tmp_path / "llava")
    assert not list(tmp_path.glob(".llava.*"))  # written through a temp folder, nothing left behind
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))  # safetensors only
    hf = load_hf(out)
    enc = model.encoders["image"].config
    cfg = hf.config
    assert cfg.vision_feature_layer == enc.select_layer
    family = cfg.vision_config.model_type
    assert cfg.vision_feature_select_strategy == (
        "default" if enc.drop_cls and family == "clip_vision_model" else "full")
    if model.spec.encoders["image"].type == "open_clip":  # converted to transformers' CLIP: the same tokens
        pixels = model.encoders["image"].preprocess(pictures[0], "image")[None]
        with torch.no_grad():
            ours = model.encoders["image"](pixels, "image")
            theirs = hf.model.vision_tower(pixels, output_hidden_states=True).hidden_states[enc.select_layer]
        theirs = theirs[:, 1:] if enc.drop_cls else theirs
        MEASURED[f"{name}, tower tokens"] = float((ours - theirs).abs().max())
        assert MEASURED[f"{name}, tower tokens"] < 1e-5
    assert cfg.image_token_index == model.processor.placeholder_ids["image"]
    assert cfg.image_seq_length == model.plan.tokens_per_item("image")
    diff = logit_diff(model, hf, pictures)
    MEASURED[name] = diff
    assert diff < TOL, f"{name}: max abs logit diff {diff}"


def test_image_id_past_the_vocabulary_gets_a_silent_row(pictures, tmp_path) -> None:
    model = build(VARIANTS["image-id-past-vocab"])
    pid = model.processor.placeholder_ids["image"]
    assert pid == model.backbone_vocab_size == 261
    hf = load_hf(export_hf_llava(model, tmp_path / "llava"))
    assert hf.config.text_config.vocab_size == 262 and hf.generation_config.suppress_tokens == [pid]
    batch = model.batch(CONVS[:1], [{"image": [pictures[0]]}])
    ids, mask = expanded(model, batch)
    with torch.no_grad():
        logits = hf(input_ids=ids, attention_mask=mask, pixel_values=batch["media"]["image"]).logits
    assert float(logits[..., pid].abs().max()) == 0.0  # a zero lm_head row
    assert torch.equal(hf.get_input_embeddings().weight[pid], torch.zeros(hf.config.text_config.hidden_size))
    gen = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=batch["media"]["image"], max_new_tokens=24)
    assert pid not in gen[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("name", ["mlp-clip-vicuna", "image-id-past-vocab", "siglip-relu-llama2", "linear-tied-chatml",
                                  "open_clip-chatml"])
def test_greedy_generation_through_auto_processor_equals_mmhub(name: str, pictures, tmp_path) -> None:
    model = build(VARIANTS[name])
    out = export_hf_llava(model, tmp_path / "llava")
    hf = load_hf(out)
    square = pictures[0].resize((32, 32))  # at the tower's size no backend resamples: pixels agree to float rounding
    for backend, image in ((None, square), ("pil", pictures[0]), ("pil", pictures[1])):
        processor = AutoProcessor.from_pretrained(str(out), **({"backend": backend} if backend else {}))
        text = processor.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                             tokenize=False)
        listed = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
            add_generation_prompt=True, tokenize=False)
        ours = model.batch([PROMPT], [{"image": [image]}], add_generation_prompt=True, padding_side="left")
        assert text == listed == model.tokenizer.decode(ours["input_ids"][0])  # the same prompt text
        inputs = processor(images=[image], text=text, return_tensors="pt")
        assert torch.equal(inputs["input_ids"], expanded(model, ours)[0])  # the same tokens
        pixel_diff = float((inputs["pixel_values"] - ours["media"]["image"]).abs().max())  # the same pixels
        assert pixel_diff == 0.0 if backend == "pil" else pixel_diff < 1e-6
        new = hf.generate(**inputs, max_new_tokens=12)[0, inputs["input_ids"].shape[1]:].tolist()
        stops = model.stop_token_ids()
        new = new[:next((i for i, t in enumerate(new) if t in stops), len(new))]
        want = model.generate_ids(ours["input_ids"], ours["attention_mask"], ours["media"], max_new_tokens=12)[0]
        assert new == want, (name, backend)
        reply = processor.decode(new, skip_special_tokens=True).strip()
        assert reply == model.generate([PROMPT], [{"image": [image]}], max_new_tokens=12)[0].text


def test_image_processor_reproduces_mmhub_preprocessing(pictures, tmp_path) -> None:
    for variant in ("mlp-clip-vicuna", "siglip-relu-llama2", "cls-layer1-size48", "open_clip-chatml"):
        model = build(VARIANTS[variant])
        out = export_hf_llava(model, tmp_path / variant)
        pil = AutoProcessor.from_pretrained(str(out), backend="pil").image_processor
        default = AutoProcessor.from_pretrained(str(out)).image_processor
        for image in pictures:
            want = model.encoders["image"].preprocess(image, "image")
            assert torch.equal(pil(image, return_tensors="pt")["pixel_values"][0], want)
            # the torchvision backend's antialiased resize differs from PIL's by up to one grey level
            assert float((default(image, return_tensors="pt")["pixel_values"][0] - want).abs().max()) < 0.02


def test_lora_adapters_are_merged_without_touching_the_model(pictures, tmp_path) -> None:
    from mmhub.adapters import inject_adapter
    from mmhub.spec import LoraSpec

    # logits of a few units (initializer_range 0.1): at TINY_LLAMA's 0.5 they reach ~20, and folding LoRA into the
    # weights (peft's merge, which the export uses) alone moves them by ~1e-4 through float32 rounding
    model = build(spec(llama={"initializer_range": 0.1}))
    inject_adapter(model, "backbone", LoraSpec(r=4, alpha=8))
    inject_adapter(model, "projectors.image", LoraSpec(r=2))
    batch = model.batch(CONVS, [{"image": [pictures[0]]}, {"image": [pictures[1]]}])
    torch.manual_seed(0)
    with torch.no_grad():  # peft starts lora_B at zero; make the adapters matter
        plain = model(**batch).logits
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
        assert float((model(**batch).logits - plain).abs().max()) > 0.5  # the adapters change the outputs
    out = export_hf_llava(model, tmp_path / "llava")
    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        assert not [k for k in fh.keys() if "lora" in k or "base_layer" in k]
    hf = load_hf(out)
    diff = logit_diff(model, hf, pictures)
    MEASURED["lora-merged"] = diff
    assert diff < TOL
    from mmhub.adapters import merged_copy

    merged = merged_copy(model)
    MEASURED["lora-merged-vs-mmhub-merged"] = logit_diff(merged, hf, pictures)
    assert MEASURED["lora-merged-vs-mmhub-merged"] == 0.0  # the export itself adds no error
    # the model passed in still carries its adapters
    assert set(model.spec.adapters) == {"backbone", "projectors.image"}
    assert any("lora_A" in n for n, _ in model.backbone.named_parameters())


def test_import_round_trip_and_saved_mmhub_folder(pictures, tmp_path) -> None:
    model = build(VARIANTS["image-id-past-vocab"])
    out = export_hf_llava(model, tmp_path / "llava")
    hf = load_hf(out)
    back = import_hf_llava(out)
    assert back.plan.template.name == "vicuna_v1" and back.spec.projectors["image"].type == "mlp"
    diff = logit_diff(back, hf, pictures)
    MEASURED["import-round-trip"] = diff
    assert diff < TOL
    back.save_pretrained(tmp_path / "mm")
    again = MMModel.from_pretrained(tmp_path / "mm", allow_paths=[tmp_path])  # it names the LLaVA folder beside it
    batch = back.batch(CONVS, [{"image": [pictures[0]]}, {"image": [pictures[1]]}])
    with torch.no_grad():
        assert torch.equal(back(**batch).logits, again(**batch).logits)
    assert back.generate([PROMPT], [{"image": [pictures[0]]}], max_new_tokens=12) == \
        model.generate([PROMPT], [{"image": [pictures[0]]}], max_new_tokens=12)


def test_import_recognises_linear_projector_and_tokenizer_template(pictures, tmp_path) -> None:
    model = build(VARIANTS["linear-tied-chatml"])
    back = import_hf_llava(export_hf_llava(model, tmp_path / "llava"))
    assert back.spec.projectors["image"].type == "linear" and back.plan.template.name == "chatml"
    assert logit_diff(back, load_hf(tmp_path / "llava"), pictures) < TOL


OWN_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_tokenizer_own_chat_template_is_kept_and_recognised(pictures, tmp_path) -> None:
    from mmhub.backbones.byte_tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    tok.chat_template = OWN_TEMPLATE
    tok.save_pretrained(str(tmp_path / "tok"))
    model = build(spec(template="auto") | {"backbone": {"type": "hf_causal_lm", "config": TINY_LLAMA,
                                                         "tokenizer": str(tmp_path / "tok")}})
    assert model.plan.template.name == "tokenizer"
    out = export_hf_llava(model, tmp_path / "llava")
    processor = AutoProcessor.from_pretrained(str(out))
    ours = model.batch([PROMPT], [{"image": [pictures[0]]}], add_generation_prompt=True)
    text = processor.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                         tokenize=False)
    assert processor.chat_template == OWN_TEMPLATE and text == model.tokenizer.decode(ours["input_ids"][0])
    back = import_hf_llava(out)
    assert back.plan.template.name == "tokenizer"
    assert logit_diff(back, load_hf(out), pictures) < TOL


LIST_ONLY_TEMPLATE = ("{% for message in messages %}{{ message['role'].upper() + ': ' }}"
                      "{% for c in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}"
                      "{% endfor %}{% for c in message['content'] | selectattr('type', 'equalto', 'text') %}"
                      "{{ c['text'] + ' ' }}{% endfor %}{% endfor %}"
                      "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def transformers_llava_folder(folder: Path, legacy_keys: bool = False) -> Path:
    """A LLaVA folder written by transformers itself (llava-hf style: list-only chat template)."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaProcessor

    from mmhub.backbones.byte_tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    tok.add_special_tokens({"extra_special_tokens": ["<image>"]}, replace_extra_special_tokens=False)
    image_id = tok.convert_tokens_to_ids("<image>")
    config = LlavaConfig(vision_config=CLIP, text_config={**TINY_LLAMA, "vocab_size": 320}, image_token_index=image_id,
                         image_seq_length=16, projector_hidden_act="gelu", vision_feature_layer=-1)
    torch.manual_seed(0)
    hf = LlavaForConditionalGeneration(config)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3)
    hf.save_pretrained(str(folder))
    crop = {"height": 32, "width": 32}
    LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=crop), tokenizer=tok,
                   patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
                   chat_template=LIST_ONLY_TEMPLATE).save_pretrained(str(folder))
    if legacy_keys:  # transformers 4.x llava-hf layout
        state = load_file(str(folder / "model.safetensors"))
        rename = {"model.vision_tower.": "vision_tower.vision_model.", "model.language_model.": "language_model.model.",
                  "model.multi_modal_projector.": "multi_modal_projector.", "lm_head.": "language_model.lm_head."}
        for k in list(state):
            new = next((n + k[len(o):] for o, n in rename.items() if k.startswith(o)), k)
            state[new] = state.pop(k)
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("legacy_keys", [False, True])
def test_import_a_transformers_written_llava_folder(legacy_keys: bool, pictures, tmp_path) -> None:
    folder = transformers_llava_folder(tmp_path / "llava-hf", legacy_keys)
    with pytest.raises(MMHubError, match="template="):  # llava-hf templates only take list content
        import_hf_llava(folder)
    model = import_hf_llava(folder, template="vicuna_v1")
    enc = model.spec.encoders["image"]
    assert enc.type == "hf_vision" and model.encoders["image"].config.select_layer == -1
    reference = folder if not legacy_keys else transformers_llava_folder(tmp_path / "reference")
    diff = logit_diff(model, load_hf(reference), pictures)
    MEASURED["import-transformers-folder" + ("-legacy" if legacy_keys else "")] = diff
    assert diff < TOL


def spec_variant(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(base)
    *head, last = path.split(".")
    node = out
    for key in head:
        node = node[key]
    node[last] = value
    return out


UNSUPPORTED = {
    "open_clip-layer-scale": (spec(encoder={**OPEN_CLIP,
                                            "vision_cfg": {**OPEN_CLIP["vision_cfg"], "ls_init_value": 0.1}}),
                              ["encoders.image (open_clip): layer scale"]),
    "timm": ("tiny_spec", ["encoders.image (timm)", "timm towers are not converted"]),
    "blip-2:tiny": ("blip-2:tiny", ["projectors.image (qformer)", "backbone (hf_seq2seq_lm)"]),
    "cogvlm:tiny": ("cogvlm:tiny", ["injectors.", "(visual_expert)"]),
    "video-chatgpt:tiny": ("video-chatgpt:tiny", ["encoders.video (video)", "no image encoder"]),
    "mlp-depth-3": (spec_variant(spec(), "projectors.image", {"type": "mlp", "depth": 3}),
                    ["projectors.image (mlp): depth 3 > 2"]),
    "final-norm": (spec_variant(spec(), "encoders.image.final_norm", True), ["encoders.image (hf_vision): final_norm"]),
    "dinov2": (spec_variant(spec(), "encoders.image.config", {"model_type": "dinov2", "hidden_size": 32,
                                                              "intermediate_size": 64, "num_hidden_layers": 2,
                                                              "num_attention_heads": 2, "image_size": 32,
                                                              "patch_size": 8}),
               ["encoders.image (hf_vision, model_type dinov2)"]),
    "mixed-dtypes": (spec_variant(spec(), "backbone.dtype", "bfloat16"),
                     ["backbone (hf_causal_lm) bfloat16", "pass dtype="]),
}


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_unsupported_models_name_the_blocking_component(name: str, tiny_spec, tmp_path) -> None:
    source, needles = UNSUPPORTED[name]
    if source == "tiny_spec":
        tiny_spec["encoders"]["image"] = {"type": "timm", "model": "resnet10t", "image_size": 32}
    model = build(tiny_spec if source == "tiny_spec" else source)
    with pytest.raises(MMHubError) as err:
        export_hf_llava(model, tmp_path / "llava")
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))
    assert not (tmp_path / "llava").exists() and not list(tmp_path.iterdir())


def test_cli_export_and_import(pictures, tmp_path, capsys) -> None:
    from mmhub.adapters import inject_adapter
    from mmhub.spec import LoraSpec

    model = build(spec(llama={"initializer_range": 0.1}))
    inject_adapter(model, "backbone", LoraSpec(r=4))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model.save_pretrained(tmp_path / "mm")
    saved = MMModel.from_pretrained(tmp_path / "mm")
    assert main(["export", str(tmp_path / "mm"), "--format", "hf-llava", str(tmp_path / "llava")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert logit_diff(saved, load_hf(tmp_path / "llava"), pictures) < TOL
    assert AutoTokenizer.from_pretrained(str(tmp_path / "llava")).chat_template  # the tokenizer carries it too
    assert main(["import", str(tmp_path / "llava"), str(tmp_path / "back"), "--format", "hf-llava"]) == 0
    back = MMModel.from_pretrained(tmp_path / "back", allow_paths=[tmp_path])  # it names the LLaVA folder beside it
    assert logit_diff(back, load_hf(tmp_path / "llava"), pictures) < TOL
    # errors: exit 2, one message naming the problem, no traceback
    assert main(["export", "blip-2:tiny", str(tmp_path / "no"), "--format", "hf-llava"]) == 2
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("error:"))
    assert line.startswith("error: cannot export 'blip-2-tiny'") and "projectors.image (qformer)" in line
    assert "Traceback" not in err
    assert main(["import", str(tmp_path / "mm"), str(tmp_path / "no"), "--format", "hf-llava"]) == 2
    assert "not a transformers model folder" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()


def test_report_measured_differences(pictures, tmp_path) -> None:
    """Prints the max abs differences measured in this process (run with -s to see them). It measures the default
    variant itself first: a process that ran none of the tests above (an xdist worker) still checks one export."""
    model = build(VARIANTS["mlp-clip-vicuna"])
    MEASURED["mlp-clip-vicuna (report)"] = logit_diff(model, load_hf(export_hf_llava(model, tmp_path / "llava")),
                                                      pictures)
    for name, diff in MEASURED.items():
        print(f"max abs {'token' if 'tower' in name else 'logit'} diff, {name}: {diff:.3g}")
    over = {name: diff for name, diff in MEASURED.items() if not diff < TOL}  # NaN counts as over
    assert not over, f"max abs differences at or over {TOL}: {over}"
