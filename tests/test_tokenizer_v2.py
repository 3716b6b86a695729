"""Tokenizer v2 (Whisper-encoder linguistic stream + kept v1 semantic stream) on a tiny random encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from npc_server.tokenizer.tokenizer import AudioTokenizer
from npc_server.tokenizer.tokenizer_v2 import WhisperTokenizer, load_tokenizer, preset_v2
from npc_server.training.train_tokenizer_v2 import kmeans


@pytest.fixture(scope="module")
def tok() -> WhisperTokenizer:
    torch.manual_seed(0)
    model = WhisperTokenizer(preset_v2("tiny", list("abcdefghij"))).eval()
    with torch.no_grad():
        for prm in model.encoder.parameters():
            prm.normal_(0, 0.2)
        model.linguistic.codebook.normal_()
    return model


def _speechlike(seconds: float, sr: int = 16000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 120 + 40 * np.sin(2 * np.pi * 0.7 * t)
    return (0.3 * np.sin(2 * np.pi * np.cumsum(f0) / sr) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
            + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def test_rates_and_layout(tok):
    toks = tok.encode(_speechlike(3.0), 16000)
    assert toks.linguistic.shape == (50,) and toks.semantic.shape == (75,)  # 16.7 Hz and 25 Hz, 25 groups
    assert toks.interleaved.shape == (125,)
    assert int(toks.linguistic.max()) < 1024 and int(toks.semantic.max()) < 4096
    assert toks.interleaved[2] == 1024 + toks.semantic[0]


@pytest.mark.parametrize("sr", [16000, 44100])
def test_stream_equals_offline(tok, sr):
    wav = _speechlike(2.3, sr, seed=1)
    offline = tok.encode(wav, sr)
    rng = np.random.default_rng(sr)
    s, parts, i = tok.stream(sr), [], 0
    while i < len(wav):
        n = int(rng.integers(50, 7000))
        parts.append(s.push(wav[i : i + n]))
        i += n
    parts.append(s.flush())
    assert torch.equal(torch.cat([p.linguistic for p in parts]), offline.linguistic)
    assert torch.equal(torch.cat([p.semantic for p in parts]), offline.semantic)


def test_last_block_is_encoded_at_its_own_length(tok):
    """After the last full block only the remainder is encoded: 1.08 s = one block + one 120 ms group."""
    s = tok.stream(16000)
    first = s.push(_speechlike(1.08))
    assert first.linguistic.numel() == 16  # the full 960 ms block
    tap = []
    tok.feature_tap = tap
    try:
        last = s.flush()
    finally:
        tok.feature_tap = None
    assert last.linguistic.numel() == 2 and tap[0].shape[1] == 2


def test_save_load_keeps_codes_and_leaves_out_the_encoder(tok, tmp_path):
    tok.save_pretrained(tmp_path / "v2", dtype=torch.float32)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "v2" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if k.startswith("encoder.")]
    again = WhisperTokenizer.from_pretrained(tmp_path / "v2", encoder=tok.encoder)
    wav = _speechlike(1.5, seed=3)
    assert torch.equal(again.encode(wav, 16000).interleaved, tok.encode(wav, 16000).interleaved)
    other = WhisperTokenizer(preset_v2("tiny", list("abcdefghij")))
    other.encoder.cfg.dim = 48  # a different encoder than the one the codebook was made on
    with pytest.raises(ValueError, match="trained on"):
        WhisperTokenizer.from_pretrained(tmp_path / "v2", encoder=other.encoder)


def test_load_tokenizer_dispatches_on_version(tmp_path):
    from npc_server.tokenizer.tokenizer import preset

    AudioTokenizer(preset("tiny")).save_pretrained(tmp_path / "v1")
    assert isinstance(load_tokenizer(tmp_path / "v1"), AudioTokenizer)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "nothing")


def test_kmeans_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    x = torch.cat([c + 0.3 * torch.randn(200, 2, generator=g) for c in centres])
    c = kmeans(x, 4, iters=10, progress=False)
    found = sorted(tuple(round(v) for v in row.tolist()) for row in c)
    assert found == [(0, 0), (0, 10), (10, 0), (10, 10)]


def test_audio_limits(tok):
    from npc_server.audio.io import AudioError

    with pytest.raises(AudioError):
        tok.encode(np.zeros(16000 * 31, np.float32), 16000)
    with pytest.raises(AudioError):
        tok.encode(np.array([0.0, np.nan] * 800, np.float32), 16000)
