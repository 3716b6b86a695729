"""Where things live: the embedded default model, the personas folder, and the data cache outside git."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "default"
DEFAULT_PERSONAS_DIR = REPO_ROOT / "personas"


def data_dir() -> Path:
    """Cache for generated corpora and training runs (never committed). Override with NPC_VOICE_DATA."""
    return Path(os.environ.get("NPC_VOICE_DATA", Path.home() / ".cache" / "npc-voice")).expanduser()


def require_corpus(corpus: str | Path, command: str, needs: tuple[str, ...] = ("manifest.jsonl",)) -> Path:
    """The corpus folder a command reads; when it lacks a file, end the command with one line that says what is
    missing and how to make it (a fresh clone has no corpus: it is generated, never committed)."""
    corpus = Path(corpus).expanduser()
    missing = [name for name in needs if not (corpus / name).is_file()]
    if missing:
        raise SystemExit(
            f"npc-server {command}: no corpus at {corpus} ({', '.join(missing)} missing). Make it with "
            "`npc-server train corpus --size default` (about an hour on 2 cores, ~3 GB; it goes to "
            "$NPC_VOICE_DATA/corpus/default, default ~/.cache/npc-voice), or pass --corpus DIR."
        )
    return corpus
