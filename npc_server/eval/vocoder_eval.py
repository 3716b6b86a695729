"""`npc-server eval vocoder`: held-out resynthesis (tokenizer -> vocoder) judged by Whisper tiny.en, F0 error, voice
distinguishability, pitch-shift accuracy, streaming fidelity, real-time factor and first-chunk compute time."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from npc_server.audio.io import load_audio, resample, save_wav
from npc_server.eval.metrics import (
    Listener,
    f0_error,
    heldout_rows,
    judge_phone_error_rate,
    median_f0,
    nearest_centroid_accuracy,
    neutral_voice_f0,
    normalize_text,
    timbre_features,
    word_errors,
)
from npc_server.paths import DEFAULT_MODEL_DIR, REPO_ROOT, data_dir, require_corpus
from npc_server.tokenizer.phones import PhoneInventory
from npc_server.vocoder.mel import LogMel, logmel_distance_db
from npc_server.vocoder.phone_judge import PhoneJudge
from npc_server.vocoder.vocoder import STREAM_MEL_TOLERANCE_DB, Vocoder


def wer_by_voice(per_utt: list[dict]) -> dict[str, dict]:
    """Word error rates of source and resynthesised audio per speaker: the listener hears the piper voice (joe) far
    better than the espeak-ng ones, so the pooled figure mixes two very different baselines."""
    out: dict[str, dict] = {}
    for u in per_utt:
        d = out.setdefault(u["speaker"], {"utterances": 0, "words": 0, "errors_source": 0, "errors_resynth": 0})
        d["utterances"] += 1
        for k in ("words", "errors_source", "errors_resynth"):
            d[k] += u[k]
    for d in out.values():
        d["wer_source"] = d["errors_source"] / max(d["words"], 1)
        d["wer_resynth"] = d["errors_resynth"] / max(d["words"], 1)
    return dict(sorted(out.items()))


def _voice_for(vocoder: Vocoder, speaker: str) -> str:
    return speaker if speaker in vocoder.voices else vocoder.voices[0]


def evaluate(vocoder: Vocoder, tokenizer, rows: list[dict], corpus: Path, listener: Listener | None,
             samples_dir: Path | None = None, n_timbre: int = 4, threads: int = 2, judge=None,
             n_stream: int = 10) -> dict:
    """Resynthesis metrics on `rows`; `tokenizer=None` means copy synthesis (source mel -> generator only).
    `judge` (a PhoneJudge) adds its phone error rate on the source audio and on the output audio."""
    torch.set_num_threads(threads)
    sr_out = vocoder.sample_rate
    logmel = LogMel(vocoder.mel_config)
    per_utt, decoded, tokens_of = [], [], {}
    judged: dict[str, list] = {"ref": [], "src": [], "out": []}
    inventory = PhoneInventory(judge.config.phones) if judge is not None else None
    errs_src = errs_out = n_words = 0
    compute_s = audio_s = 0.0
    for r in tqdm(rows, desc="resynthesis", unit="utt"):
        src, sr = load_audio(corpus / r["audio"])
        if tokenizer is None:
            with torch.no_grad():
                mel = logmel(torch.from_numpy(resample(src, sr, sr_out)))
                t0 = time.perf_counter()
                out = vocoder.generator(mel)[0].numpy()
        else:
            with torch.no_grad():
                tokens = tokenizer.encode(src, sr).semantic.cpu().numpy()
            tokens_of[r["id"]] = tokens
            t0 = time.perf_counter()
            out, _ = vocoder.decode(tokens, voice=_voice_for(vocoder, r["speaker"]))
        compute_s += time.perf_counter() - t0
        audio_s += len(out) / sr_out
        item = {"id": r["id"], "speaker": r["speaker"], "text": r["text"], **f0_error(src, sr, out, sr_out)}
        if listener is not None:
            ref = normalize_text(r["text"])
            hyp_src, hyp_out = listener.transcribe(src, sr), listener.transcribe(out, sr_out)
            e_src, e_out = word_errors(ref, normalize_text(hyp_src)), word_errors(ref, normalize_text(hyp_out))
            errs_src, errs_out, n_words = errs_src + e_src, errs_out + e_out, n_words + len(ref)
            item.update(heard_source=hyp_src, heard_resynth=hyp_out, wer_source=e_src / max(len(ref), 1),
                        wer_resynth=e_out / max(len(ref), 1), words=len(ref), errors_source=e_src,
                        errors_resynth=e_out)
        if judge is not None:
            judged["ref"].append(inventory.encode(r.get("phonemes", "")))
            with torch.no_grad():
                judged["src"].append(logmel(torch.from_numpy(resample(src, sr, sr_out)))[0])
                judged["out"].append(logmel(torch.from_numpy(out))[0])
        per_utt.append(item)
        decoded.append((r, src, sr, out))

    def nanmed(key):
        vals = [u[key] for u in per_utt if np.isfinite(u[key])]
        return float(np.median(vals)) if vals else float("nan")

    result = {
        "mode": "copy-synthesis (generator only)" if tokenizer is None else "tokens -> flow -> generator",
        "utterances": len(rows),
        "audio_seconds": audio_s,
        "f0_err_st_median": nanmed("f0_err_st"),
        "f0_gross_err_median": nanmed("gross_err"),
        "voicing_decision_err_median": nanmed("vde"),
        "rtf_offline": compute_s / max(audio_s, 1e-9),
        "threads": threads,
    }
    if tokenizer is not None:  # the flow ran: record how it sampled
        result["flow_sampling"] = {k: getattr(vocoder.flow.config, k)
                                   for k in ("n_steps", "temperature", "guidance", "guidance_steps",
                                             "guidance_carry")}
    if listener is not None:
        result.update(wer_source=errs_src / max(n_words, 1), wer_resynth=errs_out / max(n_words, 1), words=n_words,
                      wer_by_voice=wer_by_voice(per_utt))

    if judge is not None:
        result.update(judge_per_source=judge_phone_error_rate(judge, judged["src"], judged["ref"]),
                      judge_per_resynth=judge_phone_error_rate(judge, judged["out"], judged["ref"]))
    if tokenizer is not None:
        picks = [r for r in rows if r["id"] in tokens_of][:n_timbre]
        result.update(_timbre_and_pitch(vocoder, [tokens_of[r["id"]] for r in picks], neutral_voice_f0(corpus)))
        result.update(_streaming(vocoder, [tokens_of[r["id"]] for r in rows][:n_stream]))
    if samples_dir is not None:
        write_samples(samples_dir, decoded[:4], vocoder, logmel, tokens_of)
    result["per_utterance"] = per_utt
    return result


def _timbre_and_pitch(vocoder: Vocoder, token_sets: list[np.ndarray], reference_f0: dict[str, float] | None = None
                      ) -> dict:
    """Per-voice F0 / spectral centroid and voice identification from decoded audio; requested pitch shifts
    (-4, -2, +2, +4 st) measured against the unshifted decode, for every voice of the bank. With `reference_f0`
    (each voice's own neutral F0, `neutral_voice_f0`), also how far each voice's decoded pitch lies from it: the
    tokens come from all speakers, so this shows whether the voice or the tokens set the pitch level."""
    sr = vocoder.sample_rate
    feats: dict[str, list[np.ndarray]] = {}
    table = {}
    shifts = []
    for voice in tqdm(vocoder.voices, desc="voices and pitch shifts", unit="voice"):
        wavs = [vocoder.decode(t, voice=voice)[0] for t in token_sets]
        feats[voice] = [timbre_features(w, sr) for w in wavs]
        f0s = [median_f0(w, sr) for w in wavs]
        ok = [f for f in f0s if np.isfinite(f)]
        table[voice] = {"median_f0_hz": float(np.mean(ok)) if ok else float("nan"),
                        "spectral_centroid_hz": float(np.mean([f[1] for f in feats[voice]]) * 1000)}
        for t, base in zip(token_sets, f0s):
            for st in (-4.0, -2.0, 2.0, 4.0):
                got = median_f0(vocoder.decode(t, voice=voice, pitch_st=st)[0], sr)
                shifts.append({"voice": voice, "requested_st": st, "measured_st": float(12 * np.log2(got / base))})

    def summary(items: list[dict]) -> tuple[float, float]:
        errs = np.array([abs(s["measured_st"] - s["requested_st"]) for s in items])
        errs = errs[np.isfinite(errs)]
        return (float(errs.mean()), float(np.mean(errs <= 1.0))) if len(errs) else (float("nan"), float("nan"))

    for voice in table:
        table[voice]["pitch_shift_abs_err_st"], table[voice]["pitch_shift_within_1st"] = summary(
            [s for s in shifts if s["voice"] == voice])
    mean_err, within = summary(shifts)
    joe_err, joe_within = summary([s for s in shifts if s["voice"] == "joe"])
    gaps = []
    for voice, row in table.items():
        ref = (reference_f0 or {}).get(voice)
        if ref and np.isfinite(row["median_f0_hz"]):
            row["reference_f0_hz"] = ref
            row["f0_vs_reference_st"] = float(12 * np.log2(row["median_f0_hz"] / ref))
            gaps.append(abs(row["f0_vs_reference_st"]))
    return {
        "voices": table,
        "f0_vs_reference_abs_st_mean": float(np.mean(gaps)) if gaps else float("nan"),
        "voice_id_accuracy": nearest_centroid_accuracy(feats),
        "voice_id_chance": 1.0 / len(feats),
        "pitch_shift": shifts,
        "pitch_shift_abs_err_st_mean": mean_err,
        "pitch_shift_within_1st": within,
        "pitch_shift_joe_abs_err_st_mean": joe_err,  # the figure reported before 2026-11-30 evening (joe only)
        "pitch_shift_joe_within_1st": joe_within,
    }


def stream_timed(vocoder: Vocoder, tokens: np.ndarray, push_size: int) -> tuple[np.ndarray, float, float | None]:
    """Stream `tokens` as the backbone would, `push_size` at a time, as joe -> (waveform, compute seconds of the
    pushes and the flush, compute seconds of the push that produced the first audio; None when only the flush did)."""
    stream = vocoder.stream(voice="joe")
    chunks, compute_s, first = [], 0.0, None
    for i in range(0, len(tokens), push_size):
        t0 = time.perf_counter()
        out = stream.push(tokens[i : i + push_size])
        dt = time.perf_counter() - t0
        compute_s += dt
        if out.size and first is None:
            first = dt
        chunks.append(out)
    t0 = time.perf_counter()
    chunks.append(stream.flush())
    compute_s += time.perf_counter() - t0
    return np.concatenate(chunks), compute_s, first


def _streaming(vocoder: Vocoder, token_sets: list[np.ndarray], push_size: int = 3) -> dict:
    """Streams each utterance as the backbone would (a few tokens at a time); compute time only."""
    rel, mel_db, reseeded_db, first_chunk_ms, compute_s, audio_s = [], [], [], [], 0.0, 0.0
    other_seed = vocoder.reseeded(vocoder.seed + 1)
    for t in tqdm(token_sets, desc="streaming", unit="utt"):
        offline, _ = vocoder.decode(t, voice="joe")
        # the model's own sampling variation: the same tokens decoded offline with other flow noise
        reseeded_db.append(logmel_distance_db(other_seed.decode(t, voice="joe")[0], offline, vocoder.sample_rate))
        wav, dt, first = stream_timed(vocoder, t, push_size)
        compute_s += dt
        audio_s += len(wav) / vocoder.sample_rate
        rel.append(float(np.linalg.norm(wav - offline) / max(np.linalg.norm(offline), 1e-9)))
        mel_db.append(logmel_distance_db(wav, offline, vocoder.sample_rate))
        if first is not None:
            first_chunk_ms.append(first * 1000)
    cfg = vocoder.stream_config
    return {
        "stream_rel_l2_vs_offline_max": float(np.max(rel)),
        "stream_rel_l2_vs_offline_median": float(np.median(rel)),
        "stream_logmel_db_vs_offline_median": float(np.median(mel_db)),
        "stream_logmel_db_vs_offline_max": float(np.max(mel_db)),
        "stream_logmel_db_tolerance": STREAM_MEL_TOLERANCE_DB,
        "offline_other_noise_logmel_db_median": float(np.median(reseeded_db)),
        "rtf_streaming": compute_s / max(audio_s, 1e-9),
        "first_chunk_compute_ms_median": float(np.median(first_chunk_ms)) if first_chunk_ms else float("nan"),
        "first_chunk_compute_ms_max": float(np.max(first_chunk_ms)) if first_chunk_ms else float("nan"),
        "first_chunk_audio_ms": cfg.first_chunk_tokens * 40,
        "first_chunk_tokens_needed": cfg.first_chunk_tokens + cfg.lookahead_tokens,
    }


def write_samples(out_dir: Path, decoded, vocoder: Vocoder, logmel: LogMel, tokens_of: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    sr_out = vocoder.sample_rate
    fig, axes = plt.subplots(len(decoded), 2, figsize=(14, 2.6 * len(decoded)), squeeze=False)
    for i, (r, src, sr, out) in enumerate(decoded):
        save_wav(out_dir / f"{i}_{r['id']}_original.wav", src, sr)
        save_wav(out_dir / f"{i}_{r['id']}_resynth.wav", out, sr_out)
        with torch.no_grad():
            m_src = logmel(torch.from_numpy(resample(src, sr, sr_out)))[0].numpy()
            m_out = logmel(torch.from_numpy(out))[0].numpy()
        for j, (m, name) in enumerate([(m_src, "original"), (m_out, "resynthesised")]):
            axes[i][j].imshow(m, origin="lower", aspect="auto", vmin=-11, vmax=2, cmap="magma")
            axes[i][j].set_title(f"{r['id']} ({r['speaker']}) {name}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "mels.png", dpi=80)
    plt.close(fig)
    if decoded and decoded[0][0]["id"] in tokens_of:
        tokens = tokens_of[decoded[0][0]["id"]]
        for voice in vocoder.voices:
            save_wav(out_dir / f"voice_{voice}.wav", vocoder.decode(tokens, voice=voice)[0], sr_out)
        for st in (-4.0, 4.0):
            save_wav(out_dir / f"pitch_{st:+.0f}st.wav", vocoder.decode(tokens, voice="joe", pitch_st=st)[0], sr_out)


def to_markdown(res: dict) -> str:
    lines = [f"mode: {res['mode']}, {res['utterances']} held-out NPC utterances, {res['audio_seconds']:.1f} s"]
    if "flow_sampling" in res:
        fs = res["flow_sampling"]
        lines.append(f"- flow: {fs['n_steps']} Euler steps, noise temperature {fs['temperature']}, "
                     f"guidance {fs['guidance']}" + (f" on the first {fs['guidance_steps']} step(s)"
                                                     + (", carried to the later ones" if fs.get("guidance_carry") else "")
                                                     if fs.get("guidance_steps") and fs["guidance"] else ""))
    if "wer_resynth" in res:
        lines.append(f"- WER (Whisper tiny.en): resynthesised {100 * res['wer_resynth']:.1f}% "
                     f"vs source audio {100 * res['wer_source']:.1f}% ({res['words']} words)")
        for voice, d in res.get("wer_by_voice", {}).items():
            lines.append(f"  - {voice}: resynthesised {100 * d['wer_resynth']:.1f}% vs source {100 * d['wer_source']:.1f}% "
                         f"({d['words']} words, {d['utterances']} utterances)")
    if "judge_per_resynth" in res:
        lines.append(f"- phone error rate, mel phone judge: resynthesised {100 * res['judge_per_resynth']:.1f}% vs "
                     f"source audio {100 * res['judge_per_source']:.1f}% (not independent of a flow trained with it)")
    lines.append(f"- F0 error vs source: median {res['f0_err_st_median']:.2f} st; gross (>2 st) "
                 f"{100 * res['f0_gross_err_median']:.1f}%; voicing decision error {100 * res['voicing_decision_err_median']:.1f}%")
    lines.append(f"- RTF offline ({res['threads']} threads): {res['rtf_offline']:.3f}")
    if "rtf_streaming" in res:
        lines.append(f"- RTF streaming: {res['rtf_streaming']:.3f}; first chunk compute median "
                     f"{res['first_chunk_compute_ms_median']:.0f} ms (max {res['first_chunk_compute_ms_max']:.0f} ms) "
                     f"for {res['first_chunk_audio_ms']} ms of audio after {res['first_chunk_tokens_needed']} tokens")
        ok = res["stream_logmel_db_vs_offline_max"] < res["stream_logmel_db_tolerance"]
        lines.append(f"- streaming vs offline log-mel distance: median {res['stream_logmel_db_vs_offline_median']:.2f} dB, "
                     f"max {res['stream_logmel_db_vs_offline_max']:.2f} dB (tolerance "
                     f"{res['stream_logmel_db_tolerance']:.1f} dB: {'met' if ok else 'missed'}; the same tokens decoded "
                     f"offline with other flow noise: {res['offline_other_noise_logmel_db_median']:.2f} dB)")
        lines.append(f"- streaming vs offline waveform relative L2: median {res['stream_rel_l2_vs_offline_median']:.4f}, "
                     f"max {res['stream_rel_l2_vs_offline_max']:.4f} (phase drift of the harmonic source; exact only "
                     "when chunks cover the receptive field)")
    if "voices" in res:
        lines.append(f"- pitch shift (-4/-2/+2/+4 st, all voices): mean abs error {res['pitch_shift_abs_err_st_mean']:.2f} st; "
                     f"{100 * res['pitch_shift_within_1st']:.0f}% within 1 st (joe alone: "
                     f"{res['pitch_shift_joe_abs_err_st_mean']:.2f} st, {100 * res['pitch_shift_joe_within_1st']:.0f}%)")
        lines.append(f"- voice identification from decoded audio (nearest centroid, leave-one-out): "
                     f"{100 * res['voice_id_accuracy']:.0f}% (chance {100 * res['voice_id_chance']:.0f}%)")
        gap = res.get("f0_vs_reference_abs_st_mean", float("nan"))
        if np.isfinite(gap):
            lines.append(f"- decoded pitch vs each voice's own neutral F0 (tokens of all speakers): mean abs "
                         f"{gap:.2f} st")
        lines.append("")
        lines.append("| voice | median F0 (Hz) | own neutral F0 (Hz) | spectral centroid (Hz) | pitch shift abs error (st) "
                     "| within 1 st |")
        lines.append("|---|---|---|---|---|---|")
        for v, row in res["voices"].items():
            own = f"{row['reference_f0_hz']:.0f}" if "reference_f0_hz" in row else "-"
            lines.append(f"| {v} | {row['median_f0_hz']:.0f} | {own} | {row['spectral_centroid_hz']:.0f} | "
                         f"{row['pitch_shift_abs_err_st']:.2f} | {100 * row['pitch_shift_within_1st']:.0f}% |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="npc-server eval vocoder", description=__doc__)
    p.add_argument("--corpus", type=Path, default=data_dir() / "corpus" / "default")
    p.add_argument("--tokenizer", type=Path, default=DEFAULT_MODEL_DIR / "tokenizer")
    p.add_argument("--vocoder", type=Path, default=DEFAULT_MODEL_DIR / "vocoder")
    p.add_argument("--n", type=int, default=30, help="held-out NPC utterances (English) to resynthesise")
    p.add_argument("--speakers", default="",
                   help="comma-separated voices to draw the utterances from (e.g. joe: the piper voice); default all")
    p.add_argument("--copy-synthesis", action="store_true", help="source mel -> generator only (no tokens, no flow)")
    p.add_argument("--no-whisper", action="store_true")
    p.add_argument("--phone-judge", type=Path, default=None,
                   help="also score phones with this mel phone judge (`train vocoder --stage judge`)")
    p.add_argument("--samples", type=Path, default=None, help="write listening samples + mels.png here")
    p.add_argument("--json", type=Path, default=REPO_ROOT / "runs" / "vocoder" / "eval.json")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timbre-utts", type=int, default=4,
                   help="utterances decoded with every voice and pitch shift (voice identification, pitch accuracy)")
    p.add_argument("--stream-utts", type=int, default=10, help="utterances streamed and compared with offline decoding")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale for the flow (default: the vocoder's config.json; > 0 needs a "
                        "flow trained with `train vocoder --cond-dropout`)")
    p.add_argument("--guidance-steps", type=int, default=None,
                   help="guide only the first N Euler steps (0 = all; default: the vocoder's config.json)")
    p.add_argument("--guidance-carry", action=argparse.BooleanOptionalAction, default=None,
                   help="with --guidance-steps N: later steps reuse the last guided step's guidance term (no extra "
                        "pass; default: the vocoder's config.json)")
    p.add_argument("--steps", type=int, default=None, help="Euler steps of the flow (default: the vocoder's config.json)")
    args = p.parse_args(argv)
    if min(args.n, args.timbre_utts, args.stream_utts) < 1:
        p.error("--n, --timbre-utts and --stream-utts must be at least 1")

    vocoder = Vocoder.from_pretrained(args.vocoder)
    try:
        vocoder.flow.set_sampling(n_steps=args.steps, guidance=args.guidance, guidance_steps=args.guidance_steps,
                                  guidance_carry=args.guidance_carry)
    except ValueError as e:
        p.error(str(e))
    args.corpus = require_corpus(args.corpus, "eval vocoder")  # after the argument checks, before any work
    tokenizer = None
    if not args.copy_synthesis:
        from npc_server.tokenizer import AudioTokenizer

        tokenizer = AudioTokenizer.from_pretrained(args.tokenizer)
        if hasattr(tokenizer, "eval"):
            tokenizer.eval()
    speakers = [v.strip() for v in args.speakers.split(",") if v.strip()]
    rows = heldout_rows(args.corpus, args.n, args.seed, speakers=speakers)
    listener = None if args.no_whisper else Listener(threads=args.threads)
    judge = PhoneJudge.from_pretrained(args.phone_judge) if args.phone_judge else None
    res = evaluate(vocoder, tokenizer, rows, args.corpus, listener, args.samples, n_timbre=args.timbre_utts,
                   threads=args.threads, judge=judge, n_stream=args.stream_utts)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=2))
    print(to_markdown(res))
    print(f"\nfull results: {args.json}")
    return 0
