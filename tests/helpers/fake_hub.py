"""A fake local Hugging Face cache holding stand-ins for every repo the ``NAME:full`` presets name.

Each stand-in is written offline in the ``HF_HUB_CACHE`` layout (``models--ORG--NAME/snapshots/<rev>/`` plus
``refs/main``) from the published repo's structure, in one of two flavours:

* ``shrink=False`` (validation): the published ``config.json`` numbers (model_type, widths, layer counts, vocab
  size, context length, image/patch sizes, diffusers part configs) and processor configs, a tokenizer with the
  published special tokens over a 256-byte vocabulary, and no weights. ``mmhub validate`` reads only configs and
  tokenizers, so the full presets' widths, token counts, templates and context budgets are checked against the
  published numbers. Weight files that a spec names by path inside a repo (open_clip / timm checkpoints, whose
  architecture the spec names itself) are empty state dicts: validation checks only that they exist.
* ``shrink=True`` (builds): the same model_type and architecture options with layers, widths and vocabulary
  shrunk (2 layers, width 32-64, images 56 px) and random weights saved with ``save_pretrained``, so presets
  made of transformers towers and LLMs build in seconds. Only the repos listed in `SHRINKABLE` exist here.

Remote-code repos (Qwen-7B, ChatGLM-6B) carry ``auto_map`` and a ``configuration_*.py`` with the published config
class's fields (their modeling code is not reproduced: they validate, they do not build); their tokenizers are
fast byte tokenizers with the published special tokens instead of the repos' own tokenizer code.
``file:~/models/...`` sources live under ``<root>/home`` (point ``HOME`` there).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, PreTrainedTokenizerFast

from mmhub.backbones.byte_tokenizer import _byte_vocab

Writer = Callable[[Path, bool], None]

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def revision(repo: str) -> str:
    """A stable 40-hex stand-in commit id for `repo`."""
    return hashlib.sha1(repo.encode()).hexdigest()


def snapshot(cache: Path, repo: str) -> Path:
    """Create ``models--ORG--NAME`` with ``refs/main`` pointing at its snapshot folder, and return that folder."""
    root = cache / f"models--{repo.replace('/', '--')}"
    rev = revision(repo)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(rev)
    folder = root / "snapshots" / rev
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


# ---- tokenizers -------------------------------------------------------------------------------------------------
def fake_tokenizer(folder: Path, first: list[str], roles: dict[str, str], extra: list[str] = (),
                   max_length: int = 2048, chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer whose ids start with `first` (the published low-id specials, in the published order,
    e.g. Llama's ``<unk> <s> </s>`` at 0-2), then the 256 bytes, then `extra` special tokens; `roles` maps
    bos/eos/pad/unk to token strings. Saved into `folder`."""
    vocab = {t: i for i, t in enumerate(first)}
    vocab.update({c: len(first) + b for c, b in _byte_vocab().items()})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length,
                                   **{f"{k}_token": v for k, v in roles.items()})
    specials = [t for t in [*first, *extra] if t not in roles.values()]
    if specials:
        fast.add_special_tokens({"additional_special_tokens": specials})
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(folder)
    return fast


LLAMA_TOK = {"first": ["<unk>", "<s>", "</s>"], "roles": {"bos": "<s>", "eos": "</s>", "unk": "<unk>"}}
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
T5_TOK = {"first": ["<pad>", "</s>", "<unk>"], "roles": {"pad": "<pad>", "eos": "</s>", "unk": "<unk>"},
          "extra": [f"<extra_id_{i}>" for i in range(100)], "max_length": 512}
OPT_TOK = {"first": ["<s>", "<pad>", "</s>", "<unk>"],
           "roles": {"bos": "</s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"}}
QWEN_TOK = {"first": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            "roles": {"eos": "<|endoftext|>", "pad": "<|endoftext|>"}, "max_length": 8192}
CHATGLM_TOK = {"first": ["<pad>", "<unk>", "<s>", "</s>"],
               "roles": {"bos": "<sop>", "eos": "<eop>", "pad": "<pad>", "unk": "<unk>", "mask": "[MASK]"},
               "extra": ["[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>"]}


