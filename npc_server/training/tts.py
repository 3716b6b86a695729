"""`npc-server train tts`: train the talker (answer phones -> 25 Hz semantic audio tokens) on the corpus's NPC speech.

Data: every NPC utterance of the corpus (the voice bank speaking the answers with their emotion and speed), its
phones (espeak-ng, as the talker's front end makes them at serving time) and its semantic tokens from the audio
tokenizer (the codes the vocoder renders). The durations are found during training by monotonic alignment search
on the talker's own prior head, so no aligner is needed. A run continues `--init` (default: the shipped talker
when there is one) and appends its losses to <out>/training.json, so training goes on across runs.

  npc-server train tts --corpus /work/data/corpus/v2 --minutes 60 --out runs/talker
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from npc_server.argtools import advanced
from npc_server.paths import DEFAULT_MODEL_DIR, REPO_ROOT, data_dir
from npc_server.talker.align import frame_positions, monotonic_alignment
from npc_server.talker.frontend import SPECIALS, Phones, phonemize
from npc_server.talker.model import Talker, TalkerConfig, tempo
from npc_server.training.corpus.manifest import read_manifest
from npc_server.training.lm_data import TokenCache, save_tokens
from npc_server.training.lm_v2 import RunResult, append_run_log, continue_run_log, run_record, stop_on_signals
from npc_server.training.precision import PRECISIONS, resolve

PHONES_FILE = "talker_phones.jsonl"


@dataclass
class Utterance:
    id: str
    phone_ids: list[int]
    word_starts: list[bool]
    tokens: np.ndarray  # semantic codes
    voice: int
    language: int
    emotion: int
    speed: float
    tempo: float = 1.0  # speed x the emotion's rate: durations at tempo 1 are durations x tempo


# ------------------------------------------------------------------------------------------------------------ data
def npc_rows(corpus: Path, splits: tuple[str, ...]) -> list[dict]:
    return [r for r in read_manifest(corpus) if r["role"] == "npc" and r["split"] in splits]


def cache_phones(corpus: Path, rows: list[dict], progress: bool = True) -> dict[str, Phones]:
    """Phones of each row's text (espeak-ng via the talker front end), cached in <corpus>/talker_phones.jsonl."""
    path = corpus / PHONES_FILE
    cached: dict[str, Phones] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            d = json.loads(line)
            cached[d["id"]] = Phones(d["units"], d["word_starts"])
    todo = [r for r in rows if r["id"] not in cached]
    with path.open("a", encoding="utf-8") as f:
        for r in tqdm(todo, desc="phonemize", disable=not progress or not todo):
            seq = phonemize(r["text"], r["language"], r.get("accent"))
            cached[r["id"]] = seq
            f.write(json.dumps({"id": r["id"], "units": seq.units, "word_starts": seq.word_starts},
                               ensure_ascii=False) + "\n")
    return cached


