"""How close the vocoder's stream is to its offline decode, per held-out utterance in its own voice, per stream setting.

Held-out NPC utterances' semantic tokens (corpus token cache) are decoded offline and streamed with each setting
L:A[:B] (left-context tokens, lookahead tokens, buffered lookahead tokens; the rest of the vocoder's stream config is
kept), pushed `--push` tokens at a time or as the server hands them over (`--push serve`: the first chunk's tokens
with their lookahead early, the rest of the first 15-token span, then whole spans). Prints the log-mel distance (mean
|dB| over 80 bands) median, max and how many utterances exceed the stated tolerance (STREAM_MEL_TOLERANCE_DB), per
voice, and the tokens the flow decoded per token of audio (the streaming compute beyond offline decoding) and the
chunks per utterance.

    python -m benchmarks.stream_fidelity --n 96 --settings 12:3 12:3:8 --push 3
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from npc_server.paths import DEFAULT_MODEL_DIR, data_dir


def parse_setting(text: str) -> dict:
    """"L:A[:B]" -> StreamConfig fields."""
    parts = text.split(":")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (2, 3) or min(values) < 0 or values[1] < 1:
        raise ValueError(f"setting {text!r}: expected left:lookahead[:buffered_lookahead] tokens, lookahead >= 1")
    return {"left_context_tokens": values[0], "lookahead_tokens": values[1],
            "buffered_lookahead_tokens": values[2] if len(values) == 3 else 0}


def pushes(tokens: np.ndarray, push: str, early: int) -> list[np.ndarray]:
    """The pieces the stream receives: `push` tokens at a time, or the server's hand-over ("serve": `early` tokens,
    the first chunk's with its lookahead, then the rest of the first audio span, then whole spans)."""
    from npc_server.backbone.template import BLOCK_AUDIO

    if push == "serve":
        cuts = [0, early] + list(range(BLOCK_AUDIO, len(tokens) + BLOCK_AUDIO, BLOCK_AUDIO))
    else:
        cuts = list(range(0, len(tokens) + int(push), int(push)))
    return [tokens[a:b] for a, b in zip(cuts, cuts[1:]) if a < len(tokens)]


def measure(vocoder, items: list[tuple[str, np.ndarray]], push: str, early: int) -> dict:
    """Stream and decode offline every (voice, tokens) item -> distances per voice, decoded tokens, chunks."""
    from npc_server.vocoder.mel import logmel_distance_db

    per_voice: dict[str, list[float]] = defaultdict(list)
    decoded, chunks, total = 0, 0, 0
    real = vocoder._decode_window

    def counting(tokens, *args, **kwargs):
        nonlocal decoded, chunks
        decoded, chunks = decoded + len(tokens), chunks + 1
        return real(tokens, *args, **kwargs)

    for voice, tokens in tqdm(items, desc="streaming", unit="utt", leave=False):
        offline, sr = vocoder.decode(tokens, voice=voice)
        stream = vocoder.stream(voice=voice)
        vocoder._decode_window = counting
        try:
            wav = np.concatenate([stream.push(p) for p in pushes(tokens, push, early)] + [stream.flush()])
        finally:
            vocoder._decode_window = real
        total += len(tokens)
        per_voice[voice].append(logmel_distance_db(wav, offline, sr))
    return {"per_voice": per_voice, "decoded_per_token": decoded / max(total, 1), "chunks_per_utt": chunks / len(items)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocoder", type=Path, default=DEFAULT_MODEL_DIR / "vocoder")
    ap.add_argument("--corpus", type=Path, default=data_dir() / "corpus" / "default")
    ap.add_argument("--settings", nargs="+", default=["12:3", "12:3:8"],
                    help="left:lookahead[:buffered_lookahead] stream settings, in tokens")
    ap.add_argument("--n", type=int, default=48, help="held-out utterances")
    ap.add_argument("--push", default="3", help="tokens pushed at a time, or 'serve' (the server's hand-over)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    try:
        settings = [(s, parse_setting(s)) for s in args.settings]
    except ValueError as e:
        ap.error(str(e))
    if args.push != "serve" and (not args.push.isdigit() or int(args.push) < 1):
        ap.error(f"--push must be a positive number of tokens or 'serve', got {args.push!r}")
    if args.n < 1:
        ap.error("--n must be at least 1")

    from dataclasses import replace

    from benchmarks.vocoder_speed import heldout_tokens
    from npc_server.eval.vocoder_eval import _voice_for
    from npc_server.vocoder import STREAM_MEL_TOLERANCE_DB, Vocoder

    torch.set_num_threads(args.threads)
    vocoder = Vocoder.from_pretrained(args.vocoder)
    items = [(_voice_for(vocoder, r["speaker"]), tokens)
             for r, tokens in heldout_tokens(args.corpus, args.n, args.seed)]
    if not items:
        raise SystemExit(f"no held-out utterances with cached tokens in {args.corpus}/tokens")
    base = vocoder.stream_config
    print(f"{len(items)} held-out utterances in their own voices, pushed {args.push} at a time; "
          f"tolerance {STREAM_MEL_TOLERANCE_DB} dB")
    print("setting (left:look[:buffered]) | log-mel median / max dB | over tolerance | decoded tokens per token | "
          "chunks per utterance | per voice median / max")
    with torch.inference_mode():
        for text, fields in settings:
            vocoder.stream_config = replace(base, **fields)
            vocoder.stream_config.validate(vocoder.samples_per_token)
            res = measure(vocoder, items, args.push, base.first_chunk_tokens + base.lookahead_tokens)
            dist = np.array([d for ds in res["per_voice"].values() for d in ds])
            voices = " ".join(f"{v} {np.median(d):.2f}/{max(d):.2f}" for v, d in sorted(res["per_voice"].items()))
            print(f"{text} | {np.median(dist):.3f} / {dist.max():.3f} | {int(np.sum(dist > STREAM_MEL_TOLERANCE_DB))} "
                  f"of {len(dist)} | {res['decoded_per_token']:.2f} | {res['chunks_per_utt']:.2f} | {voices}",
                  flush=True)
    vocoder.stream_config = base


if __name__ == "__main__":
    main()
