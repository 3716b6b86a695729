"""Mel -> waveform generator, Vocos-style (ConvNeXt blocks + iSTFT head) with an F0-driven source: the head predicts
magnitudes and a phase residual on top of the STFT phase of a harmonic-plus-noise excitation built from a predicted
F0, so pitch follows the mel instead of collapsing to the frame rate (a known failure of iSTFT heads trained
without a GAN)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GeneratorConfig:
    n_mels: int = 80
    dim: int = 256
    intermediate_dim: int = 512
    n_layers: int = 8
    kernel_size: int = 7
    n_fft: int = 960  # iSTFT size; 4x overlap with hop 240
    hop_length: int = 240
    sample_rate: int = 24000
    mel_mean: float = -5.0  # log-mel normalisation applied at the input
    mel_std: float = 2.5
    use_source: bool = True  # F0-driven excitation phase (False: plain Vocos head)
    f0_dim: int = 128
    f0_layers: int = 4
    harmonics: int = 40
    noise_seed: int = 4321

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def receptive_frames(self) -> int:
        """Frames of context needed on each side for a frame's output to be exact."""
        return (self.kernel_size // 2) * (self.n_layers + 1) + 1


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int, intermediate_dim: int, kernel_size: int):
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pw1 = nn.Linear(dim, intermediate_dim)
        self.pw2 = nn.Linear(intermediate_dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T]
        h = self.dwconv(x).transpose(1, 2)
        h = self.pw2(F.gelu(self.pw1(self.norm(h))))
        return x + (self.gamma * h).transpose(1, 2)


