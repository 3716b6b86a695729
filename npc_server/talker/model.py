"""The talker: answer phones -> 25 Hz semantic audio tokens, in a voice, with an emotion and a speed.

Step-Audio ships its speech output as a separate model (Step-Audio-Chat writes, Step-Audio-TTS speaks); this is
the small CPU-sized version of that split. Three parts, all conditioned on (voice, language, emotion, speed):

- **phone encoder**: a transformer over the phones whose first layer sees `lookahead` phones to the right and whose
  other layers are causal, so phone j's state depends on phones <= j + lookahead only: the talker can start
  speaking a few phones after the text starts arriving;
- **duration head**: frames per phone (log domain), from the phone state;
- **frame decoder**: a causal transformer LM over the audio tokens. Frame t reads the state of the phone it belongs
  to (with its position inside that phone and the frames left in it) plus the previous token, and predicts the
  token. A hard, monotonic alignment (durations) makes words follow text by construction, which is what the v1
  backbone's interleaved blocks never learned.

The `prior` head (phone state -> token distribution) is a training aid: its log-probabilities are the scores of
the monotonic alignment search that finds the training durations (Glow-TTS style), see `align.py`.
Sampling, the KV cache and streaming live in `generator.py`; training in `npc_server/training/tts.py`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from npc_server.controls import EMOTIONS, LANGUAGES
from npc_server.talker.frontend import SPECIALS, Phones

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class TalkerConfig:
    phones: tuple[str, ...] = ()  # phone units after the specials (<pad> <s> </s> <pause>)
    voices: tuple[str, ...] = ("joe",)
    languages: tuple[str, ...] = tuple(LANGUAGES)
    emotions: tuple[str, ...] = tuple(EMOTIONS)
    n_codes: int = 4096  # semantic codebook of the audio tokenizer
    tokens_per_second: float = 25.0
    dim: int = 256
    heads: int = 4
    ff_mult: int = 3
    encoder_layers: int = 3
    decoder_layers: int = 4
    lookahead: int = 3  # phones right of phone j that its state may depend on
    max_phones: int = 512
    max_in_phone: int = 32  # position-in-phone / frames-left embeddings are clipped here
    max_frames_per_phone: int = 40  # durations are clamped to this at inference (1.6 s)
    # the duration head predicts durations at tempo 1; an answer at tempo t (speed x the emotion's rate, as the
    # corpus renders it) takes durations / t, so requested speeds are met by construction
    tempo_law: bool = True
    dropout: float = 0.1
    token_dropout: float = 0.1  # training: previous token replaced by the <mask> code this often
    rope_theta: float = 10000.0

    @property
    def n_phone_ids(self) -> int:
        return len(SPECIALS) + len(self.phones)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TalkerConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown TalkerConfig fields: {sorted(unknown)}")
        data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**data)


def rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding of x [B, H, T, D] at integer `positions` [T]."""
    d = x.shape[-1] // 2
    freqs = theta ** (-torch.arange(d, dtype=torch.float32, device=x.device) / d)
    angles = positions.to(torch.float32)[:, None] * freqs[None, :]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Block(nn.Module):
    """Pre-norm transformer block; attention takes a boolean mask (True = may attend) and optional rotary
    positions and a key/value cache (a dict with "k", "v", extended in place)."""

    def __init__(self, dim: int, heads: int, ff_mult: int, dropout: float, rope_theta: float):
        super().__init__()
        self.heads, self.rope_theta = heads, rope_theta
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Linear(ff_mult * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor | None = None,
                cache: dict | None = None) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if positions is not None:
            q, k = rotary(q, positions, self.rope_theta), rotary(k, positions, self.rope_theta)
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        p = self.drop.p if self.training else 0.0
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(b, t, c)))
        return x + self.drop(self.ff(self.norm2(x)))


