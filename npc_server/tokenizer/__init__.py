"""Dual-codebook audio tokenizer: linguistic (16.7 Hz, 1024 codes) + semantic (25 Hz, 4096 codes), 2:3 interleave."""

from npc_server.tokenizer.tokenizer import (
    AUDIO_VOCAB_SIZE,
    LINGUISTIC_CODES,
    SEMANTIC_CODES,
    SEMANTIC_OFFSET,
    AudioTokenizer,
    AudioTokenizerConfig,
    AudioTokens,
    TokenizerStream,
    interleave,
    preset,
    split_interleaved,
)

__all__ = [
    "AUDIO_VOCAB_SIZE",
    "LINGUISTIC_CODES",
    "SEMANTIC_CODES",
    "SEMANTIC_OFFSET",
    "AudioTokenizer",
    "AudioTokenizerConfig",
    "AudioTokens",
    "TokenizerStream",
    "interleave",
    "preset",
    "split_interleaved",
]
