"""Causal log-mel features at 16 kHz (10 ms hop) for the tokenizer, plus F0/energy targets used in training."""

from __future__ import annotations

import math
from dataclasses import dataclass

import librosa
import numpy as np
import torch
import torch.nn as nn

SAMPLE_RATE = 16000


@dataclass
class FeatureConfig:
    sample_rate: int = SAMPLE_RATE
    n_fft: int = 512
    win_length: int = 400  # 25 ms
    hop_length: int = 160  # 10 ms -> 100 frames/s
    n_mels: int = 80
    fmin: float = 0.0
    fmax: float = 8000.0
    log_floor: float = 1e-5

    @property
    def context(self) -> int:
        """Samples of past audio a frame needs beyond its own hop (frames end at the end of their hop)."""
        return self.win_length - self.hop_length


class LogMel(nn.Module):
    """Causal framing: frame i covers samples [hop*i - (win - hop), hop*(i+1)); audio before t=0 is zeros.

    So `n` samples (a multiple of hop) give exactly n // hop frames, and a chunk of audio can be turned into
    its frames given only the last `context` samples before it: streaming equals offline by construction.
    The output is normalised per mel bin with stored statistics (`mean`, `std`), set once from training data.
    """

    def __init__(self, cfg: FeatureConfig):
        super().__init__()
        self.cfg = cfg
        fb = librosa.filters.mel(sr=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels, fmin=cfg.fmin, fmax=cfg.fmax)
        self.register_buffer("mel_fb", torch.from_numpy(fb).float(), persistent=False)
        self.register_buffer("window", torch.hann_window(cfg.win_length, periodic=True), persistent=False)
        self.register_buffer("mean", torch.zeros(cfg.n_mels))
        self.register_buffer("std", torch.ones(cfg.n_mels))

    def raw(self, wav: torch.Tensor, past: torch.Tensor | None = None) -> torch.Tensor:
        """wav [B, n] (n multiple of hop), past [B, context] (zeros if None) -> log-mel [B, n_mels, n // hop]."""
        cfg = self.cfg
        if wav.shape[-1] % cfg.hop_length:
            raise ValueError(f"LogMel needs a multiple of {cfg.hop_length} samples, got {wav.shape[-1]}")
        if past is None:
            past = wav.new_zeros(wav.shape[0], cfg.context)
        x = torch.cat([past, wav], dim=-1)
        frames = x.unfold(-1, cfg.win_length, cfg.hop_length) * self.window  # [B, T, win]
        spec = torch.fft.rfft(frames, n=cfg.n_fft).abs().pow(2)  # [B, T, n_fft//2+1]
        mel = spec @ self.mel_fb.T  # [B, T, n_mels]
        return torch.log(mel.clamp_min(cfg.log_floor)).transpose(1, 2)

    def forward(self, wav: torch.Tensor, past: torch.Tensor | None = None) -> torch.Tensor:
        return (self.raw(wav, past) - self.mean[:, None]) / self.std[:, None]


def frame_times(n_frames: int, cfg: FeatureConfig) -> np.ndarray:
    """Centre time (s) of each causal mel frame."""
    i = np.arange(n_frames)
    return (cfg.hop_length * (i + 1) - cfg.win_length / 2) / cfg.sample_rate


def f0_track(wav16k: np.ndarray, n_frames: int, cfg: FeatureConfig, fmin: float = 60.0, fmax: float = 600.0) -> np.ndarray:
    """F0 in Hz (0 = unvoiced) at the mel frame centres, with Praat's autocorrelation pitch (parselmouth)."""
    import parselmouth

    snd = parselmouth.Sound(np.asarray(wav16k, dtype=np.float64), cfg.sample_rate)
    pitch = snd.to_pitch(time_step=cfg.hop_length / cfg.sample_rate, pitch_floor=fmin, pitch_ceiling=fmax)
    f0 = pitch.selected_array["frequency"]
    xs = pitch.xs()
    t = frame_times(n_frames, cfg)
    if len(xs) == 0:
        return np.zeros(n_frames, dtype=np.float32)
    # nearest Praat frame for each mel frame; outside the analysed span -> unvoiced
    idx = np.clip(np.round((t - xs[0]) / (xs[1] - xs[0] if len(xs) > 1 else 1.0)).astype(int), 0, len(xs) - 1)
    out = f0[idx]
    out[(t < xs[0] - 0.01) | (t > xs[-1] + 0.01)] = 0.0
    return out.astype(np.float32)


def log_f0(f0: torch.Tensor) -> torch.Tensor:
    """Hz -> normalised log-F0 (about zero-mean over speech): log2(f0 / 150 Hz); unvoiced frames give 0."""
    return torch.where(f0 > 0, torch.log2(f0.clamp_min(1.0) / 150.0), torch.zeros_like(f0))


def frame_energy(raw_logmel: torch.Tensor) -> torch.Tensor:
    """Log energy per frame from an un-normalised log-mel [B, n_mels, T] -> [B, T]."""
    return torch.logsumexp(raw_logmel, dim=1) - math.log(raw_logmel.shape[1])
