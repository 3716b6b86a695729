"""Audio I/O: reading real speech, resampling, stereo, PCM round trips and clear errors for bad audio."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import soundfile as sf

from npc_server.audio import AudioError, float_to_pcm16, load_audio, pcm16_to_float, resample, save_wav, validate_audio


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory):
    path = tmp_path_factory.mktemp("audio") / "hello.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(path), "Hello traveller, welcome to Oakvale."], check=True)
    return path


def test_load_real_speech_and_resample(speech_wav):
    wav, sr = load_audio(speech_wav)
    assert sr == 22050 and wav.dtype == np.float32 and wav.ndim == 1
    wav16, sr16 = load_audio(speech_wav, target_sr=16000)
    assert sr16 == 16000
    assert abs(len(wav16) - len(wav) * 16000 / 22050) <= 2
    # energy is preserved by resampling (speech band is below 8 kHz)
    assert np.isclose(np.sqrt(np.mean(wav16**2)), np.sqrt(np.mean(wav**2)), rtol=0.05)


def test_stereo_and_bytes(speech_wav, tmp_path):
    wav, sr = load_audio(speech_wav)
    stereo = np.stack([wav, wav * 0.5], axis=1)
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo, sr)
    mono, _ = load_audio(path.read_bytes())
    assert mono.ndim == 1 and np.allclose(mono, wav * 0.75, atol=2e-4)


def test_pcm16_round_trip():
    x = np.linspace(-1, 1, 1001, dtype=np.float32)
    y = pcm16_to_float(float_to_pcm16(x))
    assert np.max(np.abs(x - y)) < 1e-4
    with pytest.raises(AudioError, match="even number of bytes"):
        pcm16_to_float(b"\x00\x01\x02")


def test_bad_audio_is_rejected(tmp_path):
    with pytest.raises(AudioError, match="empty"):
        validate_audio(np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioError, match="NaN"):
        validate_audio(np.array([0.0, np.nan], np.float32), 16000)
    with pytest.raises(AudioError, match="limit is 2.0 s"):
        validate_audio(np.zeros(16000 * 3, np.float32), 16000, max_seconds=2.0)
    with pytest.raises(AudioError, match="sample rate"):
        validate_audio(np.zeros(100, np.float32), 100)
    with pytest.raises(AudioError, match="cannot read"):
        load_audio(b"this is not a wav file")
    bad = tmp_path / "garbage.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    with pytest.raises(AudioError, match="cannot read"):
        load_audio(bad)


def test_save_wav_clips(tmp_path):
    path = tmp_path / "out.wav"
    save_wav(path, np.array([2.0, -2.0, 0.5], np.float32), 24000)
    data, sr = sf.read(path)
    assert sr == 24000 and data.max() <= 1.0 and data.min() >= -1.0


def test_resample_identity():
    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    assert resample(x, 16000, 16000) is x or np.array_equal(resample(x, 16000, 16000), x)


def test_garbage_bytes_error_names_no_memory_address():
    with pytest.raises(AudioError) as e:
        load_audio(b"RIFF not a wav")
    assert str(e.value) == "cannot read audio bytes: Format not recognised"


def test_compressed_audio_bomb_is_refused_before_it_is_decoded():
    """A small FLAC of 10 min of silence (28 kB) would decode to 38 MB of float32: the declared length is checked
    first, and decoding goes in bounded blocks."""
    import io
    import tracemalloc

    buf = io.BytesIO()
    sf.write(buf, np.zeros(16000 * 600, np.float32), 16000, format="FLAC")
    bomb = buf.getvalue()
    assert len(bomb) < 100_000
    tracemalloc.start()
    try:
        with pytest.raises(AudioError, match=r"audio is 600.0 s long; the limit is 10.0 s"):
            load_audio(bomb, max_seconds=10)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"{peak / 1e6:.1f} MB allocated to refuse it"
    # within the limit it still decodes, block by block, to the same samples
    buf = io.BytesIO()
    tone = (0.3 * np.sin(np.arange(16000 * 3) / 10)).astype(np.float32)
    sf.write(buf, tone, 16000, format="FLAC")
    wav, sr = load_audio(buf.getvalue(), max_seconds=10)
    assert sr == 16000 and len(wav) == len(tone) and np.allclose(wav, tone, atol=1e-4)
