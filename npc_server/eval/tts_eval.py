"""`npc-server eval tts`: how clearly the talker + vocoder speak held-out answer sentences, as an independent
listener (Whisper tiny.en) hears them.

For each held-out NPC utterance of the corpus (English, the talker's voices): the talker turns the text into
semantic tokens in the utterance's voice, emotion and speed, the vocoder renders them, and the listener's words are
scored against the text. On the same sentences two references are scored: the voice's own TTS audio from the
corpus (the floor) and the vocoder fed the audio tokenizer's tokens of that audio (what a perfect talker would
give this vocoder). Also: the spoken length against the source's (speed), the talker's compute per second of
speech and the first tokens' latency (1 thread).

  npc-server eval tts --talker models/default/talker --corpus /work/data/corpus/v2 --n 48
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from npc_server.audio.io import load_audio
from npc_server.eval.metrics import Listener, heldout_rows, normalize_text, word_errors
from npc_server.paths import DEFAULT_MODEL_DIR, REPO_ROOT, data_dir
from npc_server.talker import Sampling, Talker, TalkerStream, synthesize
from npc_server.talker.frontend import text_phones


def first_tokens_ms(talker: Talker, text: str, voice: str, sampling: Sampling, repeats: int = 3) -> float:
    """Compute from the first text arriving to the first tokens out, word by word as a thinker would push text
    (espeak included), best of `repeats`."""
    best = float("inf")
    for _ in range(repeats):
        stream = TalkerStream(talker, voice, sampling=sampling)
        t0 = time.perf_counter()
        for word in text.split():
            if stream.push_text(word + " ").size:
                break
        else:
            stream.finish()
        best = min(best, time.perf_counter() - t0)
    return 1000 * best


def speed_accuracy(talker: Talker, rows: list[dict], sampling: Sampling, speeds=(0.8, 1.25),
                   tolerance: float = 0.1) -> dict:
    """Requested speed vs spoken length: each sentence at speed 1 and at each of `speeds` (neutral emotion, its
    voice); a request is met when length(1) / length(s) is within `tolerance` of s."""
    ratios = []
    for r in rows:
        def frames(speed: float) -> int:
            tokens, _ = synthesize(talker, r["text"], r["speaker"], r["language"], "neutral", speed, r.get("accent"),
                                   sampling)
            return int(tokens.size)

        base = frames(1.0)
        ratios += [{"speed": s, "achieved": base / max(frames(s), 1)} for s in speeds]
    met = [abs(x["achieved"] / x["speed"] - 1) <= tolerance for x in ratios]
    return {"requests": len(ratios), "within": float(np.mean(met)) if met else float("nan"), "tolerance": tolerance,
            "ratios": ratios}


def evaluate(talker: Talker, vocoder, rows: list[dict], corpus: Path, listener: Listener | None,
             sampling: Sampling, tokens_dir: Path | None = None, samples: Path | None = None) -> dict:
    per_utt = []
    talker_s = vocoder_s = audio_s = 0.0
    for r in tqdm(rows, desc="talker", unit="utt"):
        c = r.get("controls") or {}
        emotion, speed = c.get("emotion", "neutral"), float(c.get("speed", 1.0))
        pitch = vocoder.request_pitch(float(c.get("pitch_st", 0.0)), emotion)
        phones = text_phones(r["text"], r["language"], r.get("accent"))
        t0 = time.perf_counter()
        stream = TalkerStream(talker, r["speaker"], r["language"], emotion, speed, r.get("accent"), sampling)
        tokens = np.concatenate([stream.push(phones), stream.finish()])
        t1 = time.perf_counter()
        wav, sr = vocoder.decode(tokens, voice=r["speaker"], pitch_st=pitch)
        t2 = time.perf_counter()
        talker_s, vocoder_s, audio_s = talker_s + t1 - t0, vocoder_s + t2 - t1, audio_s + len(wav) / sr
        src, src_sr = load_audio(corpus / r["audio"])
        item = {"id": r["id"], "speaker": r["speaker"], "text": r["text"], "emotion": emotion, "speed": speed,
                "frames": int(tokens.size), "source_seconds": len(src) / src_sr, "seconds": len(wav) / sr}
        if listener is not None:
            ref = normalize_text(r["text"])
            heard = {"talker": listener.transcribe(wav, sr), "source": listener.transcribe(src, src_sr)}
            if tokens_dir is not None and (tokens_dir / f"{r['id']}.npz").is_file():
                with np.load(tokens_dir / f"{r['id']}.npz") as z:
                    gt, _ = vocoder.decode(z["semantic"].astype(np.int64), voice=r["speaker"], pitch_st=pitch)
                heard["resynth"] = listener.transcribe(gt, sr)
            item.update(words=len(ref), heard=heard,
                        errors={k: word_errors(ref, normalize_text(v)) for k, v in heard.items()})
        if samples is not None:
            import soundfile as sf

            samples.mkdir(parents=True, exist_ok=True)
            sf.write(samples / f"{r['id']}_{r['speaker']}_talker.wav", wav, sr)
        per_utt.append(item)
    result: dict = {"utterances": len(rows), "audio_seconds": round(audio_s, 1),
                    "talker_rtf": talker_s / max(audio_s, 1e-9), "vocoder_rtf_offline": vocoder_s / max(audio_s, 1e-9),
                    "length_ratio_median": float(np.median([u["seconds"] / u["source_seconds"] for u in per_utt])),
                    "sampling": sampling.__dict__}
    if listener is not None:
        result["wer"] = wer_table(per_utt)
    if rows:
        result["speed"] = speed_accuracy(talker, rows[:8], sampling)
        result["first_tokens_ms"] = first_tokens_ms(talker, rows[0]["text"], rows[0]["speaker"], sampling)
    result["per_utterance"] = per_utt
    return result


def spoken_answers(talker: Talker, vocoder, listener: Listener, answers: list[dict], sampling: Sampling,
                   progress: bool = True) -> dict:
    """Speak answer subtitles (dicts with text, voice, language, accent, controls) with the talker + vocoder and
    score what the listener hears against the subtitle: WER per voice (English voices only: the listener is
    Whisper tiny.en)."""
    per_utt = []
    for a in tqdm(answers, desc="speak", unit="answer", disable=not progress):
        if a["language"] != "en" or not a["text"].strip() or a["voice"] not in talker.cfg.voices:
            continue
        c = a.get("controls") or {}
        emotion = c.get("emotion", "neutral")
        stream = TalkerStream(talker, a["voice"], "en", emotion, float(c.get("speed", 1.0)), a.get("accent"), sampling)
        tokens = np.concatenate([stream.push_text(a["text"]), stream.finish()])
        wav, sr = vocoder.decode(tokens, voice=a["voice"],
                                 pitch_st=vocoder.request_pitch(float(c.get("pitch_st", 0.0)), emotion))
        ref = normalize_text(a["text"])
        heard = listener.transcribe(wav, sr)
        per_utt.append({"id": a.get("id"), "speaker": a["voice"], "text": a["text"], "words": len(ref),
                        "heard": {"talker": heard}, "errors": {"talker": word_errors(ref, normalize_text(heard))},
                        "seconds": len(wav) / sr})
    return {"answers": len(per_utt), "wer": wer_table(per_utt) if per_utt else {}, "per_answer": per_utt}


def wer_table(per_utt: list[dict]) -> dict[str, dict[str, float]]:
    """WER per voice (and "all") for each audio kind: talker, source (the floor), resynth (ground-truth tokens)."""
    table: dict[str, dict[str, list[int]]] = {}
    for u in per_utt:
        for voice in (u["speaker"], "all"):
            d = table.setdefault(voice, {})
            for kind, e in u["errors"].items():
                errs, words = d.get(kind, [0, 0])
                d[kind] = [errs + e, words + u["words"]]
    return {v: {k: round(e / max(w, 1), 4) for k, (e, w) in d.items()} | {"words": d["talker"][1]}
            for v, d in sorted(table.items())}


def to_markdown(res: dict) -> str:
    lines = [f"talker + vocoder on {res['utterances']} held-out NPC sentences ({res['audio_seconds']} s of speech)", ""]
    if "wer" in res:
        lines += ["| voice | words | WER talker | WER source audio (floor) | WER vocoder on true tokens |",
                  "|---|---|---|---|---|"]
        for v, d in res["wer"].items():
            pct = lambda k: f"{100 * d[k]:.1f}%" if k in d else "-"
            lines.append(f"| {v} | {d['words']} | {pct('talker')} | {pct('source')} | {pct('resynth')} |")
        lines.append("")
    if "speed" in res:
        sp = res["speed"]
        lines.append(f"- requested speed met within {100 * sp['tolerance']:.0f}%: {100 * sp['within']:.0f}% of "
                     f"{sp['requests']} requests (speeds 0.8 / 1.25 against 1.0, by spoken length)")
    lines += [f"- spoken length / source length, median: {res['length_ratio_median']:.2f}",
              f"- talker RTF (offline, this process's threads): {res['talker_rtf']:.3f}; vocoder offline RTF "
              f"{res['vocoder_rtf_offline']:.3f}",
              f"- first tokens after the first words: {res.get('first_tokens_ms', float('nan')):.0f} ms of compute"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from npc_server.vocoder import Vocoder

    p = argparse.ArgumentParser(prog="npc-server eval tts", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--talker", type=Path, default=DEFAULT_MODEL_DIR / "talker")
    p.add_argument("--vocoder", type=Path, default=DEFAULT_MODEL_DIR / "vocoder")
    p.add_argument("--corpus", type=Path, default=data_dir() / "corpus" / "default")
    p.add_argument("--tokens", type=Path, default=None,
                   help="audio-token cache for the ground-truth resynthesis reference (default <corpus>/tokens)")
    p.add_argument("--tokenizer", type=Path, default=DEFAULT_MODEL_DIR / "tokenizer",
                   help="audio tokenizer of the ground-truth tokens (fills the cache where it lacks the sentences)")
    p.add_argument("--n", type=int, default=48, help="held-out English NPC utterances")
    p.add_argument("--speakers", default="", help="comma-separated voices (default: the talker's English voices)")
    p.add_argument("--temperature", type=float, default=Sampling.temperature, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=Sampling.top_k)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-whisper", action="store_true")
    p.add_argument("--samples", type=Path, default=None, help="write the talker's wavs here")
    p.add_argument("--json", type=Path, default=REPO_ROOT / "runs" / "talker" / "eval.json")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error("--n must be at least 1")
    torch.set_num_threads(args.threads)
    corpus = args.corpus.expanduser()
    if not (corpus / "manifest.jsonl").is_file():
        raise SystemExit(f"npc-server eval tts: no corpus at {corpus} (run `npc-server train corpus` or pass --corpus)")
    talker = Talker.from_pretrained(args.talker)
    vocoder = Vocoder.from_pretrained(args.vocoder)
    speakers = [v.strip() for v in args.speakers.split(",") if v.strip()] or [
        v for v in talker.cfg.voices if v in vocoder.voices]
    rows = heldout_rows(corpus, args.n, args.seed, english_only=True, speakers=speakers)
    tokens_dir = (args.tokens or corpus / "tokens").expanduser()
    listener = None
    if not args.no_whisper:
        from npc_server.training.tts import cache_tokens

        cache_tokens(corpus, tokens_dir, rows, args.tokenizer)
        listener = Listener(threads=args.threads)
    res = evaluate(talker, vocoder, rows, corpus, listener, Sampling(args.temperature, args.top_k, args.seed),
                   tokens_dir, args.samples)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=2, ensure_ascii=False))
    print(to_markdown(res))
    print(f"\nfull results: {args.json}")
    return 0