# ---- transformers models ----------------------------------------------------------------------------------------
def hf_model(config: dict[str, Any], tokenizer: dict[str, Any] | None = None,
             preprocessor: dict[str, Any] | None = None, shrunk: dict[str, Any] | None = None,
             auto: str | None = None, files: dict[str, str] | None = None) -> Writer:
    """A transformers repo: `config` (published numbers), optional tokenizer / preprocessor config; `shrunk`: the
    overrides of the build flavour (None: the repo has no build flavour); `auto`: AutoModel class name for the
    shrunk weights; `files`: extra text files (remote-code configuration modules)."""

    def write(folder: Path, shrink: bool) -> None:
        cfg = dict(config)
        tok = None
        if tokenizer is not None:
            tok = fake_tokenizer(folder, **tokenizer)
        for name, text in (files or {}).items():
            (folder / name).write_text(text)
        if shrink:
            assert shrunk is not None, "this repo has no build flavour"
            cfg = merge(cfg, shrunk)
            if tok is not None and "vocab_size" in shrunk:
                cfg["vocab_size"] = max(len(tok), int(shrunk["vocab_size"]))
            _save_shrunk(folder, cfg, auto)
        else:
            write_json(folder / "config.json", cfg)
        if preprocessor is not None:
            pre = dict(preprocessor)
            if shrink and "image_size" in (shrunk or {}).get("vision_config", {}):
                size = shrunk["vision_config"]["image_size"]
                pre.update(_image_sizes(pre, size))
            write_json(folder / "preprocessor_config.json", pre)
    return write


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`base` with `over` on top, nested dicts merged."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _image_sizes(pre: dict[str, Any], size: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("size", "crop_size"):
        if isinstance(pre.get(key), dict):
            out[key] = {k: size for k in pre[key]}
    return out


def _save_shrunk(folder: Path, cfg: dict[str, Any], auto: str | None) -> None:
    import transformers

    settings = dict(cfg)
    hf_cfg = AutoConfig.for_model(settings.pop("model_type"), **settings)
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(hf_cfg) if auto is None else getattr(transformers, auto)(hf_cfg)
    model.save_pretrained(folder)


def clip(image: int, patch: int = 14) -> Writer:
    """openai/clip-vit-large-patch14(-336): the full CLIP config (ViT-L/14 tower, 12-layer text tower)."""
    return hf_model(
        {"model_type": "clip", "projection_dim": 768,
         "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                         "num_attention_heads": 12, "max_position_embeddings": 77, "vocab_size": 49408,
                         "projection_dim": 768, "hidden_act": "quick_gelu"},
         "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                           "num_attention_heads": 16, "image_size": image, "patch_size": patch,
                           "projection_dim": 768, "hidden_act": "quick_gelu"}},
        preprocessor={"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": image},
                      "do_center_crop": True, "crop_size": {"height": image, "width": image}, "resample": 3,
                      "do_normalize": True, "image_mean": CLIP_MEAN, "image_std": CLIP_STD},
        shrunk={"projection_dim": 32,
                "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                "num_attention_heads": 2, "vocab_size": 300, "projection_dim": 32},
                "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                  "num_attention_heads": 2, "image_size": 56, "projection_dim": 32}},
        auto="CLIPModel")


def llama(hidden: int, inter: int, layers: int, heads: int, context: int, rms: float, chat: bool = False,
          pad: int | None = 0) -> Writer:
    """A LLaMA / Llama-2 / Vicuna repo (32000-token SentencePiece vocabulary; Llama-2-chat ships its template)."""
    cfg = {"model_type": "llama", "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
           "num_attention_heads": heads, "num_key_value_heads": heads, "max_position_embeddings": context,
           "rms_norm_eps": rms, "vocab_size": 32000, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
           "tie_word_embeddings": False}
    if pad is not None:
        cfg["pad_token_id"] = pad
    tok = {**LLAMA_TOK, "max_length": context}
    if chat:
        tok["chat_template"] = LLAMA2_CHAT_TEMPLATE
    return hf_model(cfg, tokenizer=tok, auto="LlamaForCausalLM",
                    shrunk={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 320})