def cache_tokens(corpus: Path, tokens_dir: Path, rows: list[dict], tokenizer_dir: Path, progress: bool = True,
                 batch: int = 8) -> None:
    """Audio tokens of the rows not yet in the token cache, from the audio tokenizer at `tokenizer_dir`, encoded in
    padded batches of similar length (the batch pass is the streaming encoder's maths: equal codes)."""
    tokens_dir.mkdir(parents=True, exist_ok=True)
    todo = [r for r in rows if not (tokens_dir / f"{r['id']}.npz").is_file()]
    if not todo:
        return
    from npc_server.audio.io import load_audio, resample
    from npc_server.tokenizer import AudioTokenizer
    from npc_server.tokenizer.tokenizer import GROUP_LINGUISTIC, GROUP_SEMANTIC, make_tokens

    tokenizer = AudioTokenizer.from_pretrained(tokenizer_dir)
    sr_in, block = tokenizer.cfg.features.sample_rate, tokenizer.cfg.block_samples
    todo.sort(key=lambda r: r.get("duration", 0.0))
    bar = tqdm(total=len(todo), desc="audio tokens", disable=not progress)
    for i in range(0, len(todo), batch):
        part = todo[i : i + batch]
        wavs = []
        for r in part:
            wav, sr = load_audio(corpus / r["audio"])
            wavs.append(torch.from_numpy(np.asarray(resample(wav, sr, sr_in), dtype=np.float32)))
        n = -(-max(len(w) for w in wavs) // block) * block
        x = torch.zeros(len(wavs), n)
        for j, w in enumerate(wavs):
            x[j, : len(w)] = w
        with torch.inference_mode():
            out = tokenizer(x, torch.tensor([len(w) for w in wavs]))
        for j, r in enumerate(part):
            g = int(out["groups"][j])
            t = make_tokens(out["ling"]["codes"][j, : GROUP_LINGUISTIC * g], out["sem"]["codes"][j, : GROUP_SEMANTIC * g])
            save_tokens(tokens_dir / f"{r['id']}.npz", t.linguistic.numpy(), t.semantic.numpy(), t.interleaved.numpy())
        bar.update(len(part))
    bar.close()


def phone_inventory(phones: list[Phones], min_count: int = 2) -> tuple[str, ...]:
    from collections import Counter

    counts = Counter(u for p in phones for u in p.units if u not in SPECIALS)
    return tuple(sorted((u for u, c in counts.items() if c >= min_count), key=lambda u: (-counts[u], u)))


def make_utterances(talker: Talker, rows: list[dict], phones: dict[str, Phones], tokens: TokenCache) -> list[Utterance]:
    """Rows the talker can learn from: known voice and language, at least one frame per phone."""
    cfg, out = talker.cfg, []
    for r in rows:
        if r["speaker"] not in cfg.voices or r["language"] not in cfg.languages or r["id"] not in tokens:
            continue
        seq = talker.known_phones(phones[r["id"]])
        sem = tokens.get(r["id"])["semantic"]
        if len(sem) < len(seq) or len(seq) > cfg.max_phones:
            continue
        c = r.get("controls") or {}
        v, lang, emo = talker.condition_ids(r["speaker"], r["language"], c.get("emotion", "neutral"))
        speed, emotion = float(c.get("speed", 1.0)), c.get("emotion", "neutral")
        out.append(Utterance(r["id"], talker.phone_ids(seq), seq.word_starts, sem, v, lang, emo, speed,
                             tempo(speed, emotion) if cfg.tempo_law else 1.0))
    return out


def batches(utts: list[Utterance], batch_frames: int, rng: random.Random) -> list[list[int]]:
    """Index batches of similar length, at most `batch_frames` padded frames each, in random order."""
    order = sorted(range(len(utts)), key=lambda i: (len(utts[i].tokens), rng.random()))
    out, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * len(utts[i].tokens) > batch_frames:
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    rng.shuffle(out)
    return out


# ------------------------------------------------------------------------------------------------------------ loss
def talker_loss(talker: Talker, batch: list[Utterance], rng: random.Random | None = None) -> dict[str, torch.Tensor]:
    """Frame-token CE (decoder) + aligned prior CE + log-duration MSE, on durations from monotonic alignment."""
    cfg = talker.cfg
    b = len(batch)
    n = max(len(u.phone_ids) for u in batch)
    t = max(len(u.tokens) for u in batch)
    ids = torch.zeros(b, n, dtype=torch.long)
    starts = torch.zeros(b, n, dtype=torch.long)
    phone_mask = torch.zeros(b, n, dtype=torch.bool)
    toks = torch.zeros(b, t, dtype=torch.long)
    frame_mask = torch.zeros(b, t, dtype=torch.bool)
    for i, u in enumerate(batch):
        ids[i, : len(u.phone_ids)] = torch.tensor(u.phone_ids)
        starts[i, : len(u.phone_ids)] = torch.tensor(u.word_starts, dtype=torch.long)
        phone_mask[i, : len(u.phone_ids)] = True
        toks[i, : len(u.tokens)] = torch.from_numpy(u.tokens)
        frame_mask[i, : len(u.tokens)] = True
    cond = talker.condition(torch.tensor([u.voice for u in batch]), torch.tensor([u.language for u in batch]),
                            torch.tensor([u.emotion for u in batch]), torch.tensor([u.speed for u in batch]))
    states = talker.encode_phones(ids, starts, cond, phone_mask)
    prior = torch.log_softmax(talker.prior_logits(states).float(), -1)  # [B, N, codes]
    frame_phone = torch.zeros(b, t, dtype=torch.long)
    in_phone = torch.zeros(b, t, dtype=torch.long)
    left = torch.zeros(b, t, dtype=torch.long)
    durations = torch.ones(b, n)
    tempos = torch.tensor([u.tempo for u in batch])[:, None]
    with torch.no_grad():
        for i, u in enumerate(batch):
            nu, tu = len(u.phone_ids), len(u.tokens)
            scores = prior[i, :nu].gather(1, toks[i, :tu][None].expand(nu, -1)).numpy()
            d = monotonic_alignment(scores)
            ph, ip, lf = frame_positions(d)
            frame_phone[i, :tu], in_phone[i, :tu], left[i, :tu] = map(torch.from_numpy, (ph, ip, lf))
            durations[i, :nu] = torch.from_numpy(d).float()
    prev = torch.cat([torch.full((b, 1), cfg.n_codes), toks[:, :-1]], dim=1)
    if rng is not None and cfg.token_dropout > 0:
        drop = torch.rand(b, t, generator=torch.Generator().manual_seed(rng.randrange(2**31))) < cfg.token_dropout
        prev = torch.where(drop, torch.full_like(prev, cfg.n_codes + 1), prev)
    x = talker.frame_inputs(states, frame_phone, in_phone, left, prev, cond)
    logits = talker.decode_frames(x, pad_mask=frame_mask)
    decoder = F.cross_entropy(logits[frame_mask].float(), toks[frame_mask])
    aligned = prior.gather(1, frame_phone[..., None].expand(-1, -1, prior.shape[-1]))  # [B, T, codes]
    prior_ce = -aligned.gather(2, toks[..., None]).squeeze(-1)[frame_mask].mean()
    log_d = talker.log_durations(states.detach()).float()
    duration = F.mse_loss(log_d[phone_mask], torch.log(durations * tempos)[phone_mask])
    return {"loss": decoder + prior_ce + duration, "decoder": decoder.detach(), "prior": prior_ce.detach(),
            "duration": duration.detach(), "frames": frame_mask.sum()}


@torch.no_grad()
def validation(talker: Talker, utts: list[Utterance], batch_frames: int) -> dict[str, float]:
    talker.eval()
    sums: dict[str, float] = {}
    frames = 0
    for idx in batches(utts, batch_frames, random.Random(0)):
        out = talker_loss(talker, [utts[i] for i in idx])
        f = int(out["frames"])
        for k in ("decoder", "prior", "duration"):
            sums[k] = sums.get(k, 0.0) + float(out[k]) * f
        frames += f
    return {k: round(v / max(frames, 1), 4) for k, v in sums.items()}


class BestCheckpoint:
    """The `save` of a run: validates the talker and writes it to `out` only when the validation decoder CE beats
    every earlier checkpoint and the starting weights (many passes over a few hours of speech overfit: the last
    weights are not always the best). `curve` keeps (minute, decoder, prior, duration, kept) per checkpoint."""

    def __init__(self, talker: Talker, valid: list[Utterance], out: Path, batch_frames: int, start: dict):
        self.talker, self.valid, self.out, self.batch_frames = talker, valid, out, batch_frames
        self.best = start.get("decoder", math.inf) if valid else math.inf
        self.best_valid = dict(start)
        self.curve: list[dict] = []
        self.t0 = time.perf_counter()
        if valid:
            talker.save_pretrained(out)  # the starting weights stand until a checkpoint beats them

    def __call__(self) -> None:
        if not self.valid:
            self.talker.save_pretrained(self.out)
            return
        v = validation(self.talker, self.valid, self.batch_frames)
        kept = v["decoder"] < self.best
        if kept:
            self.best, self.best_valid = v["decoder"], v
            self.talker.save_pretrained(self.out)
        self.curve.append({"minute": round((time.perf_counter() - self.t0) / 60, 1), **v, "kept": kept})
        print(f"checkpoint: valid {v}{' (best so far: saved)' if kept else ' (not better: not saved)'}", flush=True)


# ------------------------------------------------------------------------------------------------------------ loop
def train(talker: Talker, utts: list[Utterance], minutes: float, batch_frames: int, lr: float, precision: str,
          seed: int = 0, max_steps: int | None = None, save=None, save_every_minutes: float = 15.0,
          progress: bool = True) -> RunResult:
    """AdamW, warm-up then cosine to 10% over the time budget; `save()` every `save_every_minutes` and at the end
    (the talker in eval mode; it may validate and keep only the best checkpoint, see `BestCheckpoint`). A
    KeyboardInterrupt ends the run early, as if its budget were spent."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(talker.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    talker.train()
    budget, t0, last_save = minutes * 60, time.perf_counter(), time.perf_counter()
    step, frames, losses = 0, 0, []
    parts: dict[str, list[float]] = {"decoder": [], "prior": [], "duration": []}
    bar = tqdm(total=int(budget), unit="s", desc="train tts", disable=not progress)
    done = not utts
    try:
        while not done:
            for idx in batches(utts, batch_frames, rng):
                frac = min(1.0, (time.perf_counter() - t0) / budget)
                for g in opt.param_groups:
                    g["lr"] = lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    out = talker_loss(talker, [utts[i] for i in idx], rng)
                opt.zero_grad(set_to_none=True)
                out["loss"].backward()
                torch.nn.utils.clip_grad_norm_(talker.parameters(), 1.0)
                opt.step()
                step += 1
                frames += int(out["frames"])
                losses.append(float(out["loss"].detach()))
                for k in parts:
                    parts[k].append(float(out[k]))
                elapsed = time.perf_counter() - t0
                bar.n = min(int(budget), int(elapsed))
                bar.set_postfix(step=step, loss=f"{np.mean(losses[-20:]):.3f}", frames_s=f"{frames / elapsed:.0f}")
                if not progress and step % 25 == 0:
                    last = {k: np.mean(v[-25:]) for k, v in parts.items()}
                    print(f"step {step}: loss {np.mean(losses[-25:]):.3f} (decoder {last['decoder']:.3f}, prior "
                          f"{last['prior']:.3f}, duration {last['duration']:.3f}), {frames / elapsed:.0f} frames/s, "
                          f"{elapsed / 60:.1f} min", flush=True)
                if save is not None and time.perf_counter() - last_save > save_every_minutes * 60:
                    talker.eval()
                    save()
                    talker.train()
                    last_save = time.perf_counter()
                if elapsed >= budget or (max_steps is not None and step >= max_steps):
                    done = True
                    break
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (see main): end early; the last checkpoint still validates
        print("stopped early: validating and keeping the best checkpoint", flush=True)
    bar.close()
    talker.eval()
    if save is not None:
        save()
    return RunResult(step, frames, time.perf_counter() - t0, losses)


def start_talker(init: Path | None, phones: tuple[str, ...], voices: tuple[str, ...], preset: str) -> Talker:
    """The talker to continue (`init`) or a fresh one; a continued talker keeps its inventory and voices."""
    if init is not None and (init / "config.json").is_file():
        return Talker.from_pretrained(init)
    cfg = replace(PRESETS[preset], phones=phones, voices=voices)
    torch.manual_seed(0)
    return Talker(cfg)


PRESETS: dict[str, TalkerConfig] = {
    "tiny": TalkerConfig(dim=32, heads=2, encoder_layers=1, decoder_layers=1, ff_mult=2),
    "default": TalkerConfig(),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="npc-server train tts", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, default=data_dir() / "corpus" / "default")
    p.add_argument("--init", type=Path, default=DEFAULT_MODEL_DIR / "talker",
                   help="talker to continue (default: the shipped one; `none` or a missing folder starts fresh)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "talker")
    p.add_argument("--minutes", type=float, default=30.0, help="training budget (the LR schedule follows it)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-frames", type=int, default=1600, help="padded audio-token frames per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--precision", choices=PRECISIONS, default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--checkpoint-minutes", type=float, default=10.0,
                   help="validate every N minutes and keep the best weights (default 10)")
    a = advanced(p)
    a.add_argument("--preset", choices=sorted(PRESETS), default="default", help="size of a fresh talker")
    a.add_argument("--tokens", type=Path, default=None, help="semantic token cache (default <corpus>/tokens)")
    a.add_argument("--audio-tokenizer", type=Path, default=DEFAULT_MODEL_DIR / "tokenizer",
                   help="audio tokenizer that fills the token cache where it lacks utterances")
    a.add_argument("--voices", nargs="+", default=None, help="voice-bank voices to learn (default: all in the corpus)")
    a.add_argument("--limit", type=int, default=None, help="use only the first N train utterances")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    corpus = args.corpus.expanduser()
    if not (corpus / "manifest.jsonl").is_file():
        raise SystemExit(f"npc-server train tts: no corpus at {corpus} (run `npc-server train corpus` or pass --corpus)")
    init = None if str(args.init) == "none" else args.init
    precision = resolve(args.precision)
    progress = not args.no_progress
    train_rows = npc_rows(corpus, ("train",))[: args.limit]
    valid_rows = npc_rows(corpus, ("valid",))[:200]
    if args.voices:
        train_rows = [r for r in train_rows if r["speaker"] in args.voices]
        valid_rows = [r for r in valid_rows if r["speaker"] in args.voices]
    if not train_rows:
        raise SystemExit(f"npc-server train tts: no NPC train utterances in {corpus}/manifest.jsonl")
    tokens_dir = (args.tokens or corpus / "tokens").expanduser()
    cache_tokens(corpus, tokens_dir, train_rows + valid_rows, args.audio_tokenizer, progress)
    phones = cache_phones(corpus, train_rows + valid_rows, progress)
    voices = tuple(sorted({r["speaker"] for r in train_rows}))
    talker = start_talker(init, phone_inventory([phones[r["id"]] for r in train_rows]), voices, args.preset)
    tokens = TokenCache(tokens_dir)
    train_utts = make_utterances(talker, train_rows, phones, tokens)
    valid_utts = make_utterances(talker, valid_rows, phones, tokens)
    print(f"talker: {talker.num_parameters() / 1e6:.1f} M parameters, {len(talker.cfg.phones)} phones, voices "
          f"{', '.join(talker.cfg.voices)}; {len(train_utts)} train / {len(valid_utts)} valid utterances "
          f"({sum(len(u.tokens) for u in train_utts) / 25 / 3600:.2f} h); precision {precision}", flush=True)
    out = args.out
    continue_run_log(init if init is not None and (init / "config.json").is_file() else None, out)
    before = validation(talker, valid_utts, args.batch_frames) if valid_utts else {}
    checkpoint = BestCheckpoint(talker, valid_utts, out, args.batch_frames, before)
    with stop_on_signals():  # `kill` / Ctrl-C end the run early: the best checkpoint and the log are still written
        result = train(talker, train_utts, args.minutes, args.batch_frames, args.lr, precision, args.seed,
                       args.max_steps, save=checkpoint, save_every_minutes=args.checkpoint_minutes, progress=progress)
    after = checkpoint.best_valid
    print(f"valid loss before {before}, kept {after}")
    record = run_record("tts", str(init) if init is not None else "fresh", result, precision, args.threads,
                        "npc-server train tts " + " ".join(sys.argv[2:] if argv is None else argv),
                        valid_before=before, valid_after=after)
    record["valid_curve"] = checkpoint.curve
    record["frames"] = record.pop("tokens")
    record["frames_per_s"] = record.pop("tokens_per_s")
    append_run_log(out, record)
    print(f"saved {out} ({result.steps} steps, {result.seconds / 60:.1f} min)")
    return 0
