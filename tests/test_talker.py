"""The talker (issue "Speak clearly"): front end, alignment search, streaming == offline, training, the CLI."""

from __future__ import annotations

import json
import math
import random
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from npc_server.audio.io import load_audio, save_wav
from npc_server.talker import Sampling, Talker, TalkerStream, phonemize, synthesize
from npc_server.talker.align import frame_positions, monotonic_alignment
from npc_server.talker.frontend import BOS, EOS, PAUSE, Phones
from npc_server.talker.generator import Span
from npc_server.talker.lipsync import LipSync, VisemeEvent, viseme
from npc_server.training import tts

SENTENCES = ["A room costs five silver coins a night.", "Head north, past the old bridge.",
             "The captain is waiting for you at the gate."]


def tiny_talker(phones=("a", "b", "ɹ", "uː", "m"), voices=("joe", "gb_female")) -> Talker:
    torch.manual_seed(0)
    return Talker(replace(tts.PRESETS["tiny"], phones=tuple(phones), voices=tuple(voices), n_codes=64,
                          dropout=0.0)).eval()


# ------------------------------------------------------------------------------------------------ front end
def test_phonemize_marks_words_and_clause_pauses():
    seq = phonemize("Head north, past the old bridge.")
    assert seq.units[0] == BOS and seq.units[-1] == EOS
    assert seq.units.count(PAUSE) == 1  # the comma; the final full stop is the end, not a pause
    assert len(seq.units) == len(seq.word_starts)
    assert sum(seq.word_starts) == 6  # six words
    assert "ˈ" not in "".join(seq.units)  # stress marks are not phones


def test_phonemize_reads_digits_and_drops_symbols():
    digits = phonemize("It costs 12 coins.")
    words = phonemize("It costs twelve coins.")
    assert digits.units == words.units
    assert phonemize("It costs <12> coins #now").units == phonemize("It costs 12 coins now").units
    assert phonemize("   ").units == [BOS, EOS]


def test_phonemize_rejects_an_unknown_language():
    with pytest.raises(ValueError, match="klingon"):
        phonemize("hello", "klingon")


# ------------------------------------------------------------------------------------------------ alignment
def test_monotonic_alignment_finds_the_planted_durations():
    rng = np.random.default_rng(0)
    truth = np.array([3, 1, 4, 2, 5])
    phone = np.repeat(np.arange(5), truth)
    scores = rng.normal(-5, 0.3, size=(5, truth.sum()))
    scores[phone, np.arange(truth.sum())] = 0.0  # each frame fits its own phone best
    d = monotonic_alignment(scores)
    assert d.tolist() == truth.tolist()
    ph, in_phone, left = frame_positions(d)
    assert ph.tolist() == phone.tolist()
    assert in_phone[:4].tolist() == [0, 1, 2, 0] and left[:4].tolist() == [2, 1, 0, 0]


def test_monotonic_alignment_needs_a_frame_per_phone():
    assert monotonic_alignment(np.zeros((3, 3))).tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="cannot align"):
        monotonic_alignment(np.zeros((4, 3)))


# ------------------------------------------------------------------------------------------------ generation
def test_streamed_phones_give_the_offline_tokens():
    talker = tiny_talker()
    units = ["a", "b", "ɹ", PAUSE, "uː", "m", "a", "b"]
    phones = Phones(units, [True, False, False, False, True, False, True, False])
    sampling = Sampling(temperature=0.8, top_k=10, seed=3)
    offline = TalkerStream(talker, "joe", sampling=sampling)
    whole = np.concatenate([offline.push(phones), offline.finish()])
    stream = TalkerStream(talker, "joe", sampling=sampling)
    parts = [stream.push(Phones([u], [w])) for u, w in zip(phones.units, phones.word_starts)] + [stream.finish()]
    assert np.array_equal(np.concatenate(parts), whole)
    assert stream.spans == offline.spans
    assert sum(s.frames for s in stream.spans) == whole.size
    # the first tokens come before the answer is finished: `lookahead` phones after the first phone
    assert sum(p.size for p in parts[: talker.cfg.lookahead + 1]) > 0
    assert whole.min() >= 0 and whole.max() < talker.cfg.n_codes


@pytest.mark.parametrize("text", ["Head north, past the old bridge.",
                                  "It costs 120 gold, friend. Come back tomorrow!  The inn is open.",
                                  "A room for the night costs five gold."])