def t5(d_model: int, d_ff: int, d_kv: int, heads: int, layers: int, act: str) -> Writer:
    """A T5-family repo (Flan-T5, UL2): 32128-token vocabulary, 100 sentinel tokens."""
    return hf_model(
        {"model_type": "t5", "d_model": d_model, "d_ff": d_ff, "d_kv": d_kv, "num_heads": heads, "num_layers": layers,
         "num_decoder_layers": layers, "vocab_size": 32128, "feed_forward_proj": act, "tie_word_embeddings": False,
         "n_positions": 512, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
         "relative_attention_num_buckets": 32, "is_encoder_decoder": True},
        tokenizer=T5_TOK, auto="T5ForConditionalGeneration",
        shrunk={"d_model": 64, "d_ff": 128, "d_kv": 16, "num_heads": 4, "num_layers": 2, "num_decoder_layers": 2,
                "vocab_size": 384})


QWEN_CONFIG_PY = '''"""The published Qwen-7B configuration class (configuration_qwen.py): its fields and defaults."""
from transformers import PretrainedConfig


class QWenConfig(PretrainedConfig):
    model_type = "qwen"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size=151936, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                 emb_dropout_prob=0.0, attn_dropout_prob=0.0, layer_norm_epsilon=1e-6, initializer_range=0.02,
                 max_position_embeddings=8192, scale_attn_weights=True, use_cache=True, bf16=False, fp16=False,
                 fp32=False, kv_channels=128, rotary_pct=1.0, rotary_emb_base=10000, use_dynamic_ntk=True,
                 use_logn_attn=True, use_flash_attn="auto", intermediate_size=22016, no_bias=True,
                 tie_word_embeddings=False, use_cache_quantization=False, use_cache_kernel=False,
                 softmax_in_fp32=False, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.emb_dropout_prob = emb_dropout_prob
        self.attn_dropout_prob = attn_dropout_prob
        self.layer_norm_epsilon = layer_norm_epsilon
        self.initializer_range = initializer_range
        self.scale_attn_weights = scale_attn_weights
        self.use_cache = use_cache
        self.max_position_embeddings = max_position_embeddings
        self.bf16, self.fp16, self.fp32 = bf16, fp16, fp32
        self.kv_channels = kv_channels
        self.rotary_pct = rotary_pct
        self.rotary_emb_base = rotary_emb_base
        self.use_dynamic_ntk = use_dynamic_ntk
        self.use_logn_attn = use_logn_attn
        self.use_flash_attn = use_flash_attn
        self.no_bias = no_bias
        self.use_cache_quantization = use_cache_quantization
        self.use_cache_kernel = use_cache_kernel
        self.softmax_in_fp32 = softmax_in_fp32
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
'''

CHATGLM_CONFIG_PY = '''"""The published ChatGLM-6B config class (configuration_chatglm.py): its fields and defaults."""
from transformers import PretrainedConfig


class ChatGLMConfig(PretrainedConfig):
    model_type = "chatglm"

    def __init__(self, vocab_size=130528, hidden_size=4096, num_layers=28, num_attention_heads=32,
                 layernorm_epsilon=1e-5, use_cache=True, bos_token_id=130004, eos_token_id=130005,
                 mask_token_id=130000, gmask_token_id=130001, pad_token_id=3, max_sequence_length=2048,
                 inner_hidden_size=16384, position_encoding_2d=True, quantization_bit=0, pre_seq_len=None,
                 prefix_projection=False, **kwargs):
        self.num_layers = num_layers
        self.vocab_size = vocab_size
        self.num_attention_heads = num_attention_heads
        self.hidden_size = hidden_size
        self.max_sequence_length = max_sequence_length
        self.layernorm_epsilon = layernorm_epsilon
        self.inner_hidden_size = inner_hidden_size
        self.use_cache = use_cache
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.mask_token_id = mask_token_id
        self.gmask_token_id = gmask_token_id
        self.position_encoding_2d = position_encoding_2d
        self.quantization_bit = quantization_bit
        self.pre_seq_len = pre_seq_len
        self.prefix_projection = prefix_projection
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)
'''


def state_file(name: str) -> Writer:
    """A checkpoint file a spec names inside a repo (open_clip / timm): an empty state dict (validation only
    checks that it exists; the spec's `arch` / `model` fixes the architecture)."""

    def write(folder: Path, shrink: bool) -> None:
        path = folder / name if name else folder  # "": `folder` is the file itself
        if name.endswith(".safetensors"):
            from safetensors.torch import save_file

            save_file({}, str(path))
        else:
            torch.save({}, path)
    return write


