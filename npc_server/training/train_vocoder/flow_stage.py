"""The flow stage of `npc-server train vocoder` (--stage flow): the token -> mel flow-matching decoder, its
semantic-token caches, training examples and batches, and the losses on its output (phone judge, F0)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from npc_server.audio.io import load_audio
from npc_server.controls import EMOTIONS
from npc_server.training.corpus.manifest import read_manifest
from npc_server.training.train_vocoder.common import export_vocoder, train_loop
from npc_server.training.train_vocoder.data import build_mel_cache
from npc_server.vocoder.flow import OTHER_VOICE, FlowConfig, FlowDecoder
from npc_server.vocoder.generator import Generator
from npc_server.vocoder.mel import MelConfig
from npc_server.vocoder.phone_judge import PhoneJudge
from npc_server.vocoder.vocoder import Vocoder

# ------------------------------------------------------------------------------------------------------------
# data: token caches, examples, batches


@dataclass
class FlowExample:
    mel: torch.Tensor  # [n_mels, 4T] float16
    tokens: torch.Tensor  # [T] int16
    voice: int
    pitch_st: float


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
# model and losses


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


def train_flow(args, vocoder: Vocoder, mel_cache: dict, minutes: float, rng: random.Random, bf16: bool) -> None:
    """Train `vocoder.flow` for `minutes` on the mel cache and its semantic tokens (cached, encoded, read from the
    corpus or proxies, as the arguments say) and write it to `args.out` (not after --proxy-tokens)."""
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
        export_vocoder(vocoder, args.out, {"flow": {**stats, "examples": len(examples)}}, "flow", args.init)
