"""`npc-server train corpus --size tiny`: determinism, resume, manifest/dialogues contract, held-out disjointness."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import soundfile as sf

from npc_server.controls import EMOTIONS, LANGUAGES
from npc_server.training.corpus.cli import main as corpus_main
from npc_server.training.corpus.players import player_pool
from npc_server.training.corpus.text import CATEGORIES, normalize_question
from npc_server.voices import VOICE_BANK

MANIFEST_KEYS = {"id", "split", "role", "language", "accent", "speaker", "controls", "text", "phonemes", "audio", "sr", "duration"}
DIALOGUE_KEYS = {"id", "split", "category", "persona", "npc_voice", "language", "accent", "controls", "history",
                 "question_text", "question_audio_id", "answer_text", "answer_audio_id", "expected", "rejected_text"}


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    base = tmp_path_factory.mktemp("corpus")
    a, b = base / "a", base / "b"
    assert corpus_main(["--size", "tiny", "--out", str(a), "--workers", "1", "--no-progress", "--seed", "7"]) == 0
    assert corpus_main(["--size", "tiny", "--out", str(b), "--workers", "2", "--no-progress", "--seed", "7"]) == 0
    return a, b


def test_deterministic_for_a_seed(corpora):
    a, b = corpora
    assert (a / "dialogues.jsonl").read_text() == (b / "dialogues.jsonl").read_text()
    assert (a / "manifest.jsonl").read_text() == (b / "manifest.jsonl").read_text()
    pool = {v.id: v for v in player_pool()}
    espeak = [e for e in read_jsonl(a / "manifest.jsonl")
              if (e["role"] == "npc" and VOICE_BANK[e["speaker"]].engine == "espeak")
              or (e["role"] == "player" and pool[e["speaker"]].engine == "espeak")]
    assert espeak
    for e in espeak:  # espeak-ng and the seeded effects are bit-exact (piper's generator noise is not seedable)
        assert (a / e["audio"]).read_bytes() == (b / e["audio"]).read_bytes(), e["id"]


def test_manifest_follows_contract(corpora):
    root = corpora[0]
    manifest = read_jsonl(root / "manifest.jsonl")
    assert len(manifest) == 2 * len(read_jsonl(root / "dialogues.jsonl"))
    assert len({e["id"] for e in manifest}) == len(manifest)
    for e in manifest:
        assert set(e) == MANIFEST_KEYS
        assert e["split"] in ("train", "valid", "heldout") and e["role"] in ("player", "npc")
        assert e["language"] in LANGUAGES and e["accent"]
        assert set(e["controls"]) == {"emotion", "speed", "pitch_st"} and e["controls"]["emotion"] in EMOTIONS
        assert e["text"].strip() and e["phonemes"].strip()
        assert "  " not in e["phonemes"] and "\n" not in e["phonemes"]
        if e["role"] == "npc":
            assert e["speaker"] in VOICE_BANK
        info = sf.info(str(root / e["audio"]))
        assert (info.samplerate, info.channels, info.subtype) == (22050, 1, "PCM_16") and e["sr"] == 22050
        assert info.frames / 22050 == pytest.approx(e["duration"], abs=1e-3)
        assert 0.3 < e["duration"] < 30
        wav, _ = sf.read(str(root / e["audio"]))
        assert np.sqrt(np.mean(wav ** 2)) > 0.005  # not silent


def test_dialogues_follow_contract(corpora):
    root = corpora[0]
    ids = {e["id"]: e for e in read_jsonl(root / "manifest.jsonl")}
    for d in read_jsonl(root / "dialogues.jsonl"):
        assert set(d) == DIALOGUE_KEYS
        assert d["category"] in CATEGORIES
        q, a = ids[d["question_audio_id"]], ids[d["answer_audio_id"]]
        assert (q["role"], a["role"]) == ("player", "npc")
        assert q["text"] == d["question_text"] and a["text"] == d["answer_text"]
        assert a["speaker"] == d["npc_voice"] and a["controls"] == d["controls"] and a["language"] == d["language"]
        assert q["split"] == a["split"] == d["split"]


def test_heldout_voices_and_texts_disjoint(corpora):
    manifest = read_jsonl(corpora[0] / "manifest.jsonl")
    players = [e for e in manifest if e["role"] == "player"]
    held = [e for e in players if e["split"] == "heldout"]
    train = [e for e in players if e["split"] == "train"]
    assert held and train
    assert not ({e["speaker"] for e in held} & {e["speaker"] for e in train})
    assert not ({normalize_question(e["text"]) for e in held} & {normalize_question(e["text"]) for e in train})
    pool = {v.id: v for v in player_pool()}
    assert all(pool[e["speaker"]].heldout for e in held) and not any(pool[e["speaker"]].heldout for e in train)


def test_report_written_last_with_counts(corpora):
    root = corpora[0]
    report = json.loads((root / "report.json").read_text())
    assert report["utterances"] == len(read_jsonl(root / "manifest.jsonl"))
    assert sum(report["dialogues_by_category"].values()) == report["dialogues"]
    assert report["total_hours"] > 0 and report["generation"]["audio_seconds_per_wall_second"] > 0


def test_resume_after_kill_gives_same_corpus(corpora, tmp_path):
    a = corpora[0]
    c = tmp_path / "c"
    shutil.copytree(a, c)
    lines = (c / "manifest.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    torn = "".join(lines[:-5]) + lines[-5][:20]  # killed mid-line, 5 utterances short
    (c / "manifest.jsonl").write_text(torn, encoding="utf-8")
    (c / "report.json").unlink()
    for line in lines[-4:]:
        (c / json.loads(line)["audio"]).unlink()
    assert corpus_main(["--size", "tiny", "--out", str(c), "--workers", "1", "--no-progress", "--seed", "7"]) == 2  # refuses
    assert corpus_main(["--size", "tiny", "--out", str(c), "--workers", "1", "--no-progress", "--seed", "7", "--resume"]) == 0
    assert (c / "manifest.jsonl").read_text() == (a / "manifest.jsonl").read_text()
    assert json.loads((c / "report.json").read_text())["generation"]["utterances_this_run"] == 5
    # a different seed cannot resume this corpus
    assert corpus_main(["--size", "tiny", "--out", str(c), "--no-progress", "--seed", "8", "--resume"]) == 2