# ---- diffusers pipelines ----------------------------------------------------------------------------------------
def diffusers_pipeline(pipeline: str, parts: dict[str, dict[str, Any]], tokenizer_max: int,
                       scheduler: dict[str, Any]) -> Writer:
    """A diffusers repo: model_index.json and each part's published config (no weights)."""

    def write(folder: Path, shrink: bool) -> None:
        index: dict[str, Any] = {"_class_name": pipeline, "_diffusers_version": "0.8.0"}
        for part, cfg in parts.items():
            write_json(folder / part / "config.json", cfg)
            index[part] = ["diffusers" if cfg.get("_class_name", "").startswith(("UNet", "Autoencoder"))
                           else "transformers", cfg.get("_class_name") or cfg["architectures"][0]]
        write_json(folder / "tokenizer" / "tokenizer_config.json", {"model_max_length": tokenizer_max})
        write_json(folder / "scheduler" / "scheduler_config.json", scheduler)
        index["scheduler"] = ["diffusers", scheduler["_class_name"]]
        index["tokenizer"] = ["transformers", "CLIPTokenizer"]
        write_json(folder / "model_index.json", index)
    return write


SD_VAE = {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
          "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
          "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}
SD_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
SD_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]


def clip_text(hidden: int, layers: int, heads: int, inter: int, act: str) -> dict[str, Any]:
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_size": hidden,
            "num_hidden_layers": layers, "num_attention_heads": heads, "intermediate_size": inter,
            "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": act}


def sd_unet(cross: int, sample: int, head_dim: Any, linear: bool) -> dict[str, Any]:
    return {"_class_name": "UNet2DConditionModel", "in_channels": 4, "out_channels": 4, "sample_size": sample,
            "cross_attention_dim": cross, "attention_head_dim": head_dim, "use_linear_projection": linear,
            "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
            "down_block_types": SD_DOWN, "up_block_types": SD_UP}


def sd_scheduler(kind: str, prediction: str = "epsilon") -> dict[str, Any]:
    return {"_class_name": kind, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "num_train_timesteps": 1000, "prediction_type": prediction, "set_alpha_to_one": False,
            "steps_offset": 1, "clip_sample": False, "skip_prk_steps": True}


OPENCLIP_H_TEXT = clip_text(1024, 23, 16, 4096, "gelu")