class Talker(nn.Module):
    def __init__(self, cfg: TalkerConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        # conditioning
        self.voice = nn.Embedding(len(cfg.voices), d)
        self.language = nn.Embedding(len(cfg.languages), d)
        self.emotion = nn.Embedding(len(cfg.emotions), d)
        self.speed = nn.Linear(1, d)
        # phone encoder
        self.phone = nn.Embedding(cfg.n_phone_ids, d, padding_idx=0)
        self.word_start = nn.Embedding(2, d)
        self.phone_pos = nn.Embedding(cfg.max_phones, d)
        self.encoder = nn.ModuleList(Block(d, cfg.heads, cfg.ff_mult, cfg.dropout, cfg.rope_theta)
                                     for _ in range(cfg.encoder_layers))
        self.encoder_norm = nn.LayerNorm(d)
        self.duration = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, 1))
        self.prior = nn.Linear(d, cfg.n_codes)
        # frame decoder; token id n_codes is <bos> (before the first frame), n_codes + 1 is <mask>
        self.token = nn.Embedding(cfg.n_codes + 2, d)
        self.in_phone = nn.Embedding(cfg.max_in_phone, d)
        self.left_in_phone = nn.Embedding(cfg.max_in_phone, d)
        self.phone_to_frame = nn.Linear(d, d)
        self.decoder = nn.ModuleList(Block(d, cfg.heads, cfg.ff_mult, cfg.dropout, cfg.rope_theta)
                                     for _ in range(cfg.decoder_layers))
        self.decoder_norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, cfg.n_codes)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ ids
    def phone_ids(self, phones: Phones) -> list[int]:
        """Phone units -> ids; units outside the inventory (a rare IPA symbol) are dropped by the caller's
        `known_phones`, never mapped to <pad>."""
        index = {p: i for i, p in enumerate(SPECIALS + self.cfg.phones)}
        return [index[u] for u in phones.units]

    def known_phones(self, phones: Phones) -> Phones:
        """`phones` without the units this talker was not trained on."""
        known = set(SPECIALS + self.cfg.phones)
        keep = [i for i, u in enumerate(phones.units) if u in known]
        words, carried = [], ""  # a dropped unit's word text moves to the next kept unit
        for i, u in enumerate(phones.units):
            carried = phones.word(i) or (carried if not phones.word_starts[i] else "")
            if u in known:
                words.append(carried)
                carried = ""
        return Phones([phones.units[i] for i in keep], [phones.word_starts[i] for i in keep], words)

    def condition_ids(self, voice: str, language: str, emotion: str) -> tuple[int, int, int]:
        cfg = self.cfg
        if voice not in cfg.voices:
            raise ValueError(f"the talker has no voice {voice!r} (voices: {', '.join(cfg.voices)})")
        if language not in cfg.languages:
            raise ValueError(f"the talker has no language {language!r} (languages: {', '.join(cfg.languages)})")
        emo = cfg.emotions.index(emotion) if emotion in cfg.emotions else cfg.emotions.index("neutral")
        return cfg.voices.index(voice), cfg.languages.index(language), emo

    # ------------------------------------------------------------------ parts
    def condition(self, voice: torch.Tensor, language: torch.Tensor, emotion: torch.Tensor,
                  speed: torch.Tensor) -> torch.Tensor:
        """[B] ids and speeds -> [B, 1, dim]."""
        c = self.voice(voice) + self.language(language) + self.emotion(emotion)
        return (c + self.speed(torch.log(speed.float())[:, None]))[:, None, :]

    def encode_phones(self, ids: torch.Tensor, word_starts: torch.Tensor, cond: torch.Tensor,
                      pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Phone ids [B, N] -> phone states [B, N, dim]; state j depends on phones <= j + lookahead only."""
        n = ids.shape[1]
        if n > self.cfg.max_phones:
            raise ValueError(f"{n} phones: the talker reads at most {self.cfg.max_phones} per answer")
        pos = torch.arange(n, device=ids.device)
        x = self.phone(ids) + self.word_start(word_starts.long()) + self.phone_pos(pos)[None] + cond
        first = pos[None, :] <= pos[:, None] + self.cfg.lookahead  # [N, N] query j sees keys <= j + lookahead
        causal = pos[None, :] <= pos[:, None]
        for i, block in enumerate(self.encoder):
            mask = first if i == 0 else causal
            if pad_mask is not None:
                mask = mask[None, None] & pad_mask[:, None, None, :]
            x = block(x, mask)
        return self.encoder_norm(x)

    def log_durations(self, states: torch.Tensor) -> torch.Tensor:
        """Phone states [B, N, dim] -> log frames per phone [B, N] (trained on detached states)."""
        return self.duration(states).squeeze(-1)

    def prior_logits(self, states: torch.Tensor) -> torch.Tensor:
        return self.prior(states)

    def frame_context(self, states: torch.Tensor, frame_phone: torch.Tensor, in_phone: torch.Tensor,
                      left_in_phone: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """What the decoder knows of frames [B, T] before sampling: the aligned phone's state, the position in it,
        the frames left in it, the condition -> [B, T, dim]."""
        m = self.cfg.max_in_phone - 1
        aligned = torch.gather(states, 1, frame_phone[..., None].expand(-1, -1, states.shape[-1]))
        return (self.phone_to_frame(aligned) + self.in_phone(in_phone.clamp(max=m))
                + self.left_in_phone(left_in_phone.clamp(max=m)) + cond)

    def frame_inputs(self, states: torch.Tensor, frame_phone: torch.Tensor, in_phone: torch.Tensor,
                     left_in_phone: torch.Tensor, prev_tokens: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Decoder inputs [B, T, dim]: the frame context plus the previous token's embedding."""
        return self.frame_context(states, frame_phone, in_phone, left_in_phone, cond) + self.token(prev_tokens)

    def decode_frames(self, x: torch.Tensor, caches: list[dict] | None = None,
                      pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder inputs [B, T, dim] -> token logits [B, T, n_codes], causal. With `caches` (one dict per layer,
        empty at the first call) the frames continue the cached ones."""
        t = x.shape[1]
        past = caches[0]["k"].shape[2] if caches and "k" in caches[0] else 0
        q_pos = torch.arange(past, past + t, device=x.device)
        k_pos = torch.arange(past + t, device=x.device)
        mask = k_pos[None, :] <= q_pos[:, None]
        if pad_mask is not None:
            mask = mask[None, None] & pad_mask[:, None, None, :]
        for i, block in enumerate(self.decoder):
            x = block(x, mask, positions=q_pos, cache=caches[i] if caches is not None else None)
        return self.head(self.decoder_norm(x))

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, directory: str | Path, dtype: torch.dtype = torch.float16) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to(dtype).contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_FILE))
        (directory / CONFIG_FILE).write_text(json.dumps(self.cfg.to_dict(), ensure_ascii=False, indent=1) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> Talker:
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / CONFIG_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"{directory} must hold {CONFIG_FILE} and {WEIGHTS_FILE} (a talker, "
                                    "`npc-server train tts`)")
        model = cls(TalkerConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text())))
        state = {k: v.float() for k, v in load_file(str(directory / WEIGHTS_FILE)).items()}
        model.load_state_dict(state)
        return model.eval()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def tempo(speed: float, emotion: str) -> float:
    """How much faster than the voice's natural rate an answer is spoken: the requested speed times the emotion's
    rate (`controls.EMOTIONS`; unknown emotions count as neutral), the way the corpus renders it."""
    return float(speed) * EMOTIONS.get(emotion, EMOTIONS["neutral"]).rate


class DurationRounder:
    """Continuous durations -> whole frames, each at least 1 and at most `max_frames`, rounding the running total
    so that the rounding errors of many short phones do not add up (a requested speed is kept over an answer)."""

    def __init__(self, max_frames: int):
        self.max_frames = max_frames
        self.total = 0.0  # continuous frames so far
        self.frames = 0  # whole frames given out so far

    def __call__(self, durations: list[float]) -> list[int]:
        out = []
        for d in durations:
            self.total += d
            f = min(self.max_frames, max(1, round(self.total) - self.frames))
            self.frames += f
            out.append(f)
        return out
