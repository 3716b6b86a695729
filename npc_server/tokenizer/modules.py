"""Streaming building blocks of the tokenizer encoders: causal convolutions and chunk-attention layers with caches."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


class CausalConv1d(nn.Module):
    """Conv1d whose output frame j sees input frames [j*s + s - k, j*s + s): no look-ahead past its own stride.

    forward(x, state) takes the last k - s input frames of the previous call as `state` (zeros at the start)
    and returns (y, new_state), so running chunk by chunk (chunk lengths a multiple of the stride) equals
    running on the whole sequence.
    """

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__()
        if kernel < stride:
            raise ValueError(f"kernel {kernel} must be >= stride {stride}")
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride=stride, groups=groups)
        self.pad = kernel - stride
        self.stride = stride

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None):
        if state is None:
            state = x.new_zeros(x.shape[0], x.shape[1], self.pad)
        x = torch.cat([state, x], dim=-1)
        new_state = x[..., x.shape[-1] - self.pad :]
        return self.conv(x), new_state


class ChunkAttentionLayer(nn.Module):
    """Pre-norm transformer layer (attention, causal depthwise conv, feed-forward) with chunked attention.

    A frame attends to every frame of its own chunk (limited look-ahead, at most one chunk) and to the
    `left_chunks` chunks before it. The depthwise convolution gives the layer its sense of order (no
    positional embedding is needed). State = (keys, values, conv state) of the past, so a stream of whole
    chunks gives the same result as the whole sequence at once.
    """

    def __init__(self, dim: int, heads: int, ff_mult: int, conv_kernel: int, chunk: int, left_chunks: int):
        super().__init__()
        self.heads = heads
        self.chunk = chunk
        self.left_chunks = left_chunks
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dwconv = CausalConv1d(dim, dim, conv_kernel, groups=dim)
        self.pw = nn.Linear(dim, dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Linear(ff_mult * dim, dim))

    def _mask(self, t_new: int, t_past: int, device) -> torch.Tensor:
        q = torch.arange(t_new, device=device) // self.chunk
        k = torch.div(torch.arange(-t_past, t_new, device=device), self.chunk, rounding_mode="floor")
        return (k[None, :] <= q[:, None]) & (k[None, :] >= q[:, None] - self.left_chunks)

    def forward(self, x: torch.Tensor, state=None):
        """x [B, T, D] with T a multiple of `chunk` -> (y [B, T, D], new state)."""
        b, t, d = x.shape
        h = self.heads
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
        past_k, past_v, conv_state = state if state is not None else (None, None, None)
        if past_k is not None:
            k = torch.cat([past_k, k], dim=2)
            v = torch.cat([past_v, v], dim=2)
        t_past = k.shape[2] - t
        mask = self._mask(t, t_past, x.device)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        keep = self.left_chunks * self.chunk
        new_k, new_v = k[:, :, max(0, k.shape[2] - keep) :], v[:, :, max(0, v.shape[2] - keep) :]
        c, new_conv = self.dwconv(self.norm2(x).transpose(1, 2), conv_state)
        x = x + self.pw(F.gelu(c.transpose(1, 2)))
        x = x + self.ff(self.norm3(x))
        return x, (new_k, new_v, new_conv)


class FrameNorm(nn.Module):
    """Per-dimension standardisation over all (batch, time) frames, like BatchNorm without affine parameters.

    Placed before the quantiser it keeps every code dimension varying across frames, which stops the encoder
    from collapsing to one code (the CTC blank-only optimum of early training pulls it there). In eval mode
    it applies the running statistics: a fixed per-frame affine map, so streaming stays exact.
    """

    def __init__(self, dim: int, momentum: float = 0.01, gain: float = 1.0, eps: float = 1e-4):
        super().__init__()
        self.momentum, self.gain, self.eps = momentum, gain, eps
        self.frozen = False  # training may freeze the statistics (fine-tuning after recalibration)
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, D], mask [B, T] (True = real frame)."""
        if self.training and not self.frozen:
            flat = x.float().reshape(-1, x.shape[-1])
            if mask is not None:
                flat = flat[mask.reshape(-1)]
            if flat.shape[0] > 1:
                mean, var = flat.mean(0), flat.var(0, unbiased=False)
                with torch.no_grad():
                    self.running_mean.lerp_(mean, self.momentum)
                    self.running_var.lerp_(var, self.momentum)
                return (x.float() - mean) / torch.sqrt(var + self.eps) * self.gain
        return (x.float() - self.running_mean) / torch.sqrt(self.running_var + self.eps) * self.gain


@dataclass
class EncoderConfig:
    n_mels: int = 80
    strides: list[int] = field(default_factory=lambda: [1, 2, 3])  # product = mel frames per token
    kernels: list[int] = field(default_factory=lambda: [3, 4, 5])
    channels: int = 256
    dim: int = 192
    layers: int = 3
    heads: int = 4
    ff_mult: int = 3
    conv_kernel: int = 5
    chunk: int = 8  # tokens per attention chunk (= one processing block)
    left_chunks: int = 2
    out_dim: int = 64  # quantiser dimension
    out_norm: bool = True  # standardise the output per dimension (FrameNorm) before quantisation

    @property
    def stride(self) -> int:
        s = 1
        for x in self.strides:
            s *= x
        return s


