"""`npc-server eval make-set`: pack a corpus's held-out dialogues into a small eval set that ships with the repo.

The set is a corpus folder of its own (manifest.jsonl + dialogues.jsonl + audio/), so every reader of a corpus
reads it: the dialogues of one split (default: held-out: question texts never trained on, player voices never
heard), their question audio as 16 kHz FLAC, and the manifest rows of those questions. `npc-server eval npc`
uses the shipped set (data/eval/npc) when no corpus is given and none is generated, so it runs on a fresh clone.

  npc-server eval make-set --corpus ~/.cache/npc-voice/corpus/v2 --limit 240 --out data/eval/npc
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np

from npc_server.paths import REPO_ROOT

SHIPPED_SET = REPO_ROOT / "data" / "eval" / "npc"
SAMPLE_RATE = 16000


def make_set(corpus: Path, out: Path, split: str = "heldout", limit: int | None = None, seed: int = 0) -> dict:
    import soundfile as sf

    from npc_server.audio.io import load_audio
    from npc_server.training.corpus.manifest import read_manifest
    from npc_server.training.lm_data import load_dialogues

    manifest = {r["id"]: r for r in read_manifest(corpus)}
    rows = [d for d in load_dialogues(corpus, split) if d["question_audio_id"] in manifest]
    random.Random(seed).shuffle(rows)
    rows = sorted(rows[:limit], key=lambda d: d["id"])
    (out / "audio").mkdir(parents=True, exist_ok=True)
    kept, seconds = [], 0.0
    for d in rows:
        m = dict(manifest[d["question_audio_id"]])
        audio, _ = load_audio(corpus / m["audio"], target_sr=SAMPLE_RATE)
        rel = f"audio/{m['id']}.flac"
        sf.write(str(out / rel), np.clip(audio, -1, 1), SAMPLE_RATE, subtype="PCM_16")
        m.update(audio=rel, sr=SAMPLE_RATE, duration=round(len(audio) / SAMPLE_RATE, 4))
        seconds += m["duration"]
        kept.append(m)
    (out / "manifest.jsonl").write_text("".join(json.dumps(m, ensure_ascii=False) + "\n" for m in kept), encoding="utf-8")
    (out / "dialogues.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in rows),
                                         encoding="utf-8")
    info = {"source": str(corpus), "split": split, "dialogues": len(rows), "audio_seconds": round(seconds, 1),
            "command": f"npc-server eval make-set --corpus <corpus> --split {split} --limit {limit} --seed {seed}"}
    (out / "README.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv: list[str] | None = None) -> int:
    from npc_server.paths import data_dir, require_corpus

    p = argparse.ArgumentParser(prog="npc-server eval make-set", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, default=data_dir() / "corpus" / "default")
    p.add_argument("--split", default="heldout")
    p.add_argument("--limit", type=int, default=240, help="dialogues to keep (a seeded sample)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=SHIPPED_SET)
    args = p.parse_args(argv)
    corpus = require_corpus(args.corpus, "eval make-set", needs=("manifest.jsonl", "dialogues.jsonl"))
    info = make_set(corpus, args.out, args.split, args.limit, args.seed)
    print(f"eval set: {info['dialogues']} {args.split} dialogues, {info['audio_seconds'] / 60:.1f} min of question "
          f"audio -> {args.out}")
    return 0
