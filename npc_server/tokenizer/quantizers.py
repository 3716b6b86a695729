"""Cosine-similarity vector quantizer with EMA codebook updates and dead-code restarts."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class VQConfig:
    codebook_size: int = 1024
    dim: int = 64
    decay: float = 0.99
    commitment: float = 0.25
    dead_fraction: float = 0.1  # a code is dead when its EMA count < dead_fraction * mean count
    eps: float = 1e-5


class VectorQuantizer(nn.Module):
    """Quantises L2-normalised vectors to the nearest (cosine) of `codebook_size` unit codewords.

    Training (module in train mode and `update=True`): codewords follow an exponential moving average of the
    vectors assigned to them; codewords that fall out of use are restarted on random vectors of the batch,
    which keeps most of the codebook in use. Gradients pass straight through to the encoder.
    """

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("codebook", F.normalize(torch.randn(cfg.codebook_size, cfg.dim), dim=-1))
        self.register_buffer("ema_count", torch.ones(cfg.codebook_size))
        self.register_buffer("ema_sum", self.codebook.clone())
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def soft(self, z: torch.Tensor) -> torch.Tensor:
        """The continuous value the code approximates (for auxiliary losses)."""
        return F.normalize(z.float(), dim=-1)

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """z [..., dim] -> codes [...] (int64)."""
        z = F.normalize(z.float(), dim=-1)
        return (z @ self.codebook.T).argmax(dim=-1)

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [...] -> unit vectors [..., dim]."""
        return F.embedding(codes, self.codebook)

    def forward(self, z: torch.Tensor, mask: torch.Tensor | None = None, update: bool = True):
        """z [B, T, dim], mask [B, T] (True = real frame) -> (quantised z with straight-through grad, codes, loss)."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            zn = F.normalize(z.float(), dim=-1)
            flat = zn.reshape(-1, zn.shape[-1])
            valid = flat if mask is None else flat[mask.reshape(-1)]
            if self.training and update and valid.shape[0] > 0:
                self._update(valid.detach())
            codes = (zn @ self.codebook.T).argmax(dim=-1)
            zq = self.embed(codes)
            err = (zn - zq.detach()).pow(2).sum(-1)
            if mask is not None:
                loss = (err * mask).sum() / mask.sum().clamp_min(1)
            else:
                loss = err.mean()
            zq = zn + (zq - zn).detach()
        return zq, codes, self.cfg.commitment * loss

    @torch.no_grad()
    def _update(self, x: torch.Tensor) -> None:
        cfg = self.cfg
        k = cfg.codebook_size
        if not bool(self.initialized):
            idx = torch.randint(0, x.shape[0], (k,), device=x.device)
            init = F.normalize(x[idx] + 0.01 * torch.randn_like(x[idx]), dim=-1)
            self.codebook.copy_(init)
            self.ema_sum.copy_(init)
            self.ema_count.fill_(1.0)
            self.initialized.fill_(True)
        codes = (x @ self.codebook.T).argmax(dim=-1)
        onehot = F.one_hot(codes, k).type_as(x)
        count = onehot.sum(0)
        summed = onehot.T @ x
        self.ema_count.mul_(cfg.decay).add_(count, alpha=1 - cfg.decay)
        self.ema_sum.mul_(cfg.decay).add_(summed, alpha=1 - cfg.decay)
        self.codebook.copy_(F.normalize(self.ema_sum / self.ema_count.clamp_min(cfg.eps)[:, None], dim=-1))
        # dead-code restarts: re-seed unused codewords on random vectors of this batch
        mean_count = self.ema_count.mean()
        dead = (self.ema_count < cfg.dead_fraction * mean_count).nonzero().squeeze(-1)
        if dead.numel() > 0:
            n = min(dead.numel(), x.shape[0])
            dead = dead[torch.randperm(dead.numel(), device=x.device)[:n]]
            pick = x[torch.randint(0, x.shape[0], (n,), device=x.device)]
            fresh = F.normalize(pick + 0.01 * torch.randn_like(pick), dim=-1)
            self.codebook[dead] = fresh
            self.ema_sum[dead] = fresh * mean_count
            self.ema_count[dead] = mean_count


def codebook_usage(codes: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Fraction of codes used and perplexity (exp of the entropy of the code distribution)."""
    counts = torch.bincount(codes.reshape(-1).long(), minlength=codebook_size).double()
    p = counts / counts.sum().clamp_min(1)
    nz = p[p > 0]
    perplexity = float(torch.exp(-(nz * nz.log()).sum()))
    return {
        "tokens": int(counts.sum()),
        "used_fraction": float((counts > 0).double().mean()),
        "perplexity": perplexity,
        "perplexity_fraction": perplexity / codebook_size,
    }