class StreamingEncoder(nn.Module):
    """log-mel [B, n_mels, T_mel] -> vectors [B, T_mel / stride, out_dim]: causal strided convs + chunk attention."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        convs = []
        c_in = cfg.n_mels
        for i, (k, s) in enumerate(zip(cfg.kernels, cfg.strides)):
            c_out = cfg.dim if i == len(cfg.strides) - 1 else cfg.channels
            convs.append(CausalConv1d(c_in, c_out, k, s))
            c_in = c_out
        self.convs = nn.ModuleList(convs)
        for conv in self.convs:  # keep the signal at unit scale through the GELU stack (default init shrinks it)
            nn.init.kaiming_normal_(conv.conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.conv.bias)
        self.in_norm = nn.LayerNorm(cfg.dim)
        self.layers = nn.ModuleList(
            ChunkAttentionLayer(cfg.dim, cfg.heads, cfg.ff_mult, cfg.conv_kernel, cfg.chunk, cfg.left_chunks)
            for _ in range(cfg.layers)
        )
        self.norm = nn.LayerNorm(cfg.dim)
        self.out = nn.Linear(cfg.dim, cfg.out_dim)
        self.out_norm = FrameNorm(cfg.out_dim) if cfg.out_norm else None

    def forward(self, mel: torch.Tensor, state=None, mask: torch.Tensor | None = None):
        states = state if state is not None else [None] * (len(self.convs) + len(self.layers))
        new_states = []
        x = mel
        for i, conv in enumerate(self.convs):
            x, s = conv(x, states[i])
            new_states.append(s)
            if i < len(self.convs) - 1:
                x = F.gelu(x)
        x = self.in_norm(x.transpose(1, 2))
        for j, layer in enumerate(self.layers):
            x, s = layer(x, states[len(self.convs) + j])
            new_states.append(s)
        z = self.out(self.norm(x))
        if self.out_norm is not None:
            z = self.out_norm(z, mask)
        return z, new_states


class ConvReadout(nn.Module):
    """Non-causal conv stack over quantised vectors (+ optional bidirectional GRU layers for sentence-wide context)
    -> `upsample` sets of logits per token (CTC phone readout)."""

    def __init__(self, in_dim: int, hidden: int, n_out: int, upsample: int, layers: int = 3, kernel: int = 3,
                 rnn_layers: int = 0):
        super().__init__()
        self.upsample = upsample
        self.n_out = n_out
        mods: list[nn.Module] = []
        c = in_dim
        for _ in range(layers):
            mods += [nn.Conv1d(c, hidden, kernel, padding=kernel // 2), nn.GELU()]
            c = hidden
        self.net = nn.Sequential(*mods)
        self.rnn = (nn.GRU(hidden, hidden // 2, num_layers=rnn_layers, batch_first=True, bidirectional=True)
                    if rnn_layers else None)
        self.rnn_norm = nn.LayerNorm(hidden) if rnn_layers else None
        self.head = nn.Linear(hidden, upsample * n_out)

    def forward(self, z: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """z [B, T, in_dim] -> logits [B, T * upsample, n_out]. With `lengths` (valid tokens per row) each row's
        logits do not depend on the padding after it (conv inputs zeroed past the end, the GRU run on packed rows);
        without it every row is taken as full length."""
        if lengths is None:
            h = self.net(z.transpose(1, 2)).transpose(1, 2)
        else:  # zero everything past each row's end, as the conv padding of a row alone would be
            keep = (torch.arange(z.shape[1], device=z.device)[None, :] < lengths.to(z.device)[:, None])[:, None, :]
            h = z.transpose(1, 2) * keep
            for mod in self.net:
                h = mod(h) * keep if isinstance(mod, nn.GELU) else mod(h)
            h = h.transpose(1, 2)
        if self.rnn is not None:
            if lengths is not None:
                packed = nn.utils.rnn.pack_padded_sequence(h, lengths.cpu(), batch_first=True, enforce_sorted=False)
                r, _ = self.rnn(packed)
                r, _ = nn.utils.rnn.pad_packed_sequence(r, batch_first=True, total_length=h.shape[1])
            else:
                r, _ = self.rnn(h)
            h = self.rnn_norm(h + r)
        b, t, _ = h.shape
        return self.head(h).view(b, t * self.upsample, self.n_out)


class ReconDecoder(nn.Module):
    """Quantised semantic vectors [B, T, in_dim] -> frame targets [B, n_out, T * upsample] (log-mel, log-F0, ...)."""

    def __init__(self, in_dim: int, hidden: int, n_out: int, upsample: int, layers: int = 3, kernel: int = 5):
        super().__init__()
        self.upsample = upsample
        self.inp = nn.Conv1d(in_dim, hidden, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.GELU(), nn.Conv1d(hidden, hidden, kernel, padding=kernel // 2)) for _ in range(layers)
        )
        self.fine = hidden // 2  # channels at the 10 ms frame rate (kept small: it is the costly part)
        self.up = nn.Conv1d(hidden, self.fine * upsample, 1)
        self.post = nn.Sequential(nn.GELU(), nn.Conv1d(self.fine, self.fine, 3, padding=1), nn.GELU(), nn.Conv1d(self.fine, n_out, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.inp(z.transpose(1, 2))
        for blk in self.blocks:
            h = h + blk(h)
        b, _, t = h.shape
        c = self.fine
        h = self.up(h).view(b, c, self.upsample, t).permute(0, 1, 3, 2).reshape(b, c, t * self.upsample)
        return self.post(h)
