"""`npc-server bench`: latency of the whole answer path through a live gRPC server, per stage, under concurrency,
with session (KV-cache) reuse, and side by side with the cascade a user would build instead (ASR -> TTS)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from npc_server.audio import load_audio
from npc_server.paths import DEFAULT_MODEL_DIR, DEFAULT_PERSONAS_DIR
from npc_server.service.api import Limits

QUESTIONS = [
    ("en-us", "Good evening! How much does a room for the night cost here?"),
    ("en-gb", "Excuse me, could you tell me how to get to the old mill?"),
    ("en-gb-scotland", "I have three apples and I buy four more. How many do I have?"),
    ("en-us+m3", "What is the price of an iron sword at your smithy?"),
    ("en-gb-x-rp+f2", "Is there any news from the north gate today?"),
    ("en-us+f3", "Who runs the bakery on the market square, and what does she sell?"),
]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values), q))


def make_questions(folder: Path, seconds: float = 3.0) -> list[Path]:
    """Real spoken questions (espeak-ng voices/accents), trimmed or padded with silence to `seconds`."""
    from npc_server.audio import resample, save_wav

    out = []
    for i, (voice, text) in enumerate(QUESTIONS):
        raw = folder / f"raw{i}.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", "190", "-w", str(raw), text], check=True, capture_output=True)
        wav, sr = load_audio(raw)
        wav = resample(wav, sr, 16000)
        n = int(seconds * 16000)
        wav = np.pad(wav, (0, max(0, n - len(wav))))[:n]
        path = folder / f"q{i}.wav"
        save_wav(path, wav, 16000)
        out.append(path)
    return out


@dataclass
class Run:
    ttfa_ms: float
    gaps_ms: list[float]
    underruns: int  # chunks that arrived after the audio before them had finished playing
    audio_s: float
    total_ms: float
    timings: dict = field(default_factory=dict)


def ask(client, npc: str, wav: np.ndarray, session: str = "", realtime: bool = False) -> Run:
    """One question through the SDK, timed on the client: from the last audio chunk sent to each audio chunk.
    `realtime`: the question's audio is sent at the pace it is spoken (a live microphone)."""
    from sdk import AudioEvent, EndEvent

    speech = client.speak(npc, wav, sample_rate=16000, session=session, realtime=realtime)
    arrivals: list[tuple[float, float]] = []  # (time, seconds of audio)
    end = None
    for ev in speech:
        if isinstance(ev, AudioEvent):
            arrivals.append((time.perf_counter(), len(ev.pcm) / 2 / ev.sample_rate))
        elif isinstance(ev, EndEvent):
            end = ev
    if end is None or not arrivals:
        raise RuntimeError("answer had no audio")
    # time to first audio is the server's figure: from the end of the question (the client's half-close) to the
    # first audio chunk leaving; the gaps and underruns are measured where the client receives the chunks
    gaps = [(b[0] - a[0]) * 1000 for a, b in zip(arrivals, arrivals[1:])]
    play_end = arrivals[0][0] + arrivals[0][1]
    underruns = 0
    for t, dur in arrivals[1:]:
        if t > play_end:
            underruns += 1
            play_end = t
        play_end += dur
    return Run(end.timings["time_to_first_audio_ms"], gaps, underruns, end.audio_seconds, end.timings["total_ms"],
               end.timings)


def cascade_baseline(questions: list[Path], answer_text: str, threads: int) -> dict:
    """faster-whisper tiny.en ASR + piper (joe) TTS: time to first audio with no LLM at all (a lower bound)."""
    from npc_server.eval.metrics import Listener
    from npc_server.training.corpus.render import PiperEngine

    whisper = Listener(threads=threads)
    piper = PiperEngine(threads=threads)
    asr_ms, tts_first_ms, tts_rtf = [], [], []
    for path in questions:
        wav, _ = load_audio(path, target_sr=16000)
        t0 = time.perf_counter()
        whisper.transcribe(wav, 16000)
        t1 = time.perf_counter()
        first = None
        n = 0
        for chunk in piper.voice.synthesize(answer_text):
            if first is None:
                first = time.perf_counter()
            n += len(chunk.audio_float_array)
        t2 = time.perf_counter()
        asr_ms.append((t1 - t0) * 1000)
        tts_first_ms.append((first - t1) * 1000)
        tts_rtf.append((t2 - t1) / (n / piper.voice.config.sample_rate))
    first_audio = [a + b for a, b in zip(asr_ms, tts_first_ms)]
    return {"asr_ms_p50": pct(asr_ms, 50), "tts_first_audio_ms_p50": pct(tts_first_ms, 50),
            "first_audio_ms_p50": pct(first_audio, 50), "first_audio_ms_p95": pct(first_audio, 95),
            "tts_rtf": statistics.mean(tts_rtf)}


