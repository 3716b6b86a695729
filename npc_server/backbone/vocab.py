"""The backbone's token-id layout: text tokens, then special/control tokens, then the 1024 + 4096 audio tokens.

Layout (all ids are positions in one embedding table of size `VocabLayout.size`):

    [0, n_text)                          text tokens of the byte-level BPE text tokenizer (text_tokenizer.py)
    [n_text, n_text + n_special)         special tokens, in the order of `SPECIAL_TOKENS` below:
                                         structure (<|bos|>, <|eos|>, <|pad|>, <|system|>, <|user|>,
                                         <|assistant|>, <|end|>, <|audio_start|>, <|audio_end|>,
                                         <|text_end|>), output modes, pretraining task tokens, persona
                                         tokens, then control tokens (emotion, speed, pitch, language,
                                         accent, voice)
    [audio_offset, audio_offset + 5120)  audio tokens: id = audio_offset + k, where k is the id of the audio
                                         tokenizer's interleaved stream (tokenizer contract): linguistic
                                         code c -> k = c (0..1023), semantic code c -> k = 1024 + c

`audio_offset` is `n_text + n_special` rounded up to a multiple of 64 (the gap ids are unused, never
sampled) so that a text tokenizer retrained with a few more merges still leaves the audio ids aligned.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from npc_server.controls import (
    ACCENTS,
    EMOTIONS,
    LANGUAGES,
    PITCH_RANGE_ST,
    SPEED_RANGE,
)
from npc_server.voices import VOICE_BANK

N_LINGUISTIC = 1024
N_SEMANTIC = 4096
N_AUDIO = N_LINGUISTIC + N_SEMANTIC

# The fixed personas of the default game world (persona YAMLs may add their own; they then use <|persona:custom|>
# and describe themselves in the system text).
PERSONA_IDS: tuple[str, ...] = (
    "innkeeper", "guard", "merchant", "blacksmith", "quest_giver", "companion", "tea_seller", "custom",
)

# Quantisation of the numeric controls into tokens.
SPEED_STEP = 0.05  # tempo factor buckets: 0.50, 0.55, ..., 2.00
PITCH_STEP_ST = 0.5  # semitone buckets: -12.0, -11.5, ..., +12.0

STRUCTURE_TOKENS: tuple[str, ...] = (
    "<|bos|>", "<|eos|>", "<|pad|>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
    "<|audio_start|>", "<|audio_end|>", "<|text_end|>",
)
MODE_TOKENS: tuple[str, ...] = ("<|mode:audio_text|>", "<|mode:text|>", "<|mode:audio|>")
# Pretraining tasks: replace the persona token in the system turn for TTS-like / ASR-like / continuation examples.
TASK_TOKENS: tuple[str, ...] = ("<|task:tts|>", "<|task:asr|>", "<|task:continue|>")


def _speed_values() -> list[float]:
    lo, hi = SPEED_RANGE
    n = round((hi - lo) / SPEED_STEP)
    return [round(lo + i * SPEED_STEP, 2) for i in range(n + 1)]


def _pitch_values() -> list[float]:
    lo, hi = PITCH_RANGE_ST
    n = round((hi - lo) / PITCH_STEP_ST)
    return [round(lo + i * PITCH_STEP_ST, 1) for i in range(n + 1)]


SPEED_VALUES = _speed_values()
PITCH_VALUES = _pitch_values()


def speed_token(speed: float) -> str:
    lo, hi = SPEED_RANGE
    if not lo <= speed <= hi:
        raise ValueError(f"speed {speed} outside {SPEED_RANGE}")
    value = min(SPEED_VALUES, key=lambda v: abs(v - speed))
    return f"<|speed:{value:.2f}|>"


def pitch_token(pitch_st: float) -> str:
    lo, hi = PITCH_RANGE_ST
    if not lo <= pitch_st <= hi:
        raise ValueError(f"pitch {pitch_st} st outside {PITCH_RANGE_ST}")
    value = min(PITCH_VALUES, key=lambda v: abs(v - pitch_st))
    return f"<|pitch:{value:+.1f}|>"


def emotion_token(emotion: str) -> str:
    if emotion not in EMOTIONS:
        raise ValueError(f"unknown emotion {emotion!r}; known: {', '.join(EMOTIONS)}")
    return f"<|emotion:{emotion}|>"


def language_token(language: str) -> str:
    if language not in LANGUAGES:
        raise ValueError(f"unknown language {language!r}; known: {', '.join(LANGUAGES)}")
    return f"<|lang:{language}|>"


def accent_token(accent: str) -> str:
    known = sorted({a for accents in ACCENTS.values() for a in accents})
    if accent not in known:
        raise ValueError(f"unknown accent {accent!r}; known: {', '.join(known)}")
    return f"<|accent:{accent}|>"


def voice_token(voice: str) -> str:
    if voice not in VOICE_BANK:
        raise ValueError(f"unknown voice {voice!r}; known: {', '.join(VOICE_BANK)}")
    return f"<|voice:{voice}|>"


def persona_token(persona: str) -> str:
    return f"<|persona:{persona if persona in PERSONA_IDS else 'custom'}|>"


def _special_tokens() -> tuple[str, ...]:
    accents = sorted({a for accents in ACCENTS.values() for a in accents})
    return (
        STRUCTURE_TOKENS
        + MODE_TOKENS
        + TASK_TOKENS
        + tuple(f"<|persona:{p}|>" for p in PERSONA_IDS)
        + tuple(emotion_token(e) for e in EMOTIONS)
        + tuple(f"<|speed:{v:.2f}|>" for v in SPEED_VALUES)
        + tuple(f"<|pitch:{v:+.1f}|>" for v in PITCH_VALUES)
        + tuple(language_token(lang) for lang in LANGUAGES)
        + tuple(f"<|accent:{a}|>" for a in accents)
        + tuple(voice_token(v) for v in VOICE_BANK)
    )


SPECIAL_TOKENS: tuple[str, ...] = _special_tokens()
AUDIO_ALIGN = 64


@dataclass(frozen=True)
class VocabLayout:
    """Id arithmetic for one text-vocabulary size; see the module docstring for the layout."""

    n_text: int

    def __post_init__(self) -> None:
        if self.n_text < 256:
            raise ValueError(f"n_text must be at least 256 (byte-level alphabet), got {self.n_text}")

    @property
    def special_offset(self) -> int:
        return self.n_text

    @property
    def n_special(self) -> int:
        return len(SPECIAL_TOKENS)

    @property
    def audio_offset(self) -> int:
        end = self.n_text + self.n_special
        return -(-end // AUDIO_ALIGN) * AUDIO_ALIGN

    @property
    def size(self) -> int:
        return self.audio_offset + N_AUDIO

    @cached_property
    def _special_ids(self) -> dict[str, int]:
        return {tok: self.n_text + i for i, tok in enumerate(SPECIAL_TOKENS)}

    def special(self, token: str) -> int:
        """Id of a special token such as "<|assistant|>" or "<|speed:1.00|>"."""
        try:
            return self._special_ids[token]
        except KeyError:
            raise ValueError(f"unknown special token {token!r}") from None

    def special_name(self, token_id: int) -> str:
        if not self.is_special(token_id):
            raise ValueError(f"id {token_id} is not a special token")
        return SPECIAL_TOKENS[token_id - self.n_text]

    # --- kinds -------------------------------------------------------------------------------------------
    def is_text(self, token_id: int) -> bool:
        return 0 <= token_id < self.n_text

    def is_special(self, token_id: int) -> bool:
        return self.n_text <= token_id < self.n_text + self.n_special

    def is_audio(self, token_id: int) -> bool:
        return self.audio_offset <= token_id < self.size

    def is_semantic(self, token_id: int) -> bool:
        return self.audio_offset + N_LINGUISTIC <= token_id < self.size

    # --- audio id conversion -----------------------------------------------------------------------------
    def audio_ids(self, interleaved):
        """Tokenizer interleaved ids (0..5119) -> backbone ids. Accepts a list or a LongTensor/ndarray."""
        return _shift(interleaved, self.audio_offset, 0, N_AUDIO, "interleaved audio id")

    def semantic_ids(self, codes):
        """Semantic codes (0..4095) -> backbone ids."""
        return _shift(codes, self.audio_offset + N_LINGUISTIC, 0, N_SEMANTIC, "semantic code")

    def to_semantic_codes(self, ids):
        """Backbone semantic ids -> semantic codes (0..4095)."""
        return _shift(ids, -(self.audio_offset + N_LINGUISTIC), self.audio_offset + N_LINGUISTIC, self.size,
                      "semantic backbone id")

    def to_interleaved(self, ids):
        """Backbone audio ids -> tokenizer interleaved ids (0..5119)."""
        return _shift(ids, -self.audio_offset, self.audio_offset, self.size, "audio backbone id")

    def describe(self) -> dict:
        return {
            "n_text": self.n_text,
            "special_offset": self.special_offset,
            "n_special": self.n_special,
            "audio_offset": self.audio_offset,
            "linguistic": [self.audio_offset, self.audio_offset + N_LINGUISTIC],
            "semantic": [self.audio_offset + N_LINGUISTIC, self.size],
            "size": self.size,
            "special_tokens": list(SPECIAL_TOKENS),
        }


def _shift(values, delta: int, lo: int, hi: int, what: str):
    """Add `delta` to every value after checking lo <= value < hi; keeps the container type."""
    import numpy as np
    import torch

    if isinstance(values, torch.Tensor):
        if values.numel() and (int(values.min()) < lo or int(values.max()) >= hi):
            raise ValueError(f"{what} out of range [{lo}, {hi})")
        return values.long() + delta
    if isinstance(values, np.ndarray):
        if values.size and (int(values.min()) < lo or int(values.max()) >= hi):
            raise ValueError(f"{what} out of range [{lo}, {hi})")
        return values.astype(np.int64) + delta
    out = []
    for v in values:
        v = int(v)
        if not lo <= v < hi:
            raise ValueError(f"{what} {v} out of range [{lo}, {hi})")
        out.append(v + delta)
    return out
