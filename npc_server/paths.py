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
