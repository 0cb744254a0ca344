"""ImageBind's audio front end: a waveform clip -> the normalised 128-bin Kaldi log-mel "image" its audio stem reads.

As ImageBind's ``data.py`` (``waveform2melspec`` and the normalisation after it): the clip's mean is removed, then
``torchaudio.compliance.kaldi.fbank`` (HTK-compatible mel scale, Hanning window, 25 ms frames every 10 ms, no
dither, no energy) gives ``(frames, mel_bins)`` log-mel energies; transposed to ``(mel_bins, frames)``, cut or
zero-padded at the end to ``target_length`` frames (204 for ImageBind's 2 s clips at 16 kHz, which give 198), and
normalised with ImageBind's AudioSet statistics, ``(x - (-4.268)) / 9.138``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

AUDIO_MEAN, AUDIO_STD = -4.268, 9.138  # ImageBind's data.py: transforms.Normalize(mean=-4.268, std=9.138)
FRAME_LENGTH_MS, FRAME_SHIFT_MS = 25.0, 10.0


def fbank_frames(samples: int, sample_rate: int) -> int:
    """Frames Kaldi's fbank gives for `samples` samples (snip_edges: whole 25 ms windows every 10 ms)."""
    win = int(sample_rate * FRAME_LENGTH_MS / 1000)
    hop = int(sample_rate * FRAME_SHIFT_MS / 1000)
    return 0 if samples < win else 1 + (samples - win) // hop


def waveform_to_melspec(wave: np.ndarray | torch.Tensor, sample_rate: int, mel_bins: int,
                        target_length: int) -> torch.Tensor:
    """(samples,) mono waveform -> (1, mel_bins, target_length) normalised Kaldi log-mel spectrogram."""
    import torchaudio.compliance.kaldi as kaldi  # torchaudio takes ~1 s to import: only when audio is read

    w = torch.as_tensor(np.asarray(wave, dtype=np.float32)).reshape(1, -1)
    w = w - w.mean()
    fbank = kaldi.fbank(w, htk_compat=True, sample_frequency=sample_rate, use_energy=False, window_type="hanning",
                        num_mel_bins=mel_bins, dither=0.0, frame_length=FRAME_LENGTH_MS,
                        frame_shift=FRAME_SHIFT_MS).T  # (mel_bins, frames)
    gap = target_length - fbank.shape[1]
    fbank = F.pad(fbank, (0, gap)) if gap > 0 else fbank[:, :target_length]
    return ((fbank - AUDIO_MEAN) / AUDIO_STD)[None]