class ISTFTHead(nn.Module):
    """Predicts log-magnitude and phase per frame; overlap-add with torch.istft."""

    def __init__(self, dim: int, n_fft: int, hop_length: int):
        super().__init__()
        self.n_fft, self.hop_length = n_fft, hop_length
        self.proj = nn.Linear(dim, n_fft + 2)
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)

    def spectrum(self, x: torch.Tensor, base_phase: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, C] -> complex [B, F, T]; base_phase [B, F, T] (the excitation's) is added to the predicted phase."""
        mag, phase = self.proj(x).float().transpose(1, 2).chunk(2, dim=1)
        mag = torch.exp(mag.clamp(max=6.0))
        if base_phase is not None:
            phase = phase + base_phase
        return torch.polar(mag, phase)

    def istft(self, spec: torch.Tensor) -> torch.Tensor:
        n = spec.shape[-1] * self.hop_length
        return torch.istft(spec, self.n_fft, self.hop_length, self.n_fft, self.window, center=True, length=n)

    def forward(self, x: torch.Tensor, base_phase: torch.Tensor | None = None) -> torch.Tensor:
        return self.istft(self.spectrum(x, base_phase))


class F0Predictor(nn.Module):
    """Normalised log-mel [B, n_mels, T] -> (log F0 [B, T], voicing logit [B, T])."""

    def __init__(self, n_mels: int, dim: int, layers: int):
        super().__init__()
        convs = [nn.Conv1d(n_mels, dim, 5, padding=2)]
        convs += [nn.Conv1d(dim, dim, 5, padding=2) for _ in range(layers - 1)]
        self.convs = nn.ModuleList(convs)
        self.out = nn.Conv1d(dim, 2, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for conv in self.convs:
            x = F.silu(conv(x))
        log_f0, voiced = self.out(x).unbind(1)
        return log_f0 + math.log(150.0), voiced


class Generator(nn.Module):
    """log-mel [B, n_mels, T] -> waveform [B, T * hop]."""

    def __init__(self, config: GeneratorConfig | None = None):
        super().__init__()
        self.config = c = config or GeneratorConfig()
        self.embed = nn.Conv1d(c.n_mels, c.dim, c.kernel_size, padding=c.kernel_size // 2)
        self.norm = nn.LayerNorm(c.dim, eps=1e-6)
        self.blocks = nn.ModuleList(ConvNeXtBlock(c.dim, c.intermediate_dim, c.kernel_size) for _ in range(c.n_layers))
        self.final_norm = nn.LayerNorm(c.dim, eps=1e-6)
        self.head = ISTFTHead(c.dim, c.n_fft, c.hop_length)
        self.f0_predictor = F0Predictor(c.n_mels, c.f0_dim, c.f0_layers) if c.use_source else None
        self._noise_blocks: dict[int, torch.Tensor] = {}

    def features(self, mel: torch.Tensor) -> torch.Tensor:
        c = self.config
        x = self.embed((mel - c.mel_mean) / c.mel_std)
        x = self.norm(x.transpose(1, 2)).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        return self.final_norm(x.transpose(1, 2))

    # -- source -------------------------------------------------------------------------------------------
    def predict_f0(self, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (log F0 [B, T], voicing logit [B, T])."""
        c = self.config
        return self.f0_predictor((mel - c.mel_mean) / c.mel_std)

    def f0_hz(self, mel: torch.Tensor) -> torch.Tensor:
        """Predicted F0 in Hz per frame, 0 where unvoiced."""
        log_f0, voiced = self.predict_f0(mel)
        return torch.where(voiced > 0, log_f0.float().clamp(math.log(50.0), math.log(800.0)).exp(), 0.0)

    def _noise(self, start: int, n: int, block: int = 24000) -> torch.Tensor:
        parts, s = [], start
        while s < start + n:
            b = s // block
            if b not in self._noise_blocks:
                gen = torch.Generator().manual_seed(self.config.noise_seed * 1_000_003 + b)
                self._noise_blocks[b] = torch.randn(block, generator=gen)
            lo, hi = s - b * block, min(block, start + n - b * block)
            parts.append(self._noise_blocks[b][lo:hi])
            s = b * block + hi
        return torch.cat(parts)

    def excitation(self, f0: torch.Tensor, start_frame: int = 0, phase0: torch.Tensor | None = None):
        """Harmonic (voiced) + noise (unvoiced) signal from frame F0 [B, T] (Hz, 0 = unvoiced).

        Returns (signal [B, T * hop], phase [B, T + 1] at each frame boundary) -- the running phase lets a streaming
        decoder continue exactly where the previous chunk was. Noise depends only on absolute sample positions."""
        c = self.config
        B, T = f0.shape
        hop = c.hop_length
        f0s = f0.double().repeat_interleave(hop, dim=1)  # [B, N]
        incr = 2 * math.pi * f0s / c.sample_rate
        start = torch.zeros(B, 1, dtype=torch.float64) if phase0 is None else phase0.double().view(B, 1)
        phase = start + torch.cumsum(incr, dim=1) - incr  # phase at each sample
        boundaries = torch.cat([phase[:, ::hop], (phase[:, -1:] + incr[:, -1:])], dim=1).remainder(2 * math.pi)
        # sum_{h=1..H} sin(h p) in closed form, H = harmonics below 0.45 sr (band-limited pulse train)
        n_h = torch.clamp(torch.floor(0.45 * c.sample_rate / f0s.clamp_min(1.0)), 1, c.harmonics)
        p = phase.remainder(2 * math.pi)
        half = torch.sin(p / 2)
        safe = torch.where(half.abs() < 1e-6, torch.full_like(half, 1e-6), half)
        harm = (torch.sin(n_h * p / 2) * torch.sin((n_h + 1) * p / 2) / safe).float() / n_h.float()
        noise = self._noise(start_frame * hop, T * hop)[None].expand(B, -1)
        voiced = (f0s > 0).float()
        return voiced * harm + (1 - voiced) * noise * 0.1, boundaries

    def forward(self, mel: torch.Tensor, f0: torch.Tensor | None = None, start_frame: int = 0,
                phase0: torch.Tensor | None = None, return_phase: bool = False):
        """mel [B, n_mels, T] -> wav [B, T * hop] (and the source phase at frame boundaries with return_phase).

        f0 (Hz per frame) defaults to the predictor's estimate; training passes the measured F0."""
        feats = self.features(mel)
        boundaries = None
        base = None
        if self.config.use_source:
            if f0 is None:
                f0 = self.f0_hz(mel)
            exc, boundaries = self.excitation(f0, start_frame, phase0)
            spec = torch.stft(exc, self.head.n_fft, self.head.hop_length, self.head.n_fft, self.head.window,
                              center=True, return_complex=True)[..., : mel.shape[-1]]
            base = torch.angle(spec)
        wav = self.head(feats, base)
        return (wav, boundaries) if return_phase else wav
