"""`npc-server eval tokenizer-v2`: what the v2 linguistic codes carry, and what encoding them costs.

- Phone error rate of the CTC readout (greedy) on the corpus held-out split, split by player voices (unseen in
  training) and NPC voices, from the v2 token cache; and on real human English recordings (Debian
  pocketsphinx-testdata, references phonemized by espeak-ng en-us as the corpus is).
- Cost on 1 thread: a whole 3 s question, and what is left after the end of speech when the question was
  streamed in while spoken (the last partial block + flush), best of `--repeats`.

  npc-server eval tokenizer-v2 --tokenizer runs/tokenizer_v2 --corpus ~/.cache/npc-voice/corpus/v2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from npc_server.paths import DEFAULT_MODEL_DIR, data_dir
from npc_server.eval.metrics import ctc_phone_errors


def per_of(model, items: list[tuple[np.ndarray, list[int]]]) -> float:
    errs = total = 0
    with torch.inference_mode():
        for codes, ref in items:
            errs += ctc_phone_errors(model.linguistic.phone_logits(torch.as_tensor(codes, dtype=torch.long)[None])[0], ref)
            total += len(ref)
    return errs / max(1, total)


def real_items(model) -> tuple[list, list[dict]]:
    from npc_server.eval.listen_v2 import real_recordings
    from npc_server.training.corpus.render import phonemize

    items, shown = [], []
    for r in real_recordings():
        codes = model.encode(r["audio"], r["sr"]).linguistic.numpy()
        ipa = phonemize(r["text"], "en-us")
        ref = model.inventory.encode(ipa)
        items.append((codes, ref))
        shown.append({"id": r["id"], "text": r["text"], "ref": " ".join(model.inventory.decode(ref)),
                      "hyp": " ".join(model.phones_from_tokens(torch.as_tensor(codes)))})
    return items, shown


def _speechlike(seconds: float) -> np.ndarray:
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 150 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
            + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def _after_end(model, wav: np.ndarray) -> float:
    """Seconds of compute left after the last sample: pushed in 100 ms chunks while spoken, then flushed."""
    s = model.stream(16000)
    for i in range(0, len(wav), 1600):
        s.push(wav[i : i + 1600])
    t0 = time.perf_counter()
    s.flush()
    return time.perf_counter() - t0


def timing(model, seconds: float = 3.0, repeats: int = 5) -> dict:
    """ms on 1 thread: a whole question at once; what is left after the end of speech when it was streamed, for
    this length and for the worst case (a remainder of one group short of a block)."""
    wav = _speechlike(seconds)
    worst = _speechlike((model.cfg.block_samples * 2 - model.cfg.group_samples) / 16000)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    whole, tail, tail_worst = [], [], []
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            model.encode(wav, 16000)
            whole.append(time.perf_counter() - t0)
            tail.append(_after_end(model, wav))
            tail_worst.append(_after_end(model, worst))
    finally:
        torch.set_num_threads(threads)
    return {"seconds": seconds, "whole_ms": 1000 * min(whole), "after_end_ms": 1000 * min(tail),
            "after_end_worst_ms": 1000 * min(tail_worst)}


def main(argv: list[str] | None = None) -> int:
    from npc_server.tokenizer.tokenizer_v2 import load_tokenizer
    from npc_server.training.corpus.manifest import read_manifest

    p = argparse.ArgumentParser(prog="npc-server eval tokenizer-v2", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", type=Path, default=DEFAULT_MODEL_DIR / "tokenizer_v2")
    p.add_argument("--corpus", type=Path, default=data_dir() / "corpus" / "default")
    p.add_argument("--tokens", type=Path, default=None, help="v2 token cache (default <corpus>/tokens_v2)")
    p.add_argument("--split", default="heldout")
    p.add_argument("--no-real", action="store_true", help="skip the real recordings")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    model = load_tokenizer(args.tokenizer)
    if getattr(model, "version", 1) != 2:
        raise SystemExit(f"{args.tokenizer} is not a v2 tokenizer (use `npc-server eval tokenizer` for v1)")
    report: dict = {"tokenizer": str(args.tokenizer)}
    corpus = args.corpus.expanduser()
    tokens = (args.tokens or corpus / "tokens_v2").expanduser()
    if (corpus / "manifest.jsonl").is_file() and tokens.is_dir():
        groups: dict[str, list] = {"player": [], "npc": []}
        for r in read_manifest(corpus):
            path = tokens / f"{r['id']}.npz"
            if r["split"] == args.split and path.is_file():
                with np.load(path) as z:
                    groups[r["role"]].append((z["linguistic"].astype(np.int64), model.inventory.encode(r.get("phonemes", ""))))
        for role, items in groups.items():
            if items:
                report[f"per_{args.split}_{role}"] = per_of(model, items)
                report[f"n_{args.split}_{role}"] = len(items)
                print(f"PER, {args.split} {role} voices: {report[f'per_{args.split}_{role}']:.1%} ({len(items)} utterances)")
    else:
        print(f"(no corpus token cache at {tokens}: corpus PER skipped)")
    if not args.no_real:
        items, shown = real_items(model)
        report["per_real"], report["n_real"] = per_of(model, items), len(items)
        report["real_examples"] = shown
        print(f"PER, real human recordings (pocketsphinx-testdata): {report['per_real']:.1%} ({len(items)} utterances; "
              "too few to resolve differences of a few points)")
        for s in shown[:3]:
            print(f"  {s['text']!r}\n    ref: {s['ref']}\n    hyp: {s['hyp']}")
    report["timing"] = timing(model, repeats=args.repeats)
    tm = report["timing"]
    print(f"cost, 1 thread: whole 3 s question {tm['whole_ms']:.0f} ms; after the end of speech (streamed) "
          f"{tm['after_end_ms']:.0f} ms for 3 s, {tm['after_end_worst_ms']:.0f} ms worst case (840 ms left to encode)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return 0