def test_text_pushed_word_by_word_gives_the_phones_of_the_whole_text(text):
    seq = phonemize(text)
    talker = tiny_talker(phones=tuple(u for u in seq.units if u not in (BOS, EOS, PAUSE)))
    stream = TalkerStream(talker, "joe")
    for i in range(0, len(text), 3):  # pieces that cut words, as subtitle deltas do
        stream.push_text(text[i : i + 3])
    stream.finish()
    assert stream.phones.units == seq.units and stream.phones.word_starts == seq.word_starts
    tokens, spans = synthesize(talker, text, "joe")
    assert [s.unit for s in spans] == seq.units and tokens.size == sum(s.frames for s in spans)
    # each word of the text is on the first phone espeak read for it ("120" is two IPA words, one text word; espeak
    # reads "for the" as one word: one word event)
    assert " ".join(s.word for s in spans if s.word) == " ".join(text.split())
    assert "120" in [s.word for s in spans] or "120" not in text
    assert "for the" in [s.word for s in spans] or "for the" not in text
    assert [s.word for s in stream.spans] == [s.word for s in spans]


# ------------------------------------------------------------------------------------------------ lip sync
def test_every_phone_of_the_shipped_talker_has_a_mouth_shape():
    from npc_server.paths import DEFAULT_MODEL_DIR

    config = DEFAULT_MODEL_DIR / "talker" / "config.json"
    if not config.is_file():
        pytest.skip("no shipped talker")
    phones = json.loads(config.read_text())["phones"]
    missing = [p for p in phones if viseme(p) is None and not p.isdigit()]  # tone numbers keep the shape before
    assert not missing
    assert viseme("t͡ʃ") == "CH" and viseme(PAUSE) == viseme(EOS) == "sil" and viseme("ʊ") == "U"


def test_lip_sync_events_follow_the_spans():
    spans = [Span(BOS, False, 0, 2), Span("m", True, 2, 2, "my"), Span("a", False, 4, 1), Span("ɪ", False, 5, 1),
             Span("b", True, 6, 1, "bread,"), Span("ɹ", False, 7, 2), Span(PAUSE, False, 9, 3),
             Span("b", True, 12, 2, "bye"), Span("a", False, 14, 0), Span("5", False, 14, 1), Span(EOS, False, 15, 2)]
    lips = LipSync(25.0)
    first = lips.update(spans[:6])
    assert [w.text for w in first.words] == ["my"]  # "bread," ends with the pause, not yet spoken
    rest = lips.update(spans)
    rest.extend(lips.finish(17))
    visemes, words = first.visemes + rest.visemes, first.words + rest.words
    assert [(w.text, w.start_ms, w.end_ms) for w in words] == [("my", 80, 240), ("bread,", 240, 360),
                                                             ("bye", 480, 600)]
    # adjacent phones with one shape are one event ("ɪ" after "a" differ; "b" after "ɪ" differ); a tone number keeps
    # the shape before it; the events tile the time line
    assert [v.viseme for v in visemes] == ["sil", "PP", "aa", "I", "PP", "RR", "sil", "PP", "sil"]
    assert visemes[-2] == VisemeEvent("PP", 480, 120)
    assert all(abs(a.start_ms + a.duration_ms - b.start_ms) < 1e-9 for a, b in zip(visemes, visemes[1:]))
    assert visemes[-1].start_ms + visemes[-1].duration_ms == 17 * 40


def test_streamed_lip_sync_equals_the_offline_events():
    text = "A room is 120 gold a night, traveler."
    seq = phonemize(text)
    talker = tiny_talker(phones=tuple(u for u in seq.units if u not in (BOS, EOS, PAUSE)))
    tokens, spans = synthesize(talker, text, "joe")
    offline = LipSync()
    whole = offline.update(spans)
    whole.extend(offline.finish(tokens.size))
    stream, lips, parts = TalkerStream(talker, "joe"), LipSync(), []
    for i in range(0, len(text), 4):
        stream.push_text(text[i : i + 4])
        parts.append(lips.update(stream.spans))
    stream.finish()
    parts += [lips.update(stream.spans), lips.finish(stream.frames)]
    assert [w for p in parts for w in p.words] == whole.words
    assert [w.text for w in whole.words] == text.split()
    # visemes may be cut where a push ended, never moved: merged they give the offline events
    merged = LipSync.merge([v for p in parts for v in p.visemes])
    assert merged == whole.visemes and whole.visemes[-1].start_ms + whole.visemes[-1].duration_ms == tokens.size * 40


def test_unknown_voice_and_phones():
    talker = tiny_talker()
    with pytest.raises(ValueError, match="no voice 'nobody'"):
        TalkerStream(talker, "nobody")
    stream = TalkerStream(talker, "joe")
    stream.push(Phones(["a", "ʘ", "b"], [True, False, False]))  # a click the talker never heard: skipped
    assert stream.phones.units == [BOS, "a", "b"]


