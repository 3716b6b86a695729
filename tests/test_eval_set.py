"""The NPC eval set shipped in data/eval/npc (so `eval npc` runs on a fresh clone) and the command that packs it."""

from __future__ import annotations

import json

import soundfile as sf

from npc_server.eval.eval_set import SHIPPED_SET, make_set
from npc_server.training.corpus.manifest import read_manifest
from npc_server.training.lm_data import load_dialogues


def test_the_shipped_set_is_a_readable_held_out_corpus():
    manifest = {r["id"]: r for r in read_manifest(SHIPPED_SET)}
    dialogues = load_dialogues(SHIPPED_SET)
    assert len(dialogues) >= 200 and {d["split"] for d in dialogues} == {"heldout"}
    assert all(d["question_audio_id"] in manifest for d in dialogues)
    with_facts = [d for d in dialogues if d["expected"]]
    assert len(with_facts) > len(dialogues) // 2
    assert {d["language"] for d in dialogues} >= {"en", "ja"}
    total = sum(f.stat().st_size for f in (SHIPPED_SET / "audio").iterdir())
    assert total < 20e6  # small enough to ship
    m = manifest[dialogues[0]["question_audio_id"]]
    info = sf.info(str(SHIPPED_SET / m["audio"]))
    assert info.samplerate == m["sr"] == 16000 and abs(info.duration - m["duration"]) < 0.01


def test_make_set_packs_a_sample_of_a_split(tmp_path):
    info = make_set(SHIPPED_SET, tmp_path / "small", "heldout", limit=3, seed=1)
    assert info["dialogues"] == 3
    rows = load_dialogues(tmp_path / "small")
    manifest = read_manifest(tmp_path / "small")
    assert [d["question_audio_id"] for d in rows] == [m["id"] for m in manifest]
    assert all((tmp_path / "small" / m["audio"]).is_file() for m in manifest)
    assert json.loads((tmp_path / "small" / "README.json").read_text())["split"] == "heldout"
