"""Reading a generated corpus: its JSONL files (manifest.jsonl: one row per utterance; dialogues.jsonl)."""

from __future__ import annotations

import json
from pathlib import Path


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a JSONL file, skipping blank lines. A half-written last line (the corpus is being generated)
    is left out; invalid JSON anywhere else raises ValueError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing {path}")
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if n > 1 and n == len(lines):
                break
            raise ValueError(f"{path}:{n}: invalid JSON: {exc}") from None
    return rows


def read_manifest(corpus: str | Path) -> list[dict]:
    """The utterance rows of `corpus`/manifest.jsonl in file order (id, split, role, speaker, text, audio, ...)."""
    corpus = Path(corpus)
    if not (corpus / "manifest.jsonl").is_file():
        raise FileNotFoundError(f"no manifest.jsonl in {corpus} (generate it with `npc-server train corpus`)")
    return read_jsonl(corpus / "manifest.jsonl")