REPOS: dict[str, Writer] = {
    # vision towers
    "openai/clip-vit-large-patch14": clip(224),
    "openai/clip-vit-large-patch14-336": clip(336),
    "google/siglip-so400m-patch14-384": hf_model(
        {"model_type": "siglip",
         "text_config": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                         "num_attention_heads": 16, "max_position_embeddings": 64, "vocab_size": 32000},
         "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                           "num_attention_heads": 16, "image_size": 384, "patch_size": 14}},
        preprocessor={"image_processor_type": "SiglipImageProcessor", "do_resize": True,
                      "size": {"height": 384, "width": 384}, "resample": 3, "do_rescale": True,
                      "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
        shrunk={"text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                "num_attention_heads": 2, "vocab_size": 300},
                "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                  "num_attention_heads": 2, "image_size": 56}},
        auto="SiglipModel"),
    "timm/eva_giant_patch14_clip_224.laion400m_s11b_b41k": state_file("open_clip_pytorch_model.bin"),
    "timm/eva02_enormous_patch14_clip_224.laion2b_s4b_b115k": state_file("open_clip_pytorch_model.bin"),
    "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k": state_file("open_clip_pytorch_model.bin"),
    "timm/dm_nfnet_f6.dm_in1k": state_file("model.safetensors"),
    # audio towers
    "openai/whisper-large-v2": hf_model(
        {"model_type": "whisper", "d_model": 1280, "encoder_layers": 32, "decoder_layers": 32,
         "encoder_attention_heads": 20, "decoder_attention_heads": 20, "encoder_ffn_dim": 5120,
         "decoder_ffn_dim": 5120, "num_mel_bins": 80, "max_source_positions": 1500, "max_target_positions": 448,
         "vocab_size": 51865},
        preprocessor={"feature_extractor_type": "WhisperFeatureExtractor", "feature_size": 80, "sampling_rate": 16000,
                      "hop_length": 160, "chunk_length": 30, "n_fft": 400, "n_samples": 480000,
                      "nb_max_frames": 3000, "padding_value": 0.0}),
    "microsoft/wavlm-base-plus": hf_model(
        {"model_type": "wavlm", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
         "intermediate_size": 3072, "conv_dim": [512] * 7, "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
         "conv_stride": [5, 2, 2, 2, 2, 2, 2], "feat_extract_norm": "group", "do_stable_layer_norm": False,
         "num_buckets": 320, "max_bucket_distance": 800, "vocab_size": 32, "add_adapter": False},
        preprocessor={"feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1,
                      "sampling_rate": 16000, "do_normalize": False, "padding_value": 0.0,
                      "return_attention_mask": True}),
    # language models
    "huggyllama/llama-7b": llama(4096, 11008, 32, 32, 2048, 1e-6),
    "lmsys/vicuna-7b-v1.3": llama(4096, 11008, 32, 32, 2048, 1e-6),
    "lmsys/vicuna-7b-v1.5": llama(4096, 11008, 32, 32, 4096, 1e-5),
    "lmsys/vicuna-13b-v1.5": llama(5120, 13824, 40, 40, 4096, 1e-5),
    "Vision-CAIR/vicuna": llama(5120, 13824, 40, 40, 2048, 1e-6),  # Vicuna v0 13B, merged
    "Vision-CAIR/vicuna-7b": llama(4096, 11008, 32, 32, 2048, 1e-6),  # Vicuna v0 7B, merged
    "meta-llama/Llama-2-7b-hf": llama(4096, 11008, 32, 32, 4096, 1e-5, pad=None),
    "meta-llama/Llama-2-7b-chat-hf": llama(4096, 11008, 32, 32, 4096, 1e-5, chat=True, pad=None),
    "facebook/opt-2.7b": hf_model(
        {"model_type": "opt", "hidden_size": 2560, "ffn_dim": 10240, "num_hidden_layers": 32,
         "num_attention_heads": 32, "vocab_size": 50272, "max_position_embeddings": 2048,
         "word_embed_proj_dim": 2560, "do_layer_norm_before": True, "bos_token_id": 2, "eos_token_id": 2,
         "pad_token_id": 1},
        tokenizer=OPT_TOK),
    "google/flan-t5-xl": t5(2048, 5120, 64, 32, 24, "gated-gelu"),
    "google/ul2": t5(4096, 16384, 256, 16, 32, "gated-silu"),
    "Qwen/Qwen-7B": hf_model(
        {"model_type": "qwen", "architectures": ["QWenLMHeadModel"],
         "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig"},
         "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
         "num_attention_heads": 32, "max_position_embeddings": 8192, "seq_length": 8192, "kv_channels": 128,
         "use_dynamic_ntk": True, "use_logn_attn": True, "no_bias": True, "tie_word_embeddings": False},
        tokenizer=QWEN_TOK, files={"configuration_qwen.py": QWEN_CONFIG_PY}),
    "THUDM/chatglm-6b": hf_model(
        {"model_type": "chatglm", "architectures": ["ChatGLMModel"],
         "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig"},
         "vocab_size": 130528, "hidden_size": 4096, "num_layers": 28, "num_attention_heads": 32,
         "inner_hidden_size": 16384, "max_sequence_length": 2048, "bos_token_id": 130004,
         "eos_token_id": 130005, "mask_token_id": 130000, "gmask_token_id": 130001, "pad_token_id": 3,
         "position_encoding_2d": True},
        tokenizer=CHATGLM_TOK, files={"configuration_chatglm.py": CHATGLM_CONFIG_PY}),
    # generators
    "stable-diffusion-v1-5/stable-diffusion-v1-5": diffusers_pipeline(
        "StableDiffusionPipeline",
        {"unet": sd_unet(768, 64, 8, False), "vae": {**SD_VAE, "sample_size": 512},
         "text_encoder": clip_text(768, 12, 12, 3072, "quick_gelu")}, 77, sd_scheduler("PNDMScheduler")),
    "stabilityai/stable-diffusion-2-1": diffusers_pipeline(
        "StableDiffusionPipeline",
        {"unet": sd_unet(1024, 96, [5, 10, 20, 20], True), "vae": {**SD_VAE, "sample_size": 768},
         "text_encoder": OPENCLIP_H_TEXT}, 77, sd_scheduler("DDIMScheduler", "v_prediction")),
    "stabilityai/stable-diffusion-2-1-base": diffusers_pipeline(
        "StableDiffusionPipeline",
        {"unet": sd_unet(1024, 64, [5, 10, 20, 20], True), "vae": {**SD_VAE, "sample_size": 512},
         "text_encoder": OPENCLIP_H_TEXT}, 77, sd_scheduler("PNDMScheduler")),
    "cerspense/zeroscope_v2_576w": diffusers_pipeline(
        "TextToVideoSDPipeline",
        {"unet": {"_class_name": "UNet3DConditionModel", "in_channels": 4, "out_channels": 4, "sample_size": 32,
                  "cross_attention_dim": 1024, "attention_head_dim": 64, "block_out_channels": [320, 640, 1280, 1280],
                  "layers_per_block": 2,
                  "down_block_types": ["CrossAttnDownBlock3D"] * 3 + ["DownBlock3D"],
                  "up_block_types": ["UpBlock3D"] + ["CrossAttnUpBlock3D"] * 3},
         "vae": {**SD_VAE, "sample_size": 512}, "text_encoder": OPENCLIP_H_TEXT}, 77, sd_scheduler("DDIMScheduler")),
    "cvssp/audioldm-l-full": diffusers_pipeline(
        "AudioLDMPipeline",
        {"unet": {"_class_name": "UNet2DConditionModel", "in_channels": 8, "out_channels": 8, "sample_size": 128,
                  "class_embed_type": "simple_projection", "projection_class_embeddings_input_dim": 512,
                  "class_embeddings_concat": True, "cross_attention_dim": None,
                  "block_out_channels": [256, 512, 1024, 1024], "layers_per_block": 2,
                  "down_block_types": SD_DOWN, "up_block_types": SD_UP, "attention_head_dim": 8},
         "vae": {**SD_VAE, "latent_channels": 8, "in_channels": 1, "out_channels": 1, "sample_size": 512},
         "text_encoder": {"architectures": ["ClapTextModelWithProjection"], "model_type": "clap_text_model",
                          "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                          "intermediate_size": 3072, "projection_dim": 512, "max_position_embeddings": 514,
                          "pad_token_id": 1, "vocab_size": 50265},
         "vocoder": {"architectures": ["SpeechT5HifiGan"], "model_type": "hifigan", "model_in_dim": 64,
                     "sampling_rate": 16000, "upsample_initial_channel": 1024,
                     "upsample_rates": [5, 4, 2, 2, 2], "upsample_kernel_sizes": [16, 16, 8, 4, 4]}},
        512, sd_scheduler("DDIMScheduler")),
}

