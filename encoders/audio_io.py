"""Reading audio items for the audio encoders: arrays, ``(array, rate)`` pairs, WAV files and WAV bytes.

`load_audio(item, rate)` returns a 1-D float32 numpy array at ``rate`` Hz from:

* a 1-D numpy array or torch tensor, taken to be at ``rate`` already (float data as
  is, in [-1, 1]; int16/int32/uint8 PCM scaled to [-1, 1]);
* a ``(array, sample_rate)`` tuple: resampled to ``rate`` (polyphase with
  ``scipy.signal.resample_poly`` when scipy is installed, else band-limited FFT
  resampling in numpy);
* a path (``str`` / ``Path``) to a ``.wav`` file, or the raw bytes of one: PCM 8/16/24/32-bit,
  IEEE float 32/64-bit, or WAVE_FORMAT_EXTENSIBLE of those; several channels are
  averaged to mono; the file's own rate is resampled to ``rate``.

Anything else, and empty, non-finite or multi-dimensional audio, is an `InputError`
that names the problem and the fix. `fit_to_window` then cuts long audio to an
encoder's window (keeping the start) and pads short audio with zeros (silence) at the end.
"""

from __future__ import annotations

import io
import struct
from math import gcd
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmhub.errors import InputError

WAVE_PCM, WAVE_FLOAT, WAVE_EXTENSIBLE = 1, 3, 0xFFFE
HINT = "convert it to a WAV file, e.g. `ffmpeg -i in.mp3 -ac 1 -ar 16000 out.wav`"


def load_audio(item: Any, rate: int) -> np.ndarray:
    """One raw audio item -> a 1-D float32 numpy array at `rate` Hz (see the module docstring for the forms)."""
    if isinstance(item, tuple):
        if len(item) != 2 or not isinstance(item[1], (int, np.integer)) or isinstance(item[1], bool):
            raise InputError(f"an audio tuple must be (array, sample_rate) with an integer rate in Hz; got a "
                             f"{len(item)}-tuple of ({', '.join(type(x).__name__ for x in item)})")
        wave, src = _array(item[0], "the audio array of the (array, sample_rate) tuple"), int(item[1])
        if src <= 0:
            raise InputError(f"sample rate {src} Hz is not positive; "
                             "give the rate the audio was recorded at, e.g. 16000")
        return resample(wave, src, rate)
    if isinstance(item, (np.ndarray, torch.Tensor)):
        return _array(item, "the audio array")
    if isinstance(item, (bytes, bytearray, memoryview)):
        wave, src = read_wav(bytes(item), "the audio bytes")
        return resample(wave, src, rate)
    if isinstance(item, (str, Path)):
        path = Path(item).expanduser()
        if not path.is_file():
            raise InputError(f"audio file {str(path)!r} does not exist; check the path")
        wave, src = read_wav(path.read_bytes(), f"audio file {str(path)!r}")
        return resample(wave, src, rate)
    raise InputError(f"cannot read audio from a {type(item).__name__}; pass a 1-D float array at {rate} Hz, "
                     f"an (array, sample_rate) tuple, a .wav file path or the bytes of a .wav file")


def _array(data: Any, what: str) -> np.ndarray:
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu()
        data = data.float().numpy() if data.is_floating_point() else data.numpy()
    arr = np.asarray(data)
    if arr.dtype.kind == "f":
        arr = arr.astype(np.float32)
    elif arr.dtype == np.int16:
        arr = arr.astype(np.float32) / 32768.0
    elif arr.dtype == np.int32:
        arr = arr.astype(np.float32) / 2147483648.0
    elif arr.dtype == np.uint8:
        arr = (arr.astype(np.float32) - 128.0) / 128.0
    else:
        raise InputError(f"{what} has dtype {arr.dtype}; "
                         "audio samples must be float (in [-1, 1]) or int16/int32/uint8 PCM")
    return _check(arr, what)