def test_save_and_load_round_trip(tmp_path):
    talker = tiny_talker()
    talker.save_pretrained(tmp_path / "t", dtype=torch.float32)
    again = Talker.from_pretrained(tmp_path / "t")
    assert again.cfg == talker.cfg
    a, _ = synthesize(talker, "a", "joe", sampling=Sampling(temperature=0))
    b, _ = synthesize(again, "a", "joe", sampling=Sampling(temperature=0))
    assert np.array_equal(a, b)
    with pytest.raises(FileNotFoundError, match="train tts"):
        Talker.from_pretrained(tmp_path / "missing")


# ------------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Three NPC utterances by espeak-ng in the corpus contract layout."""
    root = tmp_path_factory.mktemp("talker_corpus")
    (root / "audio").mkdir()
    rows = []
    for i, text in enumerate(SENTENCES):
        path = root / "audio" / f"u{i}.wav"
        subprocess.run(["espeak-ng", "-v", "en-gb+f3", "-w", str(path), text], check=True, capture_output=True)
        wav, sr = load_audio(path, target_sr=22050)
        save_wav(path, wav, sr)
        rows.append({"id": f"u{i}", "split": "train" if i < 2 else "valid", "role": "npc", "language": "en",
                     "accent": "gb", "speaker": "gb_female",
                     "controls": {"emotion": "neutral", "speed": 1.0, "pitch_st": 0.0}, "text": text,
                     "phonemes": "", "audio": f"audio/u{i}.wav", "sr": 22050, "duration": len(wav) / sr})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def tiny_talker_and_train_utterances(corpus: Path) -> tuple[Talker, list]:
    """A fresh tiny talker and the corpus's train utterances (real semantic tokens of the shipped tokenizer)."""
    from npc_server.paths import DEFAULT_MODEL_DIR
    from npc_server.training.lm_data import TokenCache

    rows = tts.npc_rows(corpus, ("train",))
    tts.cache_tokens(corpus, corpus / "tokens", rows, DEFAULT_MODEL_DIR / "tokenizer", progress=False)
    phones = tts.cache_phones(corpus, rows, progress=False)
    talker = Talker(replace(tts.PRESETS["tiny"], phones=tts.phone_inventory(list(phones.values()), min_count=1),
                            voices=("gb_female",), dropout=0.0))
    return talker, tts.make_utterances(talker, rows, phones, TokenCache(corpus / "tokens"))


def test_training_steps_lower_the_loss_on_real_tokens(corpus):
    talker, utts = tiny_talker_and_train_utterances(corpus)
    assert (corpus / tts.PHONES_FILE).is_file()
    assert len(utts) == 2 and all(len(u.tokens) >= len(u.phone_ids) for u in utts)
    opt = torch.optim.AdamW(talker.parameters(), lr=3e-3)
    talker.train()
    first = None
    for _ in range(25):
        out = tts.talker_loss(talker, utts, random.Random(0))
        first = first if first is not None else float(out["loss"].detach())
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert float(out["loss"].detach()) < 0.8 * first
    assert float(out["decoder"]) > 0 and float(out["duration"]) >= 0


def test_checkpoints_keep_only_weights_that_validate_better(corpus, tmp_path):
    talker, utts = tiny_talker_and_train_utterances(corpus)
    start = tts.validation(talker, utts, 1200)
    keep = tts.BestCheckpoint(talker, utts, tmp_path / "t", 1200, start)
    saved = (tmp_path / "t" / "model.safetensors").read_bytes()  # the starting weights stand first
    with torch.no_grad():
        for prm in talker.parameters():
            prm.add_(torch.randn_like(prm))  # much worse weights: validated, not saved
    keep()
    assert keep.curve[-1]["kept"] is False and keep.best_valid == start
    assert (tmp_path / "t" / "model.safetensors").read_bytes() == saved
    keep.best = math.inf  # anything beats this: saved
    keep()
    assert keep.curve[-1]["kept"] is True and (tmp_path / "t" / "model.safetensors").read_bytes() != saved


def test_a_stopped_run_still_checkpoints_and_returns(corpus):
    """Ctrl-C / `kill` during `train tts` ends the run early; the final checkpoint (validate, keep the best) and the
    run's record still happen."""
    import os
    import signal

    from npc_server.training.lm_v2 import stop_on_signals

    talker, utts = tiny_talker_and_train_utterances(corpus)
    calls = []

    def save():
        calls.append(len(calls))
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives during the run, as `kill <pid>` would

    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals():
        result = tts.train(talker, utts, minutes=10, batch_frames=1200, lr=1e-3, precision="fp32",
                           save=save, save_every_minutes=0.0, progress=False)
    assert signal.getsignal(signal.SIGTERM) is before
    assert result.steps == 1 and len(calls) == 2  # stopped after the first step's checkpoint, then the final one


