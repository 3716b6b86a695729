"""Mel -> waveform generator, Vocos-style: ConvNeXt blocks at the frame rate and an iSTFT head (cheap on CPU)."""

from __future__ import annotations

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
    mel_mean: float = -5.0  # log-mel normalisation applied at the input
    mel_std: float = 2.5

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

    def spectrum(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, C] -> complex [B, F, T]
        mag, phase = self.proj(x).float().transpose(1, 2).chunk(2, dim=1)
        mag = torch.exp(mag.clamp(max=6.0))
        return torch.polar(mag, phase)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spectrum(x)
        n = spec.shape[-1] * self.hop_length
        return torch.istft(spec, self.n_fft, self.hop_length, self.n_fft, self.window, center=True, length=n)


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

    def features(self, mel: torch.Tensor) -> torch.Tensor:
        c = self.config
        x = self.embed((mel - c.mel_mean) / c.mel_std)
        x = self.norm(x.transpose(1, 2)).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        return self.final_norm(x.transpose(1, 2))

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(mel))
