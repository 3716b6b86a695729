"""Conditional flow-matching decoder: semantic tokens + voice + pitch shift -> log-mel, a 1-D U-Net of ResNet and
local-attention transformer blocks integrated with a few Euler steps from a token-conditioned prior (Matcha-style)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch import nn

from npc_server.voices import VOICE_BANK

OTHER_VOICE = "<other>"  # slot for speakers outside the voice bank (player voices in the corpus)


@dataclass
class FlowConfig:
    n_codes: int = 4096
    n_mels: int = 80
    frames_per_token: int = 4
    voices: list[str] = field(default_factory=lambda: [*VOICE_BANK, OTHER_VOICE])
    dim: int = 192
    token_dim: int = 192
    cond_layers: int = 2  # residual conv blocks on the token sequence before upsampling
    res_blocks: int = 2  # ResNet blocks per U-Net level (full and half frame rate)
    transformer_layers: int = 2  # at half frame rate
    cond_transformer_layers: int = 0  # token-rate blocks in the token encoder (context for the prior and condition)
    cond_lookahead: int = 3  # tokens to the right those blocks may attend to (left: attn_window)
    n_heads: int = 4
    attn_window: int = 12  # 25 Hz frames each side a position may attend to (keeps streaming local)
    kernel_size: int = 5
    pitch_scale_st: float = 12.0
    # What pitch 0 means. "tokens": the level the tokens imply (the input is a shift from the utterance as spoken).
    # "voice": the voice's neutral F0 (the input is the utterance's median F0 in semitones from the voice's
    # reference, so the voice, not the tokens, sets the level; `train vocoder --pitch-reference voice`).
    pitch_reference: str = "tokens"
    voice_f0_hz: dict[str, float] = field(default_factory=dict)  # "voice": the references measured in training (Hz)
    mel_mean: float = -5.0
    mel_std: float = 2.5
    sigma_min: float = 1e-4
    prior_noise: float = 1.0  # the flow starts at mu + prior_noise * noise, mu = the encoder's mel estimate
    prior_weight: float = 1.0  # weight of the encoder's mel regression loss
    temperature: float = 0.667  # noise scale at sampling time (Matcha-TTS practice; 1.0 = as trained)
    n_steps: int = 6
    # Classifier-free guidance on the tokens. Training: the fraction of examples whose token condition (the
    # encoder's condition and the prior mean as U-Net input) is replaced by zeros; voice, pitch and the starting
    # point mu + noise are kept. Sampling: v = v_c + guidance * (v_c - v_u), v_u without the tokens (one batched
    # pass of twice the size); 0 = off, a single pass. Guidance needs a flow trained with cond_dropout > 0.
    cond_dropout: float = 0.0
    guidance: float = 0.0
    guidance_steps: int = 0  # guide only the first N Euler steps (N extra passes instead of n_steps); 0 = all steps
    # with guidance_steps > 0: the later steps reuse the last guided step's guidance * (v_c - v_u) instead of
    # dropping it, at no extra pass (measured in docs/log/2026-12-01-vocoder-s11-judges-guidance-96.md)
    guidance_carry: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def check_cond_dropout(p: float) -> None:
    """A classifier-free-guidance dropout must be a fraction of training examples, 0 <= p < 1."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"cond_dropout is a fraction of training examples, 0 <= p < 1; got {p}")


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