def _check(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.ndim != 1:
        fix = ("average the channels to mono first (e.g. `x.mean(axis=1)` for (samples, channels))"
               if arr.ndim == 2 else "pass one 1-D signal per item")
        raise InputError(f"{what} has shape {tuple(arr.shape)}; one audio item must be 1-D (samples,): {fix}")
    if arr.size == 0:
        raise InputError(f"{what} is empty (zero samples); give at least a few milliseconds of audio")
    if not np.isfinite(arr).all():
        raise InputError(f"{what} contains NaN or infinite samples; clean the signal first (e.g. np.nan_to_num)")
    return np.ascontiguousarray(arr, dtype=np.float32)


def read_wav(data: bytes, what: str = "the WAV data") -> tuple[np.ndarray, int]:
    """Parse RIFF/WAVE bytes -> (mono float32 samples, sample rate)."""
    if len(data) < 12 or data[:4] not in (b"RIFF", b"RIFX") or data[8:12] != b"WAVE":
        raise InputError(f"{what} is not a WAV file (no RIFF/WAVE header); {HINT}")
    if data[:4] == b"RIFX":
        raise InputError(f"{what} is a big-endian RIFX file; {HINT}")
    fmt: tuple[int, int, int, int] | None = None
    payload: bytes | None = None
    pos = 12
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        body = data[pos + 8:pos + 8 + size]
        if cid == b"fmt ":
            if len(body) < 16:
                raise InputError(f"{what} has a damaged 'fmt ' chunk; {HINT}")
            tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", body[:16])
            if tag == WAVE_EXTENSIBLE and len(body) >= 26:
                tag = struct.unpack("<H", body[24:26])[0]  # the sub-format GUID starts with the format tag
            fmt = (tag, channels, rate, bits)
        elif cid == b"data":
            payload = body
            break
        pos += 8 + size + (size & 1)  # chunks are word-aligned
    if fmt is None or payload is None:
        raise InputError(f"{what} has no {'fmt ' if fmt is None else 'data'} chunk, so it holds no readable audio; "
                         f"{HINT}")
    tag, channels, rate, bits = fmt
    if channels < 1 or rate < 1:
        raise InputError(f"{what} declares {channels} channel(s) at {rate} Hz; {HINT}")
    width = bits // 8
    if tag == WAVE_PCM and bits in (8, 16, 24, 32):
        usable = len(payload) - len(payload) % (width * channels)
        raw = np.frombuffer(payload[:usable], dtype=np.uint8)
        if bits == 8:
            samples = (raw.astype(np.float32) - 128.0) / 128.0
        elif bits == 16:
            samples = raw.view("<i2").astype(np.float32) / 32768.0
        elif bits == 24:
            b = raw.reshape(-1, 3).astype(np.int32)
            ints = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
            samples = (np.where(ints >= 1 << 23, ints - (1 << 24), ints)).astype(np.float32) / float(1 << 23)
        else:
            samples = raw.view("<i4").astype(np.float32) / 2147483648.0
    elif tag == WAVE_FLOAT and bits in (32, 64):
        usable = len(payload) - len(payload) % (width * channels)
        samples = np.frombuffer(payload[:usable], dtype="<f4" if bits == 32 else "<f8").astype(np.float32)
    else:
        raise InputError(f"{what} uses WAV format tag {tag} with {bits}-bit samples, which is not supported "
                         f"(PCM 8/16/24/32-bit and float 32/64-bit are); {HINT}")
    samples = samples.reshape(-1, channels).mean(axis=1) if channels > 1 else samples
    return _check(samples, what), rate


def resample(wave: np.ndarray, src: int, dst: int) -> np.ndarray:
    """Resample a 1-D float32 signal from `src` to `dst` Hz (polyphase with scipy if present, else FFT)."""
    if src == dst:
        return wave
    g = gcd(src, dst)
    up, down = dst // g, src // g
    try:
        from scipy.signal import resample_poly
    except ImportError:
        return _fft_resample(wave, src, dst)
    return _check(resample_poly(wave, up, down).astype(np.float32), "the resampled audio")


def _fft_resample(wave: np.ndarray, src: int, dst: int) -> np.ndarray:
    """Band-limited resampling by truncating / zero-padding the spectrum (numpy only)."""
    n_out = max(1, int(round(len(wave) * dst / src)))
    spec = np.fft.rfft(wave.astype(np.float64))
    keep = min(len(spec), n_out // 2 + 1)
    out_spec = np.zeros(n_out // 2 + 1, dtype=np.complex128)
    out_spec[:keep] = spec[:keep]
    out = np.fft.irfft(out_spec, n=n_out) * (n_out / len(wave))
    return _check(out.astype(np.float32), "the resampled audio")


def fit_to_window(wave: np.ndarray, samples: int) -> np.ndarray:
    """Cut `wave` to its first `samples` samples, or pad it with zeros (silence) at the end to that length."""
    if len(wave) >= samples:
        return wave[:samples]
    return np.concatenate([wave, np.zeros(samples - len(wave), dtype=np.float32)])


def wav_bytes(wave: np.ndarray, rate: int) -> bytes:
    """A mono 16-bit PCM WAV file holding `wave` (float in [-1, 1]) at `rate` Hz."""
    import wave as wavelib

    pcm = np.clip(np.round(np.asarray(wave, dtype=np.float64) * 32767.0), -32768, 32767).astype("<i2")
    buf = io.BytesIO()
    with wavelib.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()
