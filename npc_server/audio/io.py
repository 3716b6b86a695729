"""Wav/PCM input and output, resampling (soxr) and validation of audio coming from clients or files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

# Sample rates a client may send; anything else is refused with a clear error.
MIN_SAMPLE_RATE = 8000
MAX_SAMPLE_RATE = 192000
MAX_CHANNELS = 8  # a file with more is refused before it is decoded


class AudioError(ValueError):
    """Audio that cannot be used: empty, not finite, too long, unreadable, bad sample rate."""


def to_mono(wav: np.ndarray) -> np.ndarray:
    """(n,) or (n, channels) -> (n,) float32 by averaging channels."""
    wav = np.asarray(wav)
    if wav.ndim == 2:
        wav = wav.mean(axis=1)
    elif wav.ndim != 1:
        raise AudioError(f"audio must be 1-D (mono) or 2-D (samples, channels), got shape {wav.shape}")
    return wav.astype(np.float32, copy=False)


def validate_audio(wav: np.ndarray, sr: int, max_seconds: float | None = None) -> None:
    """Raise AudioError if the signal cannot be used."""
    if not isinstance(sr, (int, np.integer)) or not (MIN_SAMPLE_RATE <= sr <= MAX_SAMPLE_RATE):
        raise AudioError(f"sample rate {sr!r} Hz is not supported (allowed {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz)")
    if wav.size == 0:
        raise AudioError("audio is empty")
    if not np.all(np.isfinite(wav)):
        raise AudioError("audio contains NaN or infinite samples")
    if max_seconds is not None and wav.shape[0] / sr > max_seconds:
        raise AudioError(f"audio is {wav.shape[0] / sr:.1f} s long; the limit is {max_seconds:.1f} s")


def resample(wav: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """High-quality resampling with soxr; returns float32."""
    if sr_in == sr_out:
        return wav.astype(np.float32, copy=False)
    return soxr.resample(wav.astype(np.float32, copy=False), sr_in, sr_out, quality="HQ").astype(np.float32)


def load_audio(source: str | Path | bytes, target_sr: int | None = None, max_seconds: float | None = None):
    """Read a wav/flac/ogg file (path or bytes) -> (mono float32 in [-1, 1], sample rate).

    With target_sr the audio is resampled. Raises AudioError on unreadable or unusable audio.
    With max_seconds the file's declared duration is checked before anything is decoded, and the audio is
    decoded in blocks of one second that stop at the limit: a small compressed file can hold hours of audio.
    """
    name = "audio bytes" if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        data = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source)
        with sf.SoundFile(data) as f:
            sr, channels, declared = f.samplerate, f.channels, f.frames
            if not (MIN_SAMPLE_RATE <= sr <= MAX_SAMPLE_RATE):
                raise AudioError(f"sample rate {sr} Hz is not supported (allowed {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz)")
            if channels > MAX_CHANNELS:
                raise AudioError(f"audio has {channels} channels; at most {MAX_CHANNELS} are read")
            limit = None if max_seconds is None else int(max_seconds * sr)
            if limit is not None and declared > limit:
                raise AudioError(f"audio is {declared / sr:.1f} s long; the limit is {max_seconds:.1f} s")
            blocks, frames = [], 0
            for block in f.blocks(blocksize=sr, dtype="float32", always_2d=True):
                frames += len(block)
                if limit is not None and frames > limit:  # the header understated the length
                    raise AudioError(f"audio is over {frames / sr:.1f} s long; the limit is {max_seconds:.1f} s")
                blocks.append(to_mono(block))
    except sf.LibsndfileError as exc:
        # exc's own text names the BytesIO object (a memory address) for bytes: use libsndfile's message alone
        raise AudioError(f"cannot read {name}: {exc.error_string.rstrip('.')}") from None
    except (RuntimeError, TypeError, ValueError) as exc:
        if isinstance(exc, AudioError):
            raise
        raise AudioError(f"cannot read {name}: not a wav, flac or ogg file ({type(exc).__name__})") from None
    wav = np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
    validate_audio(wav, sr, max_seconds)
    if target_sr is not None:
        wav, sr = resample(wav, sr, target_sr), target_sr
    return wav, sr


def save_wav(path: str | Path, wav: np.ndarray, sr: int) -> None:
    """Write 16-bit PCM wav."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.clip(wav, -1.0, 1.0), sr, subtype="PCM_16")


def pcm16_to_float(pcm: bytes) -> np.ndarray:
    """s16le bytes -> float32 in [-1, 1]."""
    if len(pcm) % 2:
        raise AudioError(f"s16le PCM must have an even number of bytes, got {len(pcm)}")
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0


def float_to_pcm16(wav: np.ndarray) -> bytes:
    """float32 in [-1, 1] -> s16le bytes (clipped)."""
    return (np.clip(wav, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()
