"""Data shared by the vocoder's stages: the utterance pick, pitch-shifted (PSOLA) and voice-swapped copies, and the
run's mel cache (the flow's targets, the phone judge's training data)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from npc_server.audio.io import load_audio, resample
from npc_server.training.corpus.manifest import read_manifest
from npc_server.vocoder.mel import LogMel, MelConfig
from npc_server.voices import VOICE_BANK, VoiceSpec


def pick_utterances(rows: list[dict], split: str, max_hours: float, seed: int) -> list[dict]:
    rows = [r for r in rows if r["split"] == split]
    rng = random.Random(seed)
    rng.shuffle(rows)
    # NPC voices first (they are what the vocoder speaks), then players for variety
    rows.sort(key=lambda r: r["role"] != "npc")
    npc = [r for r in rows if r["role"] == "npc"]
    player = [r for r in rows if r["role"] != "npc"]
    picked, total = [], 0.0
    budget_npc = max_hours * 3600 * (0.8 if player else 1.0)
    for r in npc:
        if total >= budget_npc:
            break
        picked.append(r)
        total += r["duration"]
    for r in player:
        if total >= max_hours * 3600:
            break
        picked.append(r)
        total += r["duration"]
    return picked


# ------------------------------------------------------------------------------------------------------------
# pitch shifting for the pitch-conditioning targets (PSOLA keeps formants, so only F0 moves)


def psola_pitch_shift(wav: np.ndarray, sr: int, semitones: float) -> np.ndarray:
    import parselmouth
    from parselmouth.praat import call

    snd = parselmouth.Sound(wav.astype(np.float64), sr)
    manip = call(snd, "To Manipulation", 0.01, 60, 600)
    tier = call(manip, "Extract pitch tier")
    call(tier, "Multiply frequencies", snd.xmin, snd.xmax, 2 ** (semitones / 12))
    call([tier, manip], "Replace pitch tier")
    out = call(manip, "Get resynthesis (overlap-add)").values[0].astype(np.float32)
    n = len(wav)
    return np.pad(out, (0, max(0, n - len(out))))[:n]


def voiced_f0(x: np.ndarray, sr: int) -> np.ndarray:
    """F0 in Hz of the voiced 10 ms frames (Praat, 40-600 Hz)."""
    import parselmouth

    f = parselmouth.Sound(x.astype(np.float64), sr).to_pitch(time_step=0.01, pitch_floor=40, pitch_ceiling=600)
    f = f.selected_array["frequency"]
    return f[f > 0]


def _shift_st(voiced_a: np.ndarray, voiced_b: np.ndarray) -> float:
    """Semitones from the median of voiced F0 frames `voiced_a` to that of `voiced_b`; NaN if either is empty."""
    if not len(voiced_a) or not len(voiced_b):
        return float("nan")
    return float(12 * np.log2(np.median(voiced_b) / np.median(voiced_a)))


def measured_shift_st(original: np.ndarray, shifted: np.ndarray, sr: int) -> float:
    """Semitones between the median F0 of two versions of an utterance (Praat, 40-600 Hz); NaN if either is
    unvoiced."""
    return _shift_st(voiced_f0(original, sr), voiced_f0(shifted, sr))


def sibling_voices(speaker: str) -> list[VoiceSpec]:
    """Voice-bank entries derived from the same engine output as `speaker` (same engine, variant and languages;
    they differ only by pitch shift and formant ratio), so one's audio can be re-rendered as another's."""
    spec = VOICE_BANK.get(speaker)
    if spec is None:
        return []
    key = (spec.engine, spec.espeak_variant, spec.languages)
    return [v for v in VOICE_BANK.values() if v.id != speaker and (v.engine, v.espeak_variant, v.languages) == key]


def render_as_sibling(wav: np.ndarray, sr: int, src: VoiceSpec, dst: VoiceSpec) -> tuple[np.ndarray, float]:
    """`src` speech re-rendered as `dst` (Praat Change gender, same duration): formants scaled by the ratio of their
    formant ratios, median F0 moved by the difference of their pitch shifts. -> (audio, how far the reached median
    F0 is from dst's in semitones: its pitch label; NaN if unvoiced). Parallel data that teaches the flow's voice
    embedding the timbre, which single-voice utterances leave to the tokens."""
    import parselmouth
    from parselmouth.praat import call

    want = dst.pitch_shift_st - src.pitch_shift_st
    voiced = voiced_f0(wav, sr)
    if voiced.size < 3:
        return wav, float("nan")
    median = float(np.median(voiced)) * 2.0 ** (want / 12.0)
    snd = parselmouth.Sound(wav.astype(np.float64), sr)
    out = call(snd, "Change gender", 60, 600, dst.formant_ratio / src.formant_ratio, median, 1.0, 1.0)
    y = out.values[0].astype(np.float32)
    y = np.pad(y, (0, max(0, len(wav) - len(y))))[: len(wav)]
    return y, _shift_st(voiced, voiced_f0(y, sr)) - want  # the source's F0 is measured once


def add_voice_swaps(cache: dict, corpus: Path, mel_cfg: MelConfig, prob: float, seed: int) -> int:
    """Give a `prob` fraction of the cached utterances whose voice has siblings (see `sibling_voices`) one copy
    re-rendered as a random sibling, stored as (mel, pitch label, sibling id) with the original's tokens.
    Utterances that already have such a copy are skipped. Returns the number of copies added."""
    logmel = LogMel(mel_cfg)
    todo = [uid for uid, item in cache.items() if sibling_voices(item["speaker"])
            and not any(len(v) > 2 for v in item["mels"])]
    added = 0
    for uid in tqdm(todo, desc="voice-swap copies", unit="utt"):
        item = cache[uid]
        rng = random.Random(f"{seed}:{uid}")
        if rng.random() >= prob:
            continue
        dst = rng.choice(sibling_voices(item["speaker"]))
        wav, sr = load_audio(corpus / item["audio"])
        y, st = render_as_sibling(wav, sr, VOICE_BANK[item["speaker"]], dst)
        if not np.isfinite(st):
            continue
        with torch.no_grad():
            mel = logmel(torch.from_numpy(resample(y, sr, mel_cfg.sample_rate)))[0].half()
        item["mels"].append((mel, st, dst.id))
        added += 1
    return added


# ------------------------------------------------------------------------------------------------------------
# the mel cache


def build_mel_cache(rows: list[dict], corpus: Path, mel_cfg: MelConfig, pitch_aug: float, seed: int) -> dict:
    """24 kHz log-mels of the given utterances (float16); a `pitch_aug` fraction also gets a PSOLA-shifted copy
    (+-1..7 semitones requested) that keeps the tokens of the original: the targets of the pitch conditioning. The
    copy is labelled with the shift measured on it, not the one requested: Praat's PSOLA does not take a low voice
    below ~60 Hz (joe_low at 66 Hz asked for -7 st moves -0.7 st), and a wrong label teaches the flow to ignore
    downward requests.
    Needs no tokenizer, so it can run as soon as the corpus exists."""
    logmel = LogMel(mel_cfg)
    rng = random.Random(seed)
    cache = {}
    for r in tqdm(rows, desc="mels", unit="utt"):
        wav, sr = load_audio(corpus / r["audio"])
        variants = [(wav, 0.0)]
        if rng.random() < pitch_aug:
            st = rng.choice([-1, 1]) * rng.uniform(1.0, 7.0)
            shifted = psola_pitch_shift(wav, sr, st)
            got = measured_shift_st(wav, shifted, sr)
            if np.isfinite(got):  # labelled with the shift PSOLA reached (it cannot go far below 60 Hz)
                variants.append((shifted, got))
        mels = []
        for w, st in variants:
            with torch.no_grad():
                mels.append((logmel(torch.from_numpy(resample(w, sr, mel_cfg.sample_rate)))[0].half(), st))
        cache[r["id"]] = {"speaker": r["speaker"], "audio": r["audio"], "mels": mels}
    return cache


def run_mel_cache(args, mel_cfg: MelConfig) -> dict:
    """The run's mel cache (`args.run_dir`/mel_cache.pt): loaded and, with --extend-mels / --voice-swap, extended;
    built from the corpus when there is none yet."""
    mel_path = args.run_dir / "mel_cache.pt"
    if mel_path.exists():
        mel_cache = torch.load(mel_path, weights_only=False)
        print(f"loaded mels of {len(mel_cache)} utterances from {mel_path}")
        if args.extend_mels:
            rows = pick_utterances(read_manifest(args.corpus), "train", args.max_hours, args.seed)
            new = [r for r in rows if r["id"] not in mel_cache]
            mel_cache.update(build_mel_cache(new, args.corpus, mel_cfg, args.pitch_aug, args.seed))
            print(f"added mels of {len(new)} utterances: {len(mel_cache)} in {mel_path}")
        if args.voice_swap > 0:
            print(f"added {add_voice_swaps(mel_cache, args.corpus, mel_cfg, args.voice_swap, args.seed)} "
                  "voice-swap copies")
        if args.extend_mels or args.voice_swap > 0:
            torch.save(mel_cache, mel_path.with_suffix(".tmp"))
            mel_path.with_suffix(".tmp").replace(mel_path)  # a symlinked cache is replaced, not overwritten
    else:
        rows = pick_utterances(read_manifest(args.corpus), "train", args.max_hours, args.seed)
        mel_cache = build_mel_cache(rows, args.corpus, mel_cfg, args.pitch_aug, args.seed)
        if args.voice_swap > 0:
            add_voice_swaps(mel_cache, args.corpus, mel_cfg, args.voice_swap, args.seed)
        torch.save(mel_cache, mel_path)
    return mel_cache
