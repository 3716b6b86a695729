"""NPC-Eval: judgement helpers on real espeak-ng speech, and an end-to-end text-judged run on tiny models."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch

from npc_server.audio.io import load_audio
from npc_server.eval import npc_eval
from npc_server.eval.npc_eval import (
    contains,
    heard,
    judge,
    persona_violation,
    summarise,
    voice_references,
)


def test_heard_normalises_numbers_and_punctuation():
    assert heard("ten gold", "A room costs 10 gold, traveller.")
    assert heard("seven", "That makes seven!")
    assert not heard("seven", "That makes seventeen.")
    assert not heard("ten gold", "gold ten")
    assert contains("おちゃ", "おちゃ、いかがですか。", "ja")
    assert not contains("綠茶", "茉莉花茶", "yue")


def test_persona_violation():
    names = {"innkeeper": "Greta", "guard": "Sergeant Angus"}
    assert persona_violation("Hello, I'm Sergeant Angus of the gate.", "innkeeper", names) == "guard"
    assert persona_violation("My name is Angus.", "innkeeper", names) == "guard"
    assert persona_violation("I'm Greta. Angus guards the gate.", "innkeeper", names) is None
    assert persona_violation("I am Greta.", "innkeeper", names) is None


def test_speed_and_pitch_measures_on_real_speech(tmp_path):
    text = "The smithy is down by the river, past the market square."
    wavs = {}
    for name, pitch in (("base", 50), ("high", 75)):
        path = tmp_path / f"{name}.wav"
        subprocess.run(["espeak-ng", "-p", str(pitch), "-w", str(path), text], check=True)
        wavs[name] = load_audio(path)
    dur = len(wavs["base"][0]) / wavs["base"][1]
    manifest = {"u": {"id": "u", "role": "npc", "split": "train", "speaker": "joe", "text": text, "duration": dur,
                      "audio": "base.wav", "controls": {"emotion": "neutral", "speed": 1.0, "pitch_st": 0.0}}}
    refs = voice_references(tmp_path, manifest)
    assert refs["joe"]["chars_per_s"] == pytest.approx(len(text) / dur)
    assert 60 < refs["joe"]["f0"] < 300
    row = {"id": "d", "category": "directions", "persona": "blacksmith", "language": "en", "npc_voice": "joe",
           "question_text": "Where is the smithy?", "answer_text": text, "expected": ["river"],
           "controls": {"emotion": "neutral", "speed": 1.0, "pitch_st": 0.0}}
    ans = {"subtitle": text, "stop_reason": "end", "gen_s": 0.1, "tokens": 10}
    same = judge(row, ans, wavs["base"][0], wavs["base"][1], text.lower(), refs, {})
    assert same["correct"] and same["wer"] == 0.0
    assert same["speed_measured"] == pytest.approx(1.0) and same["speed_ok"]
    assert abs(same["pitch_measured_st"]) < 0.5 and same["pitch_ok"]
    high = judge(row, ans, wavs["high"][0], wavs["high"][1], "the smithy is by the mill", refs, {})
    assert not high["correct"] and high["wer"] > 0.3
    assert high["pitch_measured_st"] > 2.0 and not high["pitch_ok"]  # espeak -p 75 is audibly higher
    s = summarise([same, high])
    assert s["directions"]["correct"] == 0.5 and s["ALL"]["n"] == 2


def test_eval_end_to_end_text_judge(tmp_path):
    """Tiny tokenizer + tiny backbone bundle on a corpus with real espeak-ng questions; compares two backbones."""
    from npc_server.tokenizer import AudioTokenizer
    from npc_server.tokenizer import preset as tokenizer_preset
    from npc_server.training import pretrain
    from npc_server.training.corpus.manifest import read_manifest
    from npc_server.training.lm_synthetic import synthetic_corpus

    corpus = synthetic_corpus(tmp_path / "corpus", n_dialogues=20, seed=0)
    for row in read_manifest(corpus):
        if row["split"] == "heldout":
            (corpus / row["audio"]).parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["espeak-ng", "-w", str(corpus / row["audio"]), row["text"]], check=True)
    torch.manual_seed(0)
    AudioTokenizer(tokenizer_preset("tiny")).save_pretrained(tmp_path / "tok")
    assert pretrain.main(["--corpus", str(corpus), "--synthetic-tokens", "--preset", "tiny", "--text-vocab", "512",
                          "--out", str(tmp_path / "pre"), "--steps", "2", "--batch-size", "2", "--threads", "1"]) == 0
    out = tmp_path / "eval.json"
    assert npc_eval.main(["--corpus", str(corpus), "--audio-tokenizer", str(tmp_path / "tok"), "--judge", "text",
                          "--backbone", f"a={tmp_path / 'pre' / 'model'}", "--backbone", f"b={tmp_path / 'pre' / 'model'}",
                          "--max-new-tokens", "40", "--threads", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["summary"]) == {"a", "b"}
    assert report["summary"]["a"]["ALL"]["n"] == 2  # dialogues 9 and 19 are held out
    # greedy decoding of the same weights: identical answers
    assert [r["subtitle"] for r in report["results"]["a"]] == [r["subtitle"] for r in report["results"]["b"]]
    assert out.with_suffix(".md").read_text().startswith("### a")
    for r in report["results"]["a"]:
        assert r["correct"] in (True, False) and isinstance(r["subtitle"], str)
    assert np.isfinite(report["summary"]["a"]["ALL"]["persona_ok"])

    # the typed-question diagnostic: same dialogues, the question as text instead of the recording
    typed = tmp_path / "eval_typed.json"
    assert npc_eval.main(["--corpus", str(corpus), "--audio-tokenizer", str(tmp_path / "tok"), "--judge", "text",
                          "--question", "text", "--backbone", str(tmp_path / "pre" / "model"),
                          "--max-new-tokens", "40", "--threads", "1", "--out", str(typed)]) == 0
    typed_report = json.loads(typed.read_text())
    assert typed_report["question"] == "text" and typed_report["summary"]["model"]["ALL"]["n"] == 2

    # the listening test: ASR-task transcripts of the held-out recordings, scored against what was said
    from npc_server.eval import listen_eval

    heard = tmp_path / "listen.json"
    assert listen_eval.main(["--corpus", str(corpus), "--audio-tokenizer", str(tmp_path / "tok"), "--role", "any",
                             "--backbone", str(tmp_path / "pre" / "model"), "--max-new-tokens", "20",
                             "--threads", "1", "--out", str(heard)]) == 0
    listened = json.loads(heard.read_text())["models"]["model"]
    assert listened["n"] >= 2 and listened["wer"] >= 0.0
    assert all(r["text"] and isinstance(r["transcript"], str) for r in listened["results"])


def test_eval_end_to_end_audio_judge(tmp_path):
    """The audio path: tiny vocoder speaks the answer, Whisper tiny.en transcribes it, speed/pitch are measured."""
    from npc_server.tokenizer import AudioTokenizer
    from npc_server.tokenizer import preset as tokenizer_preset
    from npc_server.training import pretrain
    from npc_server.training.corpus.manifest import read_manifest
    from npc_server.training.lm_synthetic import synthetic_corpus
    from npc_server.vocoder import (
        FlowConfig,
        FlowDecoder,
        Generator,
        GeneratorConfig,
        Vocoder,
    )

    corpus = synthetic_corpus(tmp_path / "corpus", n_dialogues=10, seed=0)
    for row in read_manifest(corpus):
        (corpus / row["audio"]).parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["espeak-ng", "-w", str(corpus / row["audio"]), row["text"]], check=True)
    torch.manual_seed(0)
    AudioTokenizer(tokenizer_preset("tiny")).save_pretrained(tmp_path / "tok")
    flow = FlowDecoder(FlowConfig(dim=32, token_dim=32, n_heads=2, transformer_layers=1, res_blocks=1, cond_layers=1,
                                  attn_window=8, n_steps=2))
    Vocoder(flow, Generator(GeneratorConfig(dim=32, intermediate_dim=64, n_layers=2))).save_pretrained(tmp_path / "voc")
    assert pretrain.main(["--corpus", str(corpus), "--synthetic-tokens", "--preset", "tiny", "--text-vocab", "512",
                          "--out", str(tmp_path / "pre"), "--steps", "1", "--batch-size", "2", "--threads", "1"]) == 0
    out = tmp_path / "eval.json"
    assert npc_eval.main(["--corpus", str(corpus), "--audio-tokenizer", str(tmp_path / "tok"), "--vocoder",
                          str(tmp_path / "voc"), "--backbone", str(tmp_path / "pre" / "model"), "--temperature", "1.0",
                          "--max-new-tokens", "60", "--threads", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    (results,) = report["results"].values()
    assert len(results) == 1 and report["judge"] == "audio"
    r = results[0]
    assert isinstance(r["transcript"], str)  # Whisper ran on the vocoded answer
    assert "wer" in r and r["wer"] >= 0.0
    assert r["speed_measured"] > 0 and isinstance(r["speed_ok"], bool)  # the voice reference came from the corpus
    assert next(iter(report["summary"].values()))["ALL"]["speed_ok"] is not None
