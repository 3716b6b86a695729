"""Tokenizer training: a tiny run on a small espeak-ng corpus lowers the loss, saves a loadable model, evaluates."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from npc_server.tokenizer import AudioTokenizer

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")

SENTENCES = [
    "welcome to the inn traveller",
    "a room costs five silver coins",
    "the blacksmith is past the old mill",
    "have you seen the dragon in the hills",
    "the market opens at dawn",
    "thank you and good night",
]
VOICES = {"train": ["en-us", "en-gb", "en-us+m3"], "valid": ["en-us+f2"], "heldout": ["en-gb-x-rp+f3", "en-us+m7"]}


def _speak(text: str, voice: str, path: Path, speed: int) -> str:
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(path), text], check=True)
    out = subprocess.run(["espeak-ng", "-q", "-x", "--ipa", "-v", voice, text], check=True, capture_output=True, text=True)
    return " ".join(out.stdout.split())


@pytest.fixture(scope="module")
def espeak_corpus(tmp_path_factory) -> Path:
    """A corpus in the manifest contract: every sentence said by several voices per split."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "audio").mkdir()
    rows = []
    for split, voices in VOICES.items():
        for vi, voice in enumerate(voices):
            for si, text in enumerate(SENTENCES):
                uid = f"{split}-{vi}-{si}"
                rel = f"audio/{uid}.wav"
                ipa = _speak(text, voice, root / rel, 150 + 15 * vi)
                rows.append({"id": uid, "split": split, "role": "player", "language": "en", "accent": "us", "speaker": voice,
                             "controls": {"emotion": "neutral", "speed": 1.0, "pitch_st": 0.0}, "text": text,
                             "phonemes": ipa, "audio": rel, "sr": 22050, "duration": 2.0})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_tiny_training_decreases_loss_and_saves(espeak_corpus, tmp_path):
    from npc_server.training.train_tokenizer import main

    out, run = tmp_path / "tok", tmp_path / "run"
    base = ["--corpus", str(espeak_corpus), "--out", str(out), "--run-dir", str(run), "--preset", "tiny",
            "--minutes", "5", "--batch-seconds", "12", "--lr", "3e-3", "--warmup", "5", "--threads", "1", "--workers", "1"]
    assert main(base + ["--max-steps", "40"]) == 0
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 40
    first = sum(r["ctc_l"] + r["mel"] for r in log[:5]) / 5
    last = sum(r["ctc_l"] + r["mel"] for r in log[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    tok = AudioTokenizer.from_pretrained(out)
    assert len(tok.inventory) > 10
    assert (out / "config.json").exists() and (run / "checkpoint.pt").exists()

    # resuming continues from the checkpoint (step count goes on)
    assert main(base + ["--max-steps", "45"]) == 0
    log = (run / "train_log.jsonl").read_text().splitlines()
    assert json.loads(log[-1])["step"] == 45

    # the evaluation runs on the heldout voices and writes its JSON
    from npc_server.eval.tokenizer_eval import main as eval_main

    report = tmp_path / "eval.json"
    assert eval_main(["--corpus", str(espeak_corpus), "--model", str(out), "--out", str(report), "--threads", "1"]) == 0
    res = json.loads(report.read_text())
    assert 0.0 <= res["per"] <= 2.0
    assert res["speaker_invariance"]["pairs"] > 0
    assert res["usage"]["linguistic"]["tokens"] > 0
    torch.set_num_threads(1)



def test_readout_retraining_keeps_codes(espeak_corpus, tmp_path):
    """`train readout` swaps in a GRU readout trained on frozen codes: the loss falls, the codes stay the same,
    padding does not change a row's logits, and the tokenizer still loads and evaluates."""
    from npc_server.training.lm_data import tokenize_corpus
    from npc_server.training.train_readout import main as readout_main
    from npc_server.training.train_tokenizer import main as tok_main

    base, run = tmp_path / "tok", tmp_path / "run"
    assert tok_main(["--corpus", str(espeak_corpus), "--out", str(base), "--run-dir", str(run), "--preset", "tiny",
                     "--minutes", "5", "--batch-seconds", "12", "--lr", "3e-3", "--warmup", "5", "--threads", "1",
                     "--workers", "1", "--max-steps", "10"]) == 0
    tok = AudioTokenizer.from_pretrained(base)
    tokens = tmp_path / "tokens"
    assert tokenize_corpus(espeak_corpus, tok, tokens) == 36

    out = tmp_path / "tok_gru"
    assert readout_main(["--corpus", str(espeak_corpus), "--tokens", str(tokens), "--tokenizer", str(base),
                         "--out", str(out), "--rnn-layers", "1", "--max-steps", "60", "--batch-tokens", "400",
                         "--lr", "3e-3", "--threads", "1"]) == 0
    record = json.loads((out / "training.json").read_text())["readout"]
    assert record["steps"] == 60 and record["loss_last"] < 0.8 * record["loss_first"], record
    new = AudioTokenizer.from_pretrained(out)
    assert new.linguistic.cfg.readout_rnn_layers == 1 and new.linguistic.readout.rnn is not None

    wav_path = espeak_corpus / "audio" / "heldout-0-1.wav"
    from npc_server.audio.io import load_audio

    wav, sr = load_audio(wav_path)
    a, b = tok.encode(wav, sr), new.encode(wav, sr)
    assert torch.equal(a.linguistic, b.linguistic) and torch.equal(a.semantic, b.semantic)

    # a padded batch gives each row the logits it gets alone (the GRU's backward pass skips the padding)
    codes = a.linguistic.long()[None]
    alone = new.linguistic.phone_logits(codes)
    padded = torch.cat([codes, torch.zeros(1, 7, dtype=torch.long)], 1)
    both = new.linguistic.phone_logits(torch.cat([padded, padded]), torch.tensor([codes.shape[1], codes.shape[1] + 7]))
    assert torch.allclose(both[0, : alone.shape[1]], alone[0], atol=1e-5)
    assert isinstance(new.phones_from_tokens(a.linguistic), list)


def test_code_jitter_moves_to_grid_neighbours():
    from npc_server.tokenizer.quantizers import FiniteScalarQuantizer, FSQConfig
    from npc_server.training.train_readout import jitter_codes

    fsq = FiniteScalarQuantizer(FSQConfig(levels=[4, 4, 4, 4, 4]))
    codes = torch.arange(1024)
    assert torch.equal(fsq.from_digits(fsq.digits(codes)), codes)
    assert torch.equal(jitter_codes(codes, 0.0, fsq), codes)
    g = torch.Generator().manual_seed(0)
    moved = jitter_codes(codes, 1.0, fsq, g)
    base = torch.tensor([1, 4, 16, 64, 256])
    d_old, d_new = (codes[:, None] // base) % 4, (moved[:, None] // base) % 4
    assert (d_old - d_new).abs().max() == 1  # one grid step at most, per digit
    assert (moved != codes).float().mean() > 0.9 and moved.min() >= 0 and moved.max() < 1024