@dataclass
class FSQConfig:
    levels: list[int] = field(default_factory=lambda: [4, 4, 4, 4, 4])  # product = codebook size

    @property
    def codebook_size(self) -> int:
        n = 1
        for level in self.levels:
            n *= level
        return n

    @property
    def dim(self) -> int:
        return len(self.levels)


class FiniteScalarQuantizer(nn.Module):
    """Finite scalar quantisation (Mentzer et al. 2023): each dimension is bounded and rounded to `levels[i]` values.

    No codebook to learn, so no collapse: every code is a point of a fixed grid. Gradients pass straight through
    the rounding. Same interface as VectorQuantizer (encode / embed / forward -> (zq, codes, loss=0)).
    """

    def __init__(self, cfg: FSQConfig):
        super().__init__()
        self.cfg = cfg
        levels = torch.tensor(cfg.levels, dtype=torch.float32)
        basis = torch.cumprod(torch.tensor([1] + cfg.levels[:-1], dtype=torch.long), dim=0)
        self.register_buffer("levels", levels, persistent=False)
        self.register_buffer("basis", basis, persistent=False)

    def _bound(self, z: torch.Tensor) -> torch.Tensor:
        half = (self.levels - 1) * (1 + 1e-3) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half)
        return torch.tanh(z + shift) * half - offset

    def soft(self, z: torch.Tensor) -> torch.Tensor:
        """The continuous (bounded, unrounded) value, on the scale of `embed`."""
        return self._bound(z.float()) / (self.levels // 2)

    def _round(self, z: torch.Tensor) -> torch.Tensor:
        b = self._bound(z.float())
        return b + (torch.round(b) - b).detach()  # integer grid values, straight-through gradient

    def digits(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [...] -> grid indices per dimension [..., dim], each 0..levels[i]-1."""
        return (codes.long()[..., None] // self.basis) % self.levels.long()

    def from_digits(self, digits: torch.Tensor) -> torch.Tensor:
        """Grid indices per dimension [..., dim] -> codes [...] (inverse of `digits`)."""
        return (digits * self.basis).sum(-1)

    def _to_codes(self, q: torch.Tensor) -> torch.Tensor:
        return self.from_digits(q.round().long() + self.levels.long() // 2)

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        return self._to_codes(self._round(z))

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [...] -> grid points scaled to about [-1, 1]: [..., dim]."""
        return (self.digits(codes) - self.levels.long() // 2).float() / (self.levels // 2)

    def forward(self, z: torch.Tensor, mask: torch.Tensor | None = None, update: bool = True):
        with torch.autocast(device_type=z.device.type, enabled=False):
            q = self._round(z)
            codes = self._to_codes(q)
            zq = q / (self.levels // 2)
        return zq, codes, z.new_zeros(()).float()


class QuantizedStreamConfig:
    """Shared by the linguistic and semantic stream configs (dataclasses with `encoder`, `quantizer`, `fsq`, `vq`):
    the quantiser's input size and code count, and the encoder sized to feed it."""

    @property
    def q_dim(self) -> int:
        return self.fsq.dim if self.quantizer == "fsq" else self.vq.dim

    @property
    def codebook_size(self) -> int:
        return self.fsq.codebook_size if self.quantizer == "fsq" else self.vq.codebook_size

    def __post_init__(self) -> None:
        self.encoder.out_dim = self.q_dim


def make_quantizer(kind: str, vq: VQConfig, fsq: FSQConfig) -> nn.Module:
    if kind == "vq":
        return VectorQuantizer(vq)
    if kind == "fsq":
        return FiniteScalarQuantizer(fsq)
    raise ValueError(f"unknown quantizer {kind!r} (use 'fsq' or 'vq')")