# ``file:~/models/...`` sources (under <root>/home): folders a user assembles (Vicuna v1.1 = LLaMA + the published
# delta, merged by FastChat) and checkpoints no published repo holds in this layout (empty here)
HOME: dict[str, Writer] = {
    "models/vicuna-7b-v1.1": llama(4096, 11008, 32, 32, 2048, 1e-6),
    "models/imagebind_huge_mmhub.safetensors": state_file(""),
    "models/ulip2_pointbert_mmhub.safetensors": state_file(""),
}

SHRINKABLE = ("openai/clip-vit-large-patch14", "openai/clip-vit-large-patch14-336", "google/siglip-so400m-patch14-384",
              "huggyllama/llama-7b", "lmsys/vicuna-7b-v1.3", "lmsys/vicuna-7b-v1.5", "lmsys/vicuna-13b-v1.5",
              "meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-chat-hf", "google/flan-t5-xl", "google/ul2",
              "models/vicuna-7b-v1.1")


def build_fake_hub(root: Path, shrink: bool = False, repos: tuple[str, ...] | None = None) -> Path:
    """Write the stand-ins of `repos` (default: every repo and ``~/`` path the full presets name; with `shrink`,
    the `SHRINKABLE` ones) under ``root/hub`` and the ``file:~`` sources under ``root/home``; returns
    ``root/hub`` (set ``HF_HUB_CACHE`` to it and ``HOME`` to ``root/home``)."""
    cache = root / "hub"
    for repo in repos or (SHRINKABLE if shrink else (*REPOS, *HOME)):
        if repo in HOME:
            target = root / "home" / repo
            if target.suffix == ".safetensors":  # a single checkpoint file
                target.parent.mkdir(parents=True, exist_ok=True)
                HOME[repo](target, shrink)
            else:
                target.mkdir(parents=True, exist_ok=True)
                HOME[repo](target, shrink)
        else:
            REPOS[repo](snapshot(cache, repo), shrink)
    return cache
