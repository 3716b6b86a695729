"""Whisper's audio encoder (architecture only), run block by block on unpadded audio with a per-layer KV cache.

Pretrained weights come from a CTranslate2 `model.bin` (`from_ct2`); nothing here trains them. Two ways to run:

- `forward(mel)`: the reference, Whisper's encoder as published (every frame attends to every frame).
- `encode_block(mel_block, state)`: the streaming form used by the tokenizer. Audio is cut into blocks; a block's
  frames attend to all earlier blocks (through the KV cache) and to each other, never to later blocks. Conv
  front-ends see the last mel frames of the previous block as left context and zeros on the right. So the
  features of a block are final when the block arrives, and any chunking of the audio gives the same features.

Log-mel is Whisper's (80 bins, 25 ms Hann window, 10 ms hop, log10, 8-decade floor, (x + 4) / 4) with two
changes that make it streamable: frames are causal (frame i ends at sample 160 * (i + 1)), and the floor
follows the running maximum of the blocks so far instead of the maximum over a 30 s window.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import librosa
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

SAMPLE_RATE = 16000
HOP = 160
WIN = 400
FRAME_SECONDS = 0.02  # one encoder frame = 2 mel frames


@dataclass
class WhisperEncoderConfig:
    n_mels: int = 80
    dim: int = 512
    layers: int = 6
    heads: int = 8
    ffn: int = 2048
    max_positions: int = 1500  # 30 s of encoder frames

    @classmethod
    def base(cls) -> WhisperEncoderConfig:
        return cls()

    @classmethod
    def tiny_test(cls) -> WhisperEncoderConfig:
        return cls(n_mels=80, dim=32, layers=2, heads=2, ffn=64, max_positions=1500)


class WhisperLogMel(nn.Module):
    """Causal Whisper log-mel: samples [B, n] (n a multiple of 160) + the 240 samples before -> [B, 80, n / 160]."""

    def __init__(self, n_mels: int = 80):
        super().__init__()
        fb = librosa.filters.mel(sr=SAMPLE_RATE, n_fft=WIN, n_mels=n_mels)
        self.register_buffer("fb", torch.from_numpy(fb).float(), persistent=False)
        self.register_buffer("window", torch.hann_window(WIN, periodic=True), persistent=False)

    def log10_mel(self, wav: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        if wav.shape[-1] % HOP:
            raise ValueError(f"log-mel needs a multiple of {HOP} samples, got {wav.shape[-1]}")
        x = torch.cat([past, wav], dim=-1)
        frames = x.unfold(-1, WIN, HOP) * self.window
        power = torch.fft.rfft(frames, n=WIN).abs().pow(2)
        return torch.log10((power @ self.fb.T).clamp_min(1e-10)).transpose(1, 2)


class _Layer(nn.Module):
    def __init__(self, cfg: WhisperEncoderConfig):
        super().__init__()
        self.heads = cfg.heads
        self.attn_ln = nn.LayerNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)  # Whisper's key projection has no bias: its slice stays 0
        self.out = nn.Linear(cfg.dim, cfg.dim)
        self.mlp_ln = nn.LayerNorm(cfg.dim)
        self.fc1 = nn.Linear(cfg.dim, cfg.ffn)
        self.fc2 = nn.Linear(cfg.ffn, cfg.dim)

    def forward(self, x: torch.Tensor, past_kv: tuple[torch.Tensor, torch.Tensor] | None = None):
        b, t, d = x.shape
        q, k, v = self.qkv(self.attn_ln(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if past_kv is not None:
            k = torch.cat([past_kv[0], k], dim=2)
            v = torch.cat([past_kv[1], v], dim=2)
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.out(a.transpose(1, 2).reshape(b, t, d))
        x = x + self.fc2(F.gelu(self.fc1(self.mlp_ln(x))))
        return x, (k, v)


@dataclass
class EncoderState:
    """What the streaming encoder carries from one block to the next (owned by the tokenizer's stream)."""

    past_samples: torch.Tensor  # [B, 240] audio before the block (for the first mel frames)
    past_mel: torch.Tensor  # [B, n_mels, 2] normalised log-mel frames before the block (conv context)
    running_max: torch.Tensor  # [B] the highest log10-mel seen so far (for the 8-decade floor)
    frames: int = 0  # encoder frames produced so far (position of the next one)
    kv: list = field(default_factory=list)  # per layer (k, v) [B, heads, frames, head_dim]


class WhisperEncoder(nn.Module):
    def __init__(self, cfg: WhisperEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.mel = WhisperLogMel(cfg.n_mels)
        self.conv1 = nn.Conv1d(cfg.n_mels, cfg.dim, 3, padding=1)
        self.conv2 = nn.Conv1d(cfg.dim, cfg.dim, 3, stride=2, padding=1)
        self.register_buffer("positions", torch.zeros(cfg.max_positions, cfg.dim))
        self.layers = nn.ModuleList(_Layer(cfg) for _ in range(cfg.layers))
        self.ln_post = nn.LayerNorm(cfg.dim)

    # ------------------------------------------------------------------ reference (Whisper as published)
    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """Normalised log-mel [B, n_mels, 2T] -> features [B, T, dim], full attention."""
        x = F.gelu(self.conv2(F.gelu(self.conv1(mel)))).transpose(1, 2)
        x = x + self.positions[: x.shape[1]]
        for layer in self.layers:
            x, _ = layer(x)
        return self.ln_post(x)

    # ------------------------------------------------------------------ streaming
    def init_state(self, batch: int = 1) -> EncoderState:
        return EncoderState(past_samples=torch.zeros(batch, WIN - HOP), past_mel=torch.zeros(batch, self.cfg.n_mels, 2),
                            running_max=torch.full((batch,), -10.0))

    def encode_block(self, wav: torch.Tensor, state: EncoderState) -> tuple[torch.Tensor, EncoderState]:
        """16 kHz samples [B, n] (n a multiple of 320) -> features [B, n / 320, dim] and the next state."""
        if wav.shape[-1] % (2 * HOP):
            raise ValueError(f"encoder blocks need a multiple of {2 * HOP} samples, got {wav.shape[-1]}")
        t = wav.shape[-1] // (2 * HOP)
        if state.frames + t > self.cfg.max_positions:
            raise ValueError(f"the Whisper encoder takes at most {self.cfg.max_positions * FRAME_SECONDS:.0f} s of audio")
        logmel = self.mel.log10_mel(wav, state.past_samples)
        running_max = torch.maximum(state.running_max, logmel.amax(dim=(1, 2)))
        mel = (torch.maximum(logmel, (running_max - 8.0)[:, None, None]) + 4.0) / 4.0
        x = torch.cat([state.past_mel, mel], dim=-1)  # mel frames -2 .. 2t-1
        # conv1 over frames -1 .. 2t-1 (zero on the right), conv2 (stride 2) over them: frames 0 .. t-1
        x = F.gelu(F.conv1d(F.pad(x, (0, 1)), self.conv1.weight, self.conv1.bias))
        x = F.gelu(F.conv1d(x, self.conv2.weight, self.conv2.bias, stride=2)).transpose(1, 2)
        x = x + self.positions[state.frames : state.frames + t]
        kv = []
        for i, layer in enumerate(self.layers):
            x, layer_kv = layer(x, state.kv[i] if state.kv else None)
            kv.append(layer_kv)
        nxt = EncoderState(past_samples=wav[:, wav.shape[-1] - (WIN - HOP) :], past_mel=mel[:, :, -2:],
                           running_max=running_max, frames=state.frames + t, kv=kv)
        return self.ln_post(x), nxt

    # ------------------------------------------------------------------ weights
    @classmethod
    def from_ct2(cls, variables: dict[str, np.ndarray]) -> WhisperEncoder:
        """Build from the `encoder/...` variables of a CTranslate2 Whisper model.bin."""
        g = lambda name: torch.from_numpy(np.asarray(variables[f"encoder/{name}"], dtype=np.float32))  # noqa: E731
        conv1, qkv0, fc1 = g("conv1/weight"), g("layer_0/self_attention/linear_0/weight"), g("layer_0/ffn/linear_0/weight")
        n_layers = len({k.split("/")[1] for k in variables if re.match(r"encoder/layer_\d+/", k)})
        heads = int(np.asarray(variables.get("encoder/num_heads", 8)).reshape(-1)[0])
        cfg = WhisperEncoderConfig(n_mels=conv1.shape[1], dim=conv1.shape[0], layers=n_layers, heads=heads,
                                   ffn=fc1.shape[0], max_positions=g("position_encodings/encodings").shape[0])
        if qkv0.shape != (3 * cfg.dim, cfg.dim):
            raise ValueError(f"unexpected fused attention weight {tuple(qkv0.shape)} for width {cfg.dim}")
        state = {"conv1.weight": conv1, "conv1.bias": g("conv1/bias"), "conv2.weight": g("conv2/weight"),
                 "conv2.bias": g("conv2/bias"), "positions": g("position_encodings/encodings"),
                 "ln_post.weight": g("layer_norm/gamma"), "ln_post.bias": g("layer_norm/beta")}
        for i in range(n_layers):
            p = f"layer_{i}"
            for ours, theirs in (("attn_ln", "self_attention/layer_norm"), ("mlp_ln", "ffn/layer_norm")):
                state[f"layers.{i}.{ours}.weight"] = g(f"{p}/{theirs}/gamma")
                state[f"layers.{i}.{ours}.bias"] = g(f"{p}/{theirs}/beta")
            for ours, theirs in (("qkv", "self_attention/linear_0"), ("out", "self_attention/linear_1"),
                                 ("fc1", "ffn/linear_0"), ("fc2", "ffn/linear_1")):
                state[f"layers.{i}.{ours}.weight"] = g(f"{p}/{theirs}/weight")
                state[f"layers.{i}.{ours}.bias"] = g(f"{p}/{theirs}/bias")
        model = cls(cfg)
        model.load_state_dict(state)
        return model.eval()
