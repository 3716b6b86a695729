"""Byte-level BPE text tokenizer (Hugging Face `tokenizers`) trained on the corpus text of all languages."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)

TOKENIZER_FILE = "tokenizer.json"


class TextTokenizer:
    """Text <-> ids in [0, vocab_size). Byte-level, so any Unicode text (en, ja, yue, cmn) round-trips exactly
    (after NFC normalisation). Special tokens are not part of it: they live above it in the backbone
    vocabulary (vocab.py)."""

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 2048, min_frequency: int = 2) -> TextTokenizer:
        if vocab_size < 256:
            raise ValueError(f"vocab_size must be >= 256 (byte alphabet), got {vocab_size}")
        tok = Tokenizer(models.BPE())
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        texts = [t for t in texts if t]
        if not texts:
            raise ValueError("cannot train a text tokenizer on an empty corpus")
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"text ids out of range [0, {self.vocab_size}): {bad[:5]}")
        return self._tok.decode(ids, skip_special_tokens=False)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / TOKENIZER_FILE
        self._tok.save(str(path))
        return path

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> TextTokenizer:
        path = Path(directory)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no text tokenizer at {path}")
        return cls(Tokenizer.from_file(str(path)))


def corpus_texts(corpus_dir: str | Path) -> list[str]:
    """All text of a corpus (manifest utterances and dialogue turns, incl. rejected answers) for training."""
    corpus_dir = Path(corpus_dir)
    texts: list[str] = []
    manifest = corpus_dir / "manifest.jsonl"
    dialogues = corpus_dir / "dialogues.jsonl"
    if not manifest.is_file() and not dialogues.is_file():
        raise FileNotFoundError(f"{corpus_dir} has neither manifest.jsonl nor dialogues.jsonl")
    if manifest.is_file():
        for line in manifest.read_text(encoding="utf-8").splitlines():
            if line.strip():
                texts.append(json.loads(line)["text"])
    if dialogues.is_file():
        for line in dialogues.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            texts += [row["question_text"], row["answer_text"], row.get("rejected_text", "")]
            for turn in row.get("history", []):
                texts += [turn["question"], turn["answer"]]
    return texts
