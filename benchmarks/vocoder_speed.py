"""Compute cost of a vocoder's flow settings: offline and streaming real-time factor and first-chunk compute time.

Timing only (no listener): held-out NPC utterances' semantic tokens from the corpus token cache
(<corpus>/tokens/<id>.npz) are decoded offline and streamed `--push` tokens at a time, as the backbone feeds them.
Each utterance is timed `--repeats` times in a row and its fastest time counts, so a busy moment of the machine does
not.
Settings are S:T[:W[:G[c]]]: S Euler steps, noise temperature T, classifier-free guidance W on the first G steps
(G 0 or absent = all steps; a trailing c carries the last guided step's term to the later steps, `guidance_carry`;
W > 0 needs a flow trained with `train vocoder --cond-dropout`). Run it on an idle machine.

    python -m benchmarks.vocoder_speed --vocoder runs/voc14/export --settings 3:0.667 3:0.667:0.7 3:0.667:0.7:1c --threads 1
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from npc_server.paths import DEFAULT_MODEL_DIR, data_dir


def parse_setting(text: str) -> dict:
    """"S:T[:W[:G[c]]]" -> set_sampling keyword arguments."""
    parts = text.split(":")
    if not 2 <= len(parts) <= 4:
        raise ValueError(f"setting {text!r}: expected steps:temperature[:guidance[:guided_steps[c]]]")
    parts += ["0"] * (4 - len(parts))
    try:
        return {"n_steps": int(parts[0]), "temperature": float(parts[1]), "guidance": float(parts[2]),
                "guidance_steps": int(parts[3].removesuffix("c")), "guidance_carry": parts[3].endswith("c")}
    except ValueError:
        raise ValueError(f"setting {text!r}: expected steps:temperature[:guidance[:guided_steps[c]]]") from None


def heldout_tokens(corpus: Path, n: int, seed: int) -> list[tuple[dict, np.ndarray]]:
    """`n` held-out NPC utterances that have cached semantic tokens (<corpus>/tokens/<id>.npz), with those tokens."""
    from npc_server.eval.metrics import heldout_rows

    rows = [r for r in heldout_rows(corpus, 10 * n, seed) if (corpus / "tokens" / f"{r['id']}.npz").is_file()][:n]
    picks = []
    for r in rows:
        with np.load(corpus / "tokens" / f"{r['id']}.npz") as z:
            picks.append((r, z["semantic"].astype(np.int64)))
    return picks


def time_setting(vocoder, token_sets: list[np.ndarray], push: int, repeats: int) -> dict:
    """Each utterance decoded offline and streamed `repeats` times in a row; its fastest time of each counts, so a busy
    moment of the machine does not. -> offline and streamed compute seconds, audio seconds, first-chunk times (ms)."""
    from npc_server.eval.vocoder_eval import stream_timed

    offline_s, stream_s, audio_s, first_ms = 0.0, 0.0, 0.0, []
    for t in token_sets:
        offline, streamed, first = [], [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            wav, sr = vocoder.decode(t, voice="joe")
            offline.append(time.perf_counter() - t0)
            _, dt, first_s = stream_timed(vocoder, t, push)
            streamed.append(dt)
            if first_s is not None:
                first.append(first_s * 1000)
        offline_s, stream_s, audio_s = offline_s + min(offline), stream_s + min(streamed), audio_s + len(wav) / sr
        if first:
            first_ms.append(min(first))
    return {"offline_s": offline_s, "stream_s": stream_s, "audio_s": audio_s, "first_ms": first_ms}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocoder", type=Path, default=DEFAULT_MODEL_DIR / "vocoder")
    ap.add_argument("--corpus", type=Path, default=data_dir() / "corpus" / "default")
    ap.add_argument("--settings", nargs="+", default=["3:0.667"], help="S:T[:W[:G[c]]] flow settings (see above)")
    ap.add_argument("--n", type=int, default=8, help="held-out utterances")
    ap.add_argument("--push", type=int, default=5, help="tokens pushed into the stream at a time")
    ap.add_argument("--repeats", type=int, default=3,
                    help="times each utterance is decoded per setting; its fastest counts")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    try:
        settings = [(s, parse_setting(s)) for s in args.settings]
    except ValueError as e:
        ap.error(str(e))
    if min(args.n, args.push, args.repeats) < 1:
        ap.error("--n, --push and --repeats must be at least 1")

    from npc_server.vocoder import Vocoder

    torch.set_num_threads(args.threads)
    vocoder = Vocoder.from_pretrained(args.vocoder)
    for name, kwargs in settings:
        try:  # refuse a bad setting before any timing
            vocoder.flow.set_sampling(**kwargs)
        except ValueError as e:
            ap.error(f"setting {name}: {e}")
    token_sets = [tokens for _, tokens in heldout_tokens(args.corpus, args.n, args.seed)]
    if not token_sets:
        ap.error(f"no held-out utterance of {args.corpus} has cached tokens in {args.corpus / 'tokens'}")
    seconds = sum(len(t) for t in token_sets) * vocoder.samples_per_token / vocoder.sample_rate
    print(f"{args.vocoder}: {len(token_sets)} held-out utterances, {seconds:.1f} s of audio, pushed {args.push} tokens "
          f"at a time, {args.threads} thread(s), best of {args.repeats} per utterance")
    print("| setting | offline RTF | streaming RTF | first chunk (median) |\n|---|---|---|---|")
    with torch.inference_mode():
        time_setting(vocoder, token_sets[:1], args.push, 1)  # warm-up
        for name, kwargs in settings:
            vocoder.flow.set_sampling(**kwargs)
            r = time_setting(vocoder, token_sets, args.push, args.repeats)
            first = f"{np.median(r['first_ms']):.0f} ms" if r["first_ms"] else "-"
            print(f"| {name} | {r['offline_s'] / r['audio_s']:.3f} | {r['stream_s'] / r['audio_s']:.3f} | {first} |",
                  flush=True)


if __name__ == "__main__":
    main()