class ChannelNorm(nn.Module):
    """LayerNorm over channels of [B, C, T], per frame (no statistics across time, so it streams)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


class ResBlock1D(nn.Module):
    def __init__(self, dim: int, kernel_size: int, cond_dim: int):
        super().__init__()
        self.norm1 = ChannelNorm(dim)
        self.conv1 = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2)
        self.film = nn.Linear(cond_dim, 2 * dim)
        self.norm2 = ChannelNorm(dim)
        self.conv2 = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def modulation(self, g: torch.Tensor) -> torch.Tensor:
        """Global condition g [B, cond_dim] -> FiLM scale and shift [B, 2 dim, 1]."""
        return self.film(g).unsqueeze(-1)

    def forward(self, x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:  # mod = self.modulation(g)
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = mod.chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return x + self.conv2(F.silu(h))


class TransformerBlock(nn.Module):
    """Pre-norm block with adaptive LayerNorm from the global condition and banded (local) self-attention."""

    def __init__(self, dim: int, n_heads: int, cond_dim: int):
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.ada = nn.Linear(cond_dim, 6 * dim)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def zero_residual(self) -> "TransformerBlock":
        """Zero the output layers of both residual branches: the block starts as the identity."""
        for layer in (self.out, self.ff[-1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        return self

    def modulation(self, g: torch.Tensor) -> torch.Tensor:
        """Global condition g [B, cond_dim] -> adaptive LayerNorm scales, shifts and gates [B, 1, 6 dim]."""
        return self.ada(g).unsqueeze(1)

    def forward(self, x: torch.Tensor, mod: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # x [B, T, C]
        s1, b1, a1, s2, b2, a2 = mod.chunk(6, dim=-1)
        h = self.norm1(x) * (1 + s1) + b1
        B, T, C = h.shape
        q, k, v = self.qkv(h).view(B, T, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)
        # The math kernel: on an Intel Xeon the CPU flash kernel with this band mask differed from it by 0.4%
        # (relative) and streamed chunks no longer matched the offline output; the math kernel matches to 1e-7.
        with sdpa_kernel(SDPBackend.MATH):
            h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, T, C)
        x = x + (1 + a1) * self.out(h)
        h = self.norm2(x) * (1 + s2) + b2
        return x + (1 + a2) * self.ff(h)


@dataclass
class SamplingConditions:
    """What the voice and pitch contribute to sampling: the token encoder's block modulations and the U-Net's at
    each Euler step's time. They depend on neither tokens nor noise, so a stream computes them once for all its
    chunks instead of once per chunk (`FlowDecoder.sampling_conditions`)."""

    encoder: list[torch.Tensor]
    steps: list[list[torch.Tensor]]  # one list per Euler step
    times: torch.Tensor  # the Euler schedule, n_steps + 1 times from 0 to 1

    @property
    def n_steps(self) -> int:
        return len(self.steps)


class FlowDecoder(nn.Module):
    """Velocity field v(x_t, t | tokens, voice, pitch) on normalised log-mel, plus the Euler sampler."""

    def __init__(self, config: FlowConfig | None = None):
        super().__init__()
        self.config = c = config or FlowConfig()
        if c.pitch_reference not in ("tokens", "voice"):
            raise ValueError(f"pitch_reference must be 'tokens' or 'voice', got {c.pitch_reference!r}")
        check_cond_dropout(c.cond_dropout)
        self.set_sampling(guidance=c.guidance, guidance_steps=c.guidance_steps)
        d = c.dim
        self.token_embed = nn.Embedding(c.n_codes, c.token_dim)
        self.cond_in = nn.Conv1d(c.token_dim, d, 3, padding=1)
        self.cond_blocks = nn.ModuleList(ResBlock1D(d, 3, d) for _ in range(c.cond_layers))
        self.cond_transformers = nn.ModuleList(
            TransformerBlock(d, c.n_heads, d).zero_residual() for _ in range(c.cond_transformer_layers))
        self.cond_up = nn.Conv1d(d, d, 5, padding=2)
        self.cond_post = ResBlock1D(d, c.kernel_size, d)
        self.prior_out = nn.Conv1d(d, 2 * c.n_mels, 1)
        self.voice_embed = nn.Embedding(len(c.voices), d)
        self.pitch_mlp = nn.Sequential(nn.Linear(1, d), nn.SiLU(), nn.Linear(d, d))
        self.time_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.x_in = nn.Conv1d(4 * c.n_mels, d, 3, padding=1)
        self.down_blocks = nn.ModuleList(ResBlock1D(d, c.kernel_size, d) for _ in range(c.res_blocks))
        self.down = nn.Conv1d(d, d, 4, stride=2, padding=1)
        self.mid_blocks = nn.ModuleList(ResBlock1D(d, c.kernel_size, d) for _ in range(c.res_blocks))
        self.transformers = nn.ModuleList(TransformerBlock(d, c.n_heads, d) for _ in range(c.transformer_layers))
        self.up = nn.Conv1d(d, d, 3, padding=1)
        self.skip = nn.Conv1d(2 * d, d, 1)
        self.up_blocks = nn.ModuleList(ResBlock1D(d, c.kernel_size, d) for _ in range(c.res_blocks))
        self.out_norm = ChannelNorm(d)
        self.x_out = nn.Conv1d(d, 2 * c.n_mels, 3, padding=1)
        nn.init.zeros_(self.x_out.weight)
        nn.init.zeros_(self.x_out.bias)

    # -- conditioning -------------------------------------------------------------------------------------
    def voice_index(self, voice: str) -> int:
        try:
            return self.config.voices.index(voice)
        except ValueError:
            known = ", ".join(v for v in self.config.voices if v != OTHER_VOICE)
            raise ValueError(f"unknown voice {voice!r}; known voices: {known}") from None

    def encoder_modulations(self, g: torch.Tensor) -> list[torch.Tensor]:
        """The token encoder's block modulations from the global condition g [B, dim], in block order."""
        return [block.modulation(g) for block in (*self.cond_blocks, *self.cond_transformers, self.cond_post)]

    def unet_modulations(self, g: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
        """The U-Net's block modulations at flow time t [B] from g [B, dim], in block order."""
        gt = g + self.time_mlp(timestep_embedding(t, self.config.dim))
        blocks = (*self.down_blocks, *self.mid_blocks, *self.transformers, *self.up_blocks)
        return [block.modulation(gt) for block in blocks]

    def encode_tokens(self, tokens: torch.Tensor, g: torch.Tensor | None,
                      mods: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, T], global condition g [B, dim] (or its `encoder_modulations`, computed once for many
        windows) -> (condition [B, dim, 2T], prior mean mu [B, 2 n_mels, 2T]).

        The U-Net works on pairs of mel frames (50 Hz, 2 x n_mels channels): half the cost of 100 Hz."""
        mod = iter(self.encoder_modulations(g) if mods is None else mods)
        h = self.cond_in(self.token_embed(tokens).transpose(1, 2))
        for block in self.cond_blocks:
            h = block(h, next(mod))
        if len(self.cond_transformers):
            h = h.transpose(1, 2)
            mask = self._band_mask(h.shape[1], h.device, right=self.config.cond_lookahead)
            for block in self.cond_transformers:
                h = block(h, next(mod), mask)
            h = h.transpose(1, 2)
        h = h.repeat_interleave(self.config.frames_per_token // 2, dim=2)
        h = self.cond_post(h + self.cond_up(h), next(mod))
        return h, self.prior_out(h)

    @staticmethod
    def pair_frames(x: torch.Tensor) -> torch.Tensor:
        """[B, C, F] -> [B, 2C, F/2]: frames 2k and 2k+1 stacked as channels (2c, 2c+1)."""
        B, C, F_ = x.shape
        return x.view(B, C, F_ // 2, 2).transpose(2, 3).reshape(B, 2 * C, F_ // 2)

    @staticmethod
    def unpair_frames(x: torch.Tensor) -> torch.Tensor:
        B, C2, H = x.shape
        return x.view(B, C2 // 2, 2, H).transpose(2, 3).reshape(B, C2 // 2, 2 * H)

    def global_condition(self, voice: torch.Tensor, pitch_st: torch.Tensor) -> torch.Tensor:
        p = (pitch_st.float() / self.config.pitch_scale_st).unsqueeze(-1)
        return self.voice_embed(voice) + self.pitch_mlp(p)

    def _band_mask(self, n: int, device, right: int | None = None) -> torch.Tensor:
        """[n, n] True where query i may attend to key j: attn_window positions to the left, `right` (default
        attn_window) to the right."""
        idx = torch.arange(n, device=device)
        rel = idx[None, :] - idx[:, None]
        return (rel >= -self.config.attn_window) & (rel <= (self.config.attn_window if right is None else right))

    # -- velocity -----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, mu: torch.Tensor, g: torch.Tensor):
        """Velocity at time t [B] of paired normalised mel x [B, 2 n_mels, H]; cond [B, dim, H], mu like x, g [B, dim]."""
        return self.unet(x, cond, mu, self.unet_modulations(g, t))

    def unet(self, x: torch.Tensor, cond: torch.Tensor, mu: torch.Tensor, mods: list[torch.Tensor]) -> torch.Tensor:
        """`forward` with the time and global condition given as their `unet_modulations` (the sampler computes them
        once per Euler step time and voice, not once per window)."""
        if x.shape[-1] % 2:
            raise ValueError(f"the number of paired mel frames must be even, got {x.shape[-1]}")
        mod = iter(mods)
        h = self.x_in(torch.cat([x, mu], dim=1)) + cond
        for block in self.down_blocks:
            h = block(h, next(mod))
        skip = h
        h = self.down(h)
        for block in self.mid_blocks:
            h = block(h, next(mod))
        h = h.transpose(1, 2)
        mask = self._band_mask(h.shape[1], h.device)
        for block in self.transformers:
            h = block(h, next(mod), mask)
        h = self.up(h.transpose(1, 2).repeat_interleave(2, dim=2))
        h = self.skip(torch.cat([h, skip], dim=1))
        for block in self.up_blocks:
            h = block(h, next(mod))
        return self.x_out(F.silu(self.out_norm(h)))

    # -- training loss (OT-CFM) ---------------------------------------------------------------------------
    def loss(
        self,
        mel: torch.Tensor,
        tokens: torch.Tensor,
        voice: torch.Tensor,
        pitch_st: torch.Tensor,
        mask: torch.Tensor | None = None,
        return_estimate: bool = False,
    ):
        """OT-CFM loss + prior regression loss. mel [B, n_mels, F] raw log-mel, F = T * frames_per_token;
        mask [B, F] (1 = real frame).

        With return_estimate, also returns the one-step estimate of the clean mel, x_t + (1 - t) v (raw log-mel
        [B, n_mels, F], differentiable), and t [B]: what training-time judges of the output (phones, F0) look at,
        weighting by t. With cond_dropout, t is 0 for the examples trained without their tokens (their estimate
        is not meant to match their mel)."""
        c = self.config
        x1 = self.pair_frames((mel - c.mel_mean) / c.mel_std)
        g = self.global_condition(voice, pitch_st)
        cond, mu = self.encode_tokens(tokens, g)
        x0 = mu.detach() + c.prior_noise * torch.randn_like(x1)
        t = torch.rand(x1.shape[0], device=x1.device)
        tt = t[:, None, None]
        xt = (1 - (1 - c.sigma_min) * tt) * x0 + tt * x1
        target = x1 - (1 - c.sigma_min) * x0
        keep = torch.ones_like(t)
        if self.training and c.cond_dropout > 0:  # classifier-free guidance: some examples without the tokens
            keep = (torch.rand_like(t) >= c.cond_dropout).to(t.dtype)
            k = keep[:, None, None].to(cond.dtype)
            pred = self(xt, t, cond * k, mu * k, g)
        else:
            pred = self(xt, t, cond, mu, g)
        err = (pred.float() - target) ** 2 + c.prior_weight * (mu.float() - x1) ** 2
        if mask is None:
            loss = err.mean()
        else:
            m = mask[:, None, ::2].to(err.dtype)
            loss = (err * m).sum() / (m.sum() * err.shape[1]).clamp_min(1.0)
        if not return_estimate:
            return loss
        x1_hat = xt + (1 - tt) * pred.float()
        return loss, self.unpair_frames(x1_hat) * c.mel_std + c.mel_mean, t * keep

    # -- sampling -----------------------------------------------------------------------------------------
    def set_sampling(self, n_steps: int | None = None, temperature: float | None = None,
                     guidance: float | None = None, guidance_steps: int | None = None,
                     guidance_carry: bool | None = None) -> None:
        """Change the sampler's settings (None keeps one), checked: guidance needs a flow trained with cond_dropout."""
        c = self.config
        if n_steps is not None and n_steps < 1:
            raise ValueError(f"n_steps must be >= 1, got {n_steps}")
        if temperature is not None and temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if guidance is not None and (guidance < 0 or (guidance > 0 and c.cond_dropout == 0)):
            raise ValueError(f"guidance must be >= 0, and > 0 needs a flow trained with cond_dropout > 0 "
                             f"(got guidance {guidance}, this flow's cond_dropout {c.cond_dropout})")
        if guidance_steps is not None and guidance_steps < 0:
            raise ValueError(f"guidance_steps must be >= 0 (0 = every step), got {guidance_steps}")
        c.n_steps = c.n_steps if n_steps is None else n_steps
        c.temperature = c.temperature if temperature is None else temperature
        c.guidance = c.guidance if guidance is None else guidance
        c.guidance_steps = c.guidance_steps if guidance_steps is None else guidance_steps
        c.guidance_carry = c.guidance_carry if guidance_carry is None else bool(guidance_carry)

    def velocity(self, x: torch.Tensor, cond: torch.Tensor, mu: torch.Tensor, mods: list[torch.Tensor],
                 guided: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The sampler's velocity (mods: the step's `unet_modulations`): the network's, or with guidance > 0 (and
        `guided`) pushed away from the token-free velocity. -> (velocity, its guidance term guidance * (v_c - v_u),
        None when unguided)."""
        w = self.config.guidance
        if w <= 0 or not guided:
            return self.unet(x, cond, mu, mods), None
        v_c, v_u = self.unet(
            torch.cat([x, x]), torch.cat([cond, torch.zeros_like(cond)]), torch.cat([mu, torch.zeros_like(mu)]),
            [torch.cat([m, m]) for m in mods],
        ).chunk(2)
        term = w * (v_c - v_u)
        return v_c + term, term

    @torch.no_grad()
    def sampling_conditions(self, voice: torch.Tensor, pitch_st: torch.Tensor,
                            n_steps: int | None = None) -> SamplingConditions:
        """What voice [B] and pitch shift [B] contribute to sampling with `n_steps` Euler steps (default: the
        config's), computed once: a stream passes it to `sample` for every chunk."""
        n_steps = n_steps or self.config.n_steps
        g = self.global_condition(voice, pitch_st)
        # cosine schedule: smaller steps near t=0 where the field changes fastest
        times = 1 - torch.cos(torch.linspace(0, 1, n_steps + 1) * math.pi / 2)
        steps = [self.unet_modulations(g, torch.full((g.shape[0],), float(t), device=g.device)) for t in times[:-1]]
        return SamplingConditions(self.encoder_modulations(g), steps, times)

    @torch.no_grad()
    def sample(
        self, tokens: torch.Tensor, voice: torch.Tensor, pitch_st: torch.Tensor, noise: torch.Tensor,
        n_steps: int | None = None, conditions: SamplingConditions | None = None,
    ) -> torch.Tensor:
        """Euler integration from mu + noise [B, n_mels, F] at t=0 to t=1 -> raw log-mel [B, n_mels, F].
        `conditions` (from `sampling_conditions` with the same voice, pitch and steps) saves recomputing them."""
        c = self.config
        if conditions is None:
            conditions = self.sampling_conditions(voice, pitch_st, n_steps)
        elif n_steps and n_steps != conditions.n_steps:
            raise ValueError(f"n_steps {n_steps} differs from the conditions' {conditions.n_steps} steps")
        cond, mu = self.encode_tokens(tokens, None, conditions.encoder)
        x = mu + c.temperature * c.prior_noise * self.pair_frames(noise)
        ts = conditions.times
        term = None  # the last guided step's guidance term, reused by later steps with guidance_carry
        for i, mods in enumerate(conditions.steps):
            guided = c.guidance_steps == 0 or i < c.guidance_steps
            v, new_term = self.velocity(x, cond, mu, mods, guided)
            if new_term is not None:
                term = new_term
            elif c.guidance_carry and term is not None:
                v = v + term
            x = x + float(ts[i + 1] - ts[i]) * v
        return self.unpair_frames(x) * c.mel_std + c.mel_mean