def memory_mb(pid: int | str = "self") -> tuple[float, float]:
    """(resident now, peak resident) of a process in MB, from Linux /proc (nan, nan elsewhere)."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError):
        return float("nan"), float("nan")


def recompute_history(engine, session) -> tuple[float, int]:
    """What a follow-up would cost without the session's KV cache: prefill the whole conversation again."""
    from transformers import DynamicCache

    if getattr(engine, "thinker", None) is not None:  # model v2: a fresh thinker session of the same kind
        from npc_server.backbone.thinker import LeanSession, ThinkerSession

        fresh = LeanSession(session.lean) if isinstance(session, LeanSession) else ThinkerSession(session.model)
        t0 = time.perf_counter()
        fresh.prefill(list(session.ids))
        return (time.perf_counter() - t0) * 1000, len(session.ids)
    ids = session.ids + list(session.pending)
    fresh = type(session)(system=session.system, cache=DynamicCache(config=engine.generator.model.config))
    t0 = time.perf_counter()
    engine.generator.prefill(fresh, ids)
    return (time.perf_counter() - t0) * 1000, len(ids)


def speculative_figures(generator, prompts: list, sampling, mode=None) -> dict:
    """Decode speed of the same answers with and without the generator's draft model (alternating, fresh
    sessions), the draft's acceptance rate, and whether greedy answers came out identical.
    `prompts`: (SystemPrompt, UserTurn) pairs."""
    from npc_server.backbone.template import Mode

    if generator.speculative is None:
        raise ValueError("the generator has no draft model")
    mode = mode or Mode.AUDIO_TEXT
    sums = {False: [0, 0.0], True: [0, 0.0]}  # tokens, decode seconds
    passes = {False: 0, True: 0}
    proposed = accepted = audio_tokens = 0
    identical = True
    for system, user in prompts:
        ids = {}
        for spec in (False, True):
            end = generator.generate(generator.start_session(system), user, mode, sampling, speculative=spec)
            sums[spec][0] += end.generated_tokens
            sums[spec][1] += end.decode_s
            passes[spec] += end.stats.target_forwards
            ids[spec] = end.ids
            if spec:
                proposed += end.stats.proposed
                accepted += end.stats.accepted
                audio_tokens += len(end.audio)
        identical &= ids[False] == ids[True]
    plain_tps = sums[False][0] / max(sums[False][1], 1e-9)
    spec_tps = sums[True][0] / max(sums[True][1], 1e-9)
    return {"answers": len(prompts), "draft_k": generator.speculative.k, "temperature": sampling.temperature,
            "acceptance_rate": accepted / proposed if proposed else float("nan"),
            "accepted_per_audio_token": accepted / audio_tokens if audio_tokens else float("nan"),
            "tokens_per_s_plain": plain_tps, "tokens_per_s_speculative": spec_tps, "speedup": spec_tps / plain_tps,
            "backbone_passes_plain": passes[False], "backbone_passes_speculative": passes[True],
            "greedy_identical": identical if sampling.temperature == 0 else None}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="npc-server bench", description=__doc__)
    ap.add_argument("--model-dir", default=str(DEFAULT_MODEL_DIR))
    ap.add_argument("--model", choices=("auto", "v1", "v2"), default="auto",
                    help="the answer path to measure, as `serve --model` (v2: thinker -> talker -> vocoder; auto: v2 "
                         "when --model-dir has its parts)")
    ap.add_argument("--personas", default=str(DEFAULT_PERSONAS_DIR))
    ap.add_argument("--npc", default="innkeeper")
    ap.add_argument("--repeats", type=int, default=2, help="passes over the question set (default 2)")
    ap.add_argument("--clients", "--concurrency", dest="concurrency", default="1,2,4", metavar="N,N,...",
                    help="numbers of clients asking at once to try (default 1,2,4)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per op of the server (default 1, as serve)")
    ap.add_argument("--workers", type=int, default=4, help="answer threads of the server (default 4, as serve)")
    ap.add_argument("--batch-lanes", type=int, default=2, help="decode batches at once (default 2, as serve)")
    ap.add_argument("--playing-answers", type=int, default=Limits.playing_answers,
                    help=f"answers generated at once, the rest wait in line (default {Limits.playing_answers}, as "
                         "serve; 0 = no limit)")
    ap.add_argument("--no-cascade", action="store_true", help="skip the ASR -> TTS baseline")
    ap.add_argument("--realtime-questions", action="store_true",
                    help="send each question's audio at the pace it is spoken, in 100 ms chunks, as a live microphone "
                         "does (the server works on it while it arrives; time to first audio counts from its end)")
    ap.add_argument("--buffered-lookahead", type=int, default=None, metavar="TOKENS",
                    help="the vocoder stream's buffered lookahead (default: its config.json; see `serve --help`)")
    ap.add_argument("--no-draft", action="store_true",
                    help="serve without <model-dir>/draft (no speculative decoding) and skip its comparison")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    if args.buffered_lookahead is not None and args.buffered_lookahead < 0:
        ap.error(f"--buffered-lookahead is a number of tokens, at least 0; got {args.buffered_lookahead}")
    try:
        clients = [int(x) for x in args.concurrency.split(",") if x.strip()]
    except ValueError:
        clients = []
    if args.playing_answers < 0:
        ap.error(f"--playing-answers is a number of answers, 0 for no limit; got {args.playing_answers}")
    if not clients or min(clients) < 1:
        ap.error(f"--clients is a comma-separated list of numbers >= 1, e.g. 1,2,4; got {args.concurrency!r}")

    from npc_server.backbone.template import UserTurn
    from npc_server.engine import Engine
    from npc_server.personas import PersonaStore
    from npc_server.service.core import NpcService
    from npc_server.service.grpc_server import start_grpc
    from npc_server.engine_v2 import pick_model
    from sdk import NpcClient, NpcError

    args.model = pick_model(args.model, args.model_dir)
    try:
        if args.model == "v2":
            from npc_server.engine_v2 import EngineV2

            engine = EngineV2.from_pretrained(args.model_dir, threads=args.threads)
        else:
            engine = Engine.from_pretrained(args.model_dir, threads=args.threads, draft=not args.no_draft,
                                            buffered_lookahead=args.buffered_lookahead)
    except FileNotFoundError as exc:
        print(f"npc-server bench: {exc}")
        return 2
    service = NpcService(engine, PersonaStore(args.personas), Limits(playing_answers=args.playing_answers),
                         workers=args.workers, batch_lanes=args.batch_lanes)
    server, port = start_grpc(service, "127.0.0.1", 0)
    target = f"127.0.0.1:{port}"
    generator = getattr(engine, "generator", None)  # v1 only: the AQAA backbone's generator
    results: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or ''}".strip(", "),
                     "model": engine.name, "npc": args.npc,
                     "draft": generator is not None and generator.speculative is not None,
                     "workers": args.workers, "threads": args.threads, "batch_lanes": args.batch_lanes,
                     "fast_path": generator is not None and generator.fast is not None,
                     "questions_sent": "at the pace spoken" if args.realtime_questions else "at once"}
    rt = args.realtime_questions
    with tempfile.TemporaryDirectory() as tmp:
        questions = make_questions(Path(tmp))
        wavs = [load_audio(q, target_sr=16000)[0] for q in questions]
        with NpcClient(target, client_id="bench") as client:
            ask(client, args.npc, wavs[0])  # warm-up
            runs = [ask(client, args.npc, w, realtime=rt) for _ in range(args.repeats) for w in wavs]
            # follow-up turns in one session (KV cache reused) vs the same turn as a fresh one-shot question
            sid = client.open_session(args.npc)
            ask(client, args.npc, wavs[0], session=sid, realtime=rt)
            follow = [ask(client, args.npc, w, session=sid, realtime=rt) for w in wavs[1:4]]
            history = service.sessions.get(sid, "bench").state.session
            recompute_ms, history_tokens = recompute_history(engine, history)
            client.close_session(sid)
        ttfa = [r.ttfa_ms for r in runs]
        gaps = [g for r in runs for g in r.gaps_ms]
        audio_s = sum(r.audio_s for r in runs)
        stage = lambda key: sum(r.timings[key] for r in runs) / 1000
        gen_tokens = sum(r.timings["generated_tokens"] for r in runs)
        results["single"] = {
            "questions": len(runs), "question_seconds": 3.0,
            "ttfa_ms_p50": pct(ttfa, 50), "ttfa_ms_p95": pct(ttfa, 95),
            "gap_ms_p50": pct(gaps, 50), "gap_ms_p95": pct(gaps, 95),
            "underruns": sum(r.underruns for r in runs),
            "rtf_total": sum(r.total_ms for r in runs) / 1000 / audio_s,
            "rtf_tokenizer": stage("tokenize_ms") / (3.0 * len(runs)),
            "prefill_ms_p50": pct([r.timings["prefill_ms"] for r in runs], 50),
            "prefill_ahead_ms_p50": pct([r.timings.get("prefill_ahead_ms", 0.0) for r in runs], 50),
            "decode_tokens_per_s": gen_tokens / max(stage("decode_ms"), 1e-9),
            "rtf_vocoder": stage("vocoder_ms") / audio_s,
            "rtf_talker": stage("talker_ms") / audio_s,
            "answer_seconds_mean": audio_s / len(runs),
        }
        results["session_reuse"] = {
            "prefill_tokens_oneshot": statistics.mean(r.timings["prefill_tokens"] for r in runs),
            "prefill_tokens_followup": statistics.mean(r.timings["prefill_tokens"] for r in follow),
            "prefill_ms_oneshot_p50": pct([r.timings["prefill_ms"] for r in runs], 50),
            "prefill_ms_followup_p50": pct([r.timings["prefill_ms"] for r in follow], 50),
            "history_tokens": history_tokens,
            "recompute_history_ms": recompute_ms,
        }
        conc = {}
        for n in clients:
            out: list[Run] = []
            lock = threading.Lock()
            refused: list[str] = []

            def worker(i: int) -> None:
                try:
                    with NpcClient(target, client_id=f"bench{i}") as c:
                        r = ask(c, args.npc, wavs[i % len(wavs)], realtime=rt)
                except NpcError as exc:  # a busy server refuses clearly (RESOURCE_EXHAUSTED): counted, not fatal
                    with lock:
                        refused.append(exc.code)
                    return
                with lock:
                    out.append(r)

            threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            conc[n] = {"ttfa_ms_p50": pct([r.ttfa_ms for r in out], 50), "underruns": sum(r.underruns for r in out),
                       "realtime": all(r.underruns == 0 for r in out), "refused": sorted(refused),
                       "queued_ms_max": max([r.timings.get("queued_ms", 0.0) for r in out], default=0.0),
                       "audio_s_per_wall_s": sum(r.audio_s for r in out) / wall}
        results["concurrency"] = conc
        # the server runs in this process: its peak resident memory bounds the server's at the highest concurrency
        results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        results["rss_mb"] = memory_mb()[0]
        batcher = getattr(generator, "batcher", None) or getattr(engine, "batcher", None)  # v1 or v2
        if batcher is not None and batcher.stats.steps:
            st = batcher.stats
            results["batching"] = {"steps": st.steps, "mean_batch": st.requests / st.steps, "max_batch": st.max_batch,
                                   "sizes": {str(k): v for k, v in sorted(st.sizes.items())}}
        if generator is not None and generator.speculative is not None:
            persona = service.personas.get(args.npc)
            system = engine.system_prompt(persona)
            prompts = [(system, UserTurn(audio=engine.tokenizer.encode(w, 16000).interleaved)) for w in wavs]
            sampling = replace(engine.sampling, max_new_tokens=min(engine.sampling.max_new_tokens,
                                                                   int(persona.max_answer_seconds * 45) + 16))
            results["speculative"] = speculative_figures(engine.generator, prompts, sampling)
        if not args.no_cascade:
            results["cascade"] = cascade_baseline(questions, "A room for the night costs five gold.",
                                                  os.cpu_count() or 2)  # the baseline gets every core
            results["ratio_ttfa_ours_over_cascade"] = results["single"]["ttfa_ms_p50"] / results["cascade"]["first_audio_ms_p50"]
    server.stop(0).wait()  # let the handler threads finish before the interpreter exits
    service.shutdown()
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def print_table(r: dict) -> None:
    s = r["single"]
    print(f"\nnpc-server bench — {r['model']} — npc {r['npc']} — {r['machine']} — "
          f"{r['workers']} workers x {r['threads']} thread(s), {r['batch_lanes']} batch lane(s), "
          f"fast path {'on' if r['fast_path'] else 'off'}, questions sent {r.get('questions_sent', 'at once')}")
    print(f"{'metric':<44}{'value':>12}")
    rows = [
        ("time to first audio p50 / p95 (ms)", f"{s['ttfa_ms_p50']:.0f} / {s['ttfa_ms_p95']:.0f}"),
        ("time between chunks p50 / p95 (ms)", f"{s['gap_ms_p50']:.0f} / {s['gap_ms_p95']:.0f}"),
        ("playback underruns (all answers)", f"{s['underruns']}"),
        ("RTF whole path", f"{s['rtf_total']:.3f}"),
        ("RTF tokenizer (per s of question)", f"{s['rtf_tokenizer']:.4f}"),
        ("prefill after the question p50 (ms)", f"{s['prefill_ms_p50']:.0f}"),
        ("prefill while it arrived p50 (ms)", f"{s.get('prefill_ahead_ms_p50', 0.0):.0f}"),
        ("decode (tokens/s)", f"{s['decode_tokens_per_s']:.0f}"),
        ("RTF vocoder", f"{s['rtf_vocoder']:.3f}"),
        ("RTF talker (model v2; decode is then the thinker's alone)", f"{s.get('rtf_talker', 0.0):.3f}"),
        ("mean answer length (s)", f"{s['answer_seconds_mean']:.2f}"),
    ]
    u = r["session_reuse"]
    rows += [
        ("prefill tokens one-shot / follow-up", f"{u['prefill_tokens_oneshot']:.0f} / {u['prefill_tokens_followup']:.0f}"),
        ("prefill ms one-shot / follow-up", f"{u['prefill_ms_oneshot_p50']:.0f} / {u['prefill_ms_followup_p50']:.0f}"),
        (f"follow-up without KV cache ({u['history_tokens']} tok, ms)", f"{u['recompute_history_ms']:.0f}"),
    ]
    if "speculative" in r:
        sp = r["speculative"]
        rows += [
            (f"speculative: draft acceptance (k={sp['draft_k']})", f"{sp['acceptance_rate']:.2f}"),
            ("decode tokens/s without / with draft", f"{sp['tokens_per_s_plain']:.0f} / {sp['tokens_per_s_speculative']:.0f}"),
            ("speculative decode speedup", f"{sp['speedup']:.2f}x"),
        ]
    for n, c in r["concurrency"].items():
        verdict = "yes" if c["realtime"] else f"no ({c['underruns']} underruns)"
        if c.get("queued_ms_max", 0.0) >= 20.0:  # below that it is the round robin's turn-taking, not a line
            verdict += f", waited in line up to {c['queued_ms_max']:.0f} ms"
        if c.get("refused"):
            verdict += f", {len(c['refused'])} refused ({', '.join(sorted(set(c['refused'])))})"
        rows.append((f"{n} concurrent: TTFA p50 ms, real time?", f"{c['ttfa_ms_p50']:.0f}, {verdict}"))
    if "peak_rss_mb" in r:
        rows.append(("peak memory, server in the bench process (MB)", f"{r['peak_rss_mb']:.0f}"))
    if "rss_mb" in r:
        rows.append(("memory after the concurrent runs (MB)", f"{r['rss_mb']:.0f}"))
    if "batching" in r:
        b = r["batching"]
        rows.append(("decode steps batched: mean / max batch", f"{b['mean_batch']:.2f} / {b['max_batch']}"))
    if "cascade" in r:
        c = r["cascade"]
        rows += [
            ("cascade ASR p50 (ms)", f"{c['asr_ms_p50']:.0f}"),
            ("cascade TTS first audio p50 (ms)", f"{c['tts_first_audio_ms_p50']:.0f}"),
            ("cascade first audio p50 / p95 (ms)", f"{c['first_audio_ms_p50']:.0f} / {c['first_audio_ms_p95']:.0f}"),
            ("ours / cascade time to first audio", f"{r['ratio_ttfa_ours_over_cascade']:.2f}"),
        ]
    for name, value in rows:
        print(f"{name:<44}{value:>12}")
