"""Synthetic stand-ins for backbone tests and smoke runs: contract-shaped dialogue rows and text-derived token caches.

The token cache made here is NOT audio: each character of an utterance's text is mapped to a linguistic code and
a speaker/pitch-dependent semantic code, stretched to the duration the text would take, and interleaved 2:3 like
the real tokenizer's output. It has the shapes, rates and id ranges of the tokenizer contract and a learnable
text <-> audio correspondence, so training stages can be exercised before the audio tokenizer exists.
"""

from __future__ import annotations

import json
import random
import zlib
from pathlib import Path

import numpy as np

from npc_server.tokenizer import interleave
from npc_server.training.corpus.manifest import read_manifest
from npc_server.training.lm_data import save_tokens

CHARS_PER_SECOND = 14.0

_PERSONAS = [
    ("innkeeper", "gb_female", "en", "gb"),
    ("guard", "scot_male", "en", "scotland"),
    ("merchant", "joe_high", "en", "us"),
    ("blacksmith", "joe_low", "en", "us"),
    ("quest_giver", "joe", "en", "us"),
]
_ITEMS = [("a room", 10), ("a bowl of stew", 2), ("a sword", 40), ("a shield", 25), ("bread", 1), ("a lantern", 5)]
_PLACES = [("the smithy", "down by the river"), ("the chapel", "up the hill"), ("the market", "in the middle of town")]


def text_tokens(text: str, speaker: str, pitch_st: float = 0.0, speed: float = 1.0) -> dict[str, np.ndarray]:
    """Deterministic pseudo audio tokens of a text (see module docstring)."""
    chars = [c for c in text.lower() if not c.isspace()] or ["."]
    duration = max(0.3, len(text) / CHARS_PER_SECOND / speed)
    groups = max(1, round(duration / 0.12))  # whole 120 ms groups, like the tokenizer
    n_l, n_s = 2 * groups, 3 * groups
    spk = zlib.crc32(f"{speaker}:{round(pitch_st)}".encode())
    ling = np.array([zlib.crc32(chars[i * len(chars) // n_l].encode()) % 1024 for i in range(n_l)])
    sem = np.array([(zlib.crc32(chars[i * len(chars) // n_s].encode()) + spk) % 4096 for i in range(n_s)])
    return {"linguistic": ling, "semantic": sem, "interleaved": interleave(ling, sem).numpy()}


def synthetic_token_cache(corpus_dir: str | Path, out_dir: str | Path) -> int:
    """Write a text-derived token cache for every manifest utterance; returns the count."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = 0
    for row in read_manifest(corpus_dir):
        c = row.get("controls", {})
        toks = text_tokens(row["text"], row["speaker"], c.get("pitch_st", 0.0), c.get("speed", 1.0))
        save_tokens(out_dir / f"{row['id']}.npz", toks["linguistic"], toks["semantic"], toks["interleaved"])
        n += 1
    return n


def synthetic_corpus(out_dir: str | Path, n_dialogues: int = 40, seed: int = 0) -> Path:
    """A small corpus (manifest.jsonl + dialogues.jsonl, no wav files) that follows the corpus contract."""
    rng = random.Random(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest, dialogues = [], []

    def utt(uid, split, role, speaker, lang, accent, controls, text):
        manifest.append({
            "id": uid, "split": split, "role": role, "language": lang, "accent": accent, "speaker": speaker,
            "controls": controls, "text": text, "phonemes": "", "audio": f"audio/{uid}.wav", "sr": 22050,
            "duration": round(len(text) / CHARS_PER_SECOND / controls["speed"], 2),
        })

    for i in range(n_dialogues):
        persona, voice, lang, accent = _PERSONAS[i % len(_PERSONAS)]
        split = "heldout" if i % 10 == 9 else "valid" if i % 10 == 8 else "train"
        player = f"player{rng.randrange(3) + (10 if split == 'heldout' else 0)}"
        controls = {"emotion": rng.choice(["neutral", "happy", "calm"]), "speed": rng.choice([0.9, 1.0, 1.2]),
                    "pitch_st": rng.choice([-2.0, 0.0, 2.0])}
        kind = i % 3
        history = []
        if kind == 0:
            item, price = rng.choice(_ITEMS)
            q, a, wrong = f"How much is {item}?", f"{item.capitalize()} costs {price} gold.", "I have no idea."
            category, expected = "price", [str(price)]
        elif kind == 1:
            place, where = rng.choice(_PLACES)
            q, a, wrong = f"Where is {place}?", f"{place.capitalize()} is {where}.", "Buy something first."
            category, expected = "directions", [where]
        else:
            x, y = rng.randrange(1, 10), rng.randrange(1, 10)
            history = [{"question": "Hello there.", "answer": "Good day, traveller."}]
            q, a, wrong = f"What is {x} plus {y}?", f"That makes {x + y}.", f"That makes {x + y + 1}."
            category, expected = "multiturn", [str(x + y)]
        qid, aid = f"q{i:04d}", f"a{i:04d}"
        utt(qid, split, "player", player, "en", "us", {"emotion": "neutral", "speed": 1.0, "pitch_st": 0.0}, q)
        utt(aid, split, "npc", voice, lang, accent, controls, a)
        dialogues.append({
            "id": f"d{i:04d}", "split": split, "category": category, "persona": persona, "npc_voice": voice,
            "language": lang, "accent": accent, "controls": controls, "history": history, "question_text": q,
            "question_audio_id": qid, "answer_text": a, "answer_audio_id": aid, "expected": expected,
            "rejected_text": wrong,
        })
    for name, rows in (("manifest.jsonl", manifest), ("dialogues.jsonl", dialogues)):
        (out_dir / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (out_dir / "report.json").write_text(json.dumps({"dialogues": len(dialogues), "utterances": len(manifest),
                                                     "synthetic": True}) + "\n")
    return out_dir
