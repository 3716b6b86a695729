"""AudioTokenizer API: rates, 2:3 interleave, streaming == offline, input handling, save/load, phone units."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

from npc_server.audio.io import AudioError
from npc_server.paths import DEFAULT_MODEL_DIR
from npc_server.tokenizer import (
    AUDIO_VOCAB_SIZE,
    SEMANTIC_OFFSET,
    AudioTokenizer,
    interleave,
    preset,
    split_interleaved,
)
from npc_server.tokenizer.phones import PhoneInventory, split_phones

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")

TEXT = "Welcome traveller, a warm room and a hot meal cost five silver coins tonight."


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> tuple[np.ndarray, int]:
    path = tmp_path_factory.mktemp("audio") / "speech.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(path), TEXT], check=True)
    wav, sr = sf.read(str(path), dtype="float32")
    return wav, sr


@pytest.fixture(scope="module")
def tok() -> AudioTokenizer:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    return AudioTokenizer(preset("tiny", list("abcdefghij"))).eval()


def test_rates_and_interleave(tok, speech):
    wav, sr = speech
    dur = len(wav) / sr
    t = tok.encode(wav, sr)
    g = int(np.ceil(dur / 0.12 - 1e-9))
    assert t.linguistic.shape == (2 * g,) and t.semantic.shape == (3 * g,)
    assert abs(t.linguistic.numel() / dur - 16.67) < 0.6 and abs(t.semantic.numel() / dur - 25) < 0.9
    assert t.linguistic.dtype == torch.long and 0 <= t.linguistic.min() and t.linguistic.max() < 1024
    assert 0 <= t.semantic.min() and t.semantic.max() < 4096
    ids = t.interleaved
    assert ids.numel() == 5 * g and ids.max() < AUDIO_VOCAB_SIZE
    groups = ids.view(g, 5)
    assert torch.equal(groups[:, :2].reshape(-1), t.linguistic)
    assert torch.equal(groups[:, 2:].reshape(-1) - SEMANTIC_OFFSET, t.semantic)
    ling, sem = split_interleaved(ids)
    assert torch.equal(ling, t.linguistic) and torch.equal(sem, t.semantic)
    assert torch.equal(interleave(ling, sem), ids)


def test_interleave_rejects_bad_layouts():
    with pytest.raises(ValueError):
        interleave([1, 2], [3, 4])  # 2 linguistic need 3 semantic
    with pytest.raises(ValueError):
        split_interleaved([1, 2, 1030, 1031])  # not a whole group
    with pytest.raises(ValueError):
        split_interleaved([1, 1500, 1030, 1031, 1032])  # semantic id where a linguistic one belongs
    with pytest.raises(ValueError):
        interleave([1, 1024], [0, 0, 0])


@pytest.mark.parametrize("sr_in", [16000, 22050, 44100])
def test_streaming_equals_offline(tok, speech, sr_in):
    wav, sr = speech
    if sr_in != sr:
        wav = soxr.resample(wav, sr, sr_in)
    offline = tok.encode(wav, sr_in)
    rng = np.random.default_rng(sr_in)
    stream = tok.stream(sr_in)
    parts, i = [], 0
    while i < len(wav):
        n = int(rng.integers(1, 7001))  # odd-sized chunks, some much smaller than a token
        parts.append(stream.push(wav[i : i + n]))
        i += n
    parts.append(stream.flush())
    assert any(p.linguistic.numel() for p in parts[:-1]), "the stream should emit tokens before flush"
    ling = torch.cat([p.linguistic for p in parts])
    sem = torch.cat([p.semantic for p in parts])
    ids = torch.cat([p.interleaved for p in parts])
    assert torch.equal(ling, offline.linguistic)
    assert torch.equal(sem, offline.semantic)
    assert torch.equal(ids, offline.interleaved)


def test_resampling_stereo_and_int16(tok, speech):
    wav, sr = speech
    mono = tok.encode(wav, sr)
    stereo = tok.encode(np.stack([wav, wav], axis=1), sr)
    assert torch.equal(stereo.linguistic, mono.linguistic) and torch.equal(stereo.semantic, mono.semantic)
    pcm = (wav * 32767).astype(np.int16)
    assert tok.encode(pcm, sr).linguistic.shape == mono.linguistic.shape
    w8 = soxr.resample(wav, sr, 8000)
    t8 = tok.encode(w8, 8000)
    assert abs(t8.linguistic.numel() - mono.linguistic.numel()) <= 2


def test_bad_audio_is_rejected(tok):
    with pytest.raises(AudioError, match="empty"):
        tok.encode(np.zeros(0, np.float32), 16000)
    bad = np.zeros(16000, np.float32)
    bad[100] = np.nan
    with pytest.raises(AudioError, match="NaN"):
        tok.encode(bad, 16000)
    with pytest.raises(AudioError, match="long"):
        tok.encode(np.zeros(int(16000 * (tok.cfg.max_seconds + 1)), np.float32), 16000)
    with pytest.raises(AudioError, match="sample rate"):
        tok.encode(np.zeros(1000, np.float32), 100)
    with pytest.raises(AudioError):
        tok.encode(np.zeros((10, 10, 10), np.float32), 16000)
    s = tok.stream(16000)
    with pytest.raises(AudioError, match="NaN"):
        s.push(bad)
    s = tok.stream(16000)
    with pytest.raises(AudioError, match="long"):
        for _ in range(int(tok.cfg.max_seconds) + 2):
            s.push(np.zeros(16000, np.float32))


def test_save_load_round_trip(tok, speech, tmp_path):
    wav, sr = speech
    tok.save_pretrained(tmp_path / "fp32", dtype=torch.float32)
    same = AudioTokenizer.from_pretrained(tmp_path / "fp32")
    a, b = tok.encode(wav, sr), same.encode(wav, sr)
    assert torch.equal(a.interleaved, b.interleaved)
    assert same.cfg == tok.cfg and same.inventory.phones == tok.inventory.phones
    tok.save_pretrained(tmp_path / "fp16")  # shipping format: fp16 weights, fp32 codebooks
    half = AudioTokenizer.from_pretrained(tmp_path / "fp16")
    c = half.encode(wav, sr)
    assert c.interleaved.shape == a.interleaved.shape
    assert (c.linguistic == a.linguistic).float().mean() > 0.8
    with pytest.raises(FileNotFoundError):
        AudioTokenizer.from_pretrained(tmp_path / "nothing")


def test_phone_units():
    assert split_phones("tʃˈɜːtʃ dʒˈʌdʒ") == ["t", "ʃ", "ɜː", "t", "ʃ", "d", "ʒ", "ʌ", "d", "ʒ"]
    assert split_phones("t͡ʃa") == ["t͡ʃ", "a"]
    assert split_phones("ˈɪn") == split_phones("ɪn")  # stress marks dropped
    assert split_phones("pˈa2n") == ["p", "a", "2", "n"]  # tone digits are units
    inv = PhoneInventory.build(["həlˈoʊ", "hˈoʊl"], min_count=1)
    ids = inv.encode("hˈoʊl")
    assert inv.decode(ids) == ["h", "o", "ʊ", "l"] and 0 not in ids


@pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "tokenizer" / "model.safetensors").exists(), reason="no shipped tokenizer")
def test_shipped_tokenizer_reads_phones(speech):
    """The trained default model: its linguistic codes read back as the right phones on unseen espeak audio."""
    from npc_server.tokenizer.phones import edit_distance

    model = AudioTokenizer.from_pretrained(DEFAULT_MODEL_DIR / "tokenizer")
    wav, sr = speech
    out = subprocess.run(["espeak-ng", "-q", "-x", "--ipa", "-v", "en-us", TEXT], capture_output=True, text=True, check=True)
    ref = [p for p in split_phones(out.stdout) if p in model.inventory.index]
    hyp = model.phones_from_tokens(model.encode(wav, sr).linguistic)
    per = edit_distance(hyp, ref) / len(ref)
    assert per < 0.5, (per, "".join(hyp), "".join(ref))


def test_batched_forward_matches_stream(tok, speech):
    """The parallel (training) pass computes the same codes as the block-by-block stream, up to float rounding."""
    wav, sr = speech
    w16 = soxr.resample(wav, sr, 16000, quality="HQ").astype(np.float32)
    stream = tok.encode(w16, 16000)
    bs = tok.cfg.block_samples
    padded = np.zeros(-(-len(w16) // bs) * bs, np.float32)
    padded[: len(w16)] = w16
    with torch.no_grad():
        out = tok(torch.from_numpy(padded)[None], torch.tensor([len(w16)]))
    ling = out["ling"]["codes"][0][out["mask_l"][0]]
    sem = out["sem"]["codes"][0][out["mask_s"][0]]
    assert ling.shape == stream.linguistic.shape and sem.shape == stream.semantic.shape
    assert (ling == stream.linguistic).float().mean() > 0.95
    assert (sem == stream.semantic).float().mean() > 0.95