def test_cli_trains_saves_logs_and_continues(corpus, tmp_path):
    from npc_server.cli import main

    out = tmp_path / "talker"
    argv = ["train", "tts", "--corpus", str(corpus), "--init", "none", "--preset", "tiny", "--max-steps", "2",
            "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    assert (out / "model.safetensors").is_file()
    runs = json.loads((out / "training.json").read_text())["runs"]
    assert runs[0]["stage"] == "tts" and runs[0]["steps"] == 2 and "decoder" in runs[0]["valid_after"]
    assert runs[0]["valid_curve"] and {"minute", "decoder", "kept"} <= set(runs[0]["valid_curve"][-1])
    out2 = tmp_path / "talker2"
    assert main(["train", "tts", "--corpus", str(corpus), "--init", str(out), "--max-steps", "1", "--out", str(out2),
                 "--no-progress"]) == 0
    assert len(json.loads((out2 / "training.json").read_text())["runs"]) == 2


def test_cli_requires_a_corpus(tmp_path, capsys):
    from npc_server.cli import main

    with pytest.raises(SystemExit, match="no corpus"):
        main(["train", "tts", "--corpus", str(tmp_path), "--init", "none"])


def test_frame_decoder_equals_the_module_forward():
    from npc_server.talker.generator import FrameDecoder

    talker = tiny_talker()
    x = torch.randn(1, 9, talker.cfg.dim)
    with torch.no_grad():
        full = talker.decode_frames(x)[0]
    step = FrameDecoder(talker, capacity=4)  # grows twice on the way
    rows = torch.stack([step.step(x[0, i]) for i in range(9)])
    assert torch.allclose(rows, full, atol=1e-5), (rows - full).abs().max()


def test_requested_speed_scales_the_spoken_length():
    from npc_server.talker.model import DurationRounder

    talker = tiny_talker()
    with torch.no_grad():
        talker.duration[-1].bias.fill_(np.log(4.0))  # ~4 frames a phone, as a trained talker
    phones = Phones(["a", "b", "ɹ", "uː", "m"] * 4, [True, False, False, False, False] * 4)

    def frames(speed: float, emotion: str = "neutral") -> int:
        s = TalkerStream(talker, "joe", speed=speed, emotion=emotion)
        return np.concatenate([s.push(phones), s.finish()]).size

    base = frames(1.0)
    assert frames(0.5) / base == pytest.approx(2.0, rel=0.1)
    assert frames(1.25) / base == pytest.approx(1 / 1.25, rel=0.1)
    assert frames(1.0, "sad") > base  # sad speaks slower (rate 0.85), as the corpus renders it
    rounder = DurationRounder(max_frames=40)
    assert rounder([0.6] * 10) == [1] * 10  # every phone gets a frame
    rounder = DurationRounder(max_frames=40)
    assert sum(rounder([1.4] * 10)) == 14  # the total follows the continuous durations


def test_greedy_stream_follows_the_training_forward():
    """The stream's incremental decoding is the training forward: feeding its own tokens back teacher-forced, the
    frame decoder's argmax reproduces every token it chose."""
    from npc_server.talker.align import frame_positions

    talker = tiny_talker()
    phones = Phones(["a", "b", PAUSE, "uː", "m"], [True, False, False, True, False])
    stream = TalkerStream(talker, "gb_female", sampling=Sampling(temperature=0))
    tokens = np.concatenate([stream.push(phones), stream.finish()])
    ids = torch.tensor([talker.phone_ids(stream.phones)])
    starts = torch.tensor([stream.phones.word_starts])
    v, lang, emo = talker.condition_ids("gb_female", "en", "neutral")
    with torch.no_grad():
        cond = talker.condition(torch.tensor([v]), torch.tensor([lang]), torch.tensor([emo]), torch.tensor([1.0]))
        states = talker.encode_phones(ids, starts, cond)
        ph, ip, lf = (torch.from_numpy(a)[None] for a in frame_positions(np.array([s.frames for s in stream.spans])))
        prev = torch.tensor([[talker.cfg.n_codes, *tokens[:-1]]])
        logits = talker.decode_frames(talker.frame_inputs(states, ph, ip, lf, prev, cond))
    assert logits[0].argmax(-1).tolist() == tokens.tolist()
