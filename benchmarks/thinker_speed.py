"""Backbone v2 serving speed on the lean int8 forward: batched decode across conversations, prefill onto a cached
conversation, and how close int8 stays to the fp32 (transformers) forward on the real weights.

Each of `--batches` conversations holds `--context` tokens (persona turn + question) in its cache row; then all of
them decode one token per step together. Prefill: `--prefill` new tokens appended to a cached conversation (what is
left after the end of speech). Best of `--repeats`. Run it on an idle machine.

    python -m benchmarks.thinker_speed --backbone runs/backbone_v2 --threads 2
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

from npc_server.backbone.audio_lm import AudioLM, AudioLMConfig, load_body
from npc_server.backbone.lean import LeanLM
from npc_server.paths import DEFAULT_MODEL_DIR


def _ids(model, n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    text = [int(i) for i in model.head_ids.tolist() if i < model.cfg.n_text]
    layout = model.cfg.layout
    return [rng.choice(text) if rng.random() < 0.4 else rng.randrange(layout.audio_offset, layout.audio_offset + 1024)
            for _ in range(n)]


def decode_speed(lean: LeanLM, model, batch: int, context: int, steps: int, repeats: int) -> float:
    """Tokens per second per conversation with `batch` conversations decoding together."""
    best = float("inf")
    for _ in range(repeats):
        cache = lean.new_cache(batch, context + steps + 1)
        for row in range(batch):
            lean.prefill(cache, row, _ids(model, context, row))
        rows = list(range(batch))
        tokens = [int(model.head_ids[0])] * batch
        t0 = time.perf_counter()
        for _ in range(steps):
            logits = lean.decode(cache, rows, tokens)
            tokens = [int(model.head_ids[int(k)]) for k in logits.argmax(-1)]
        best = min(best, (time.perf_counter() - t0) / steps)
    return 1.0 / best


def prefill_ms(lean: LeanLM, model, context: int, new: int, repeats: int) -> float:
    best = float("inf")
    for r in range(repeats):
        cache = lean.new_cache(1, context + new + 1)
        lean.prefill(cache, 0, _ids(model, context, r))
        add = _ids(model, new, 100 + r)
        t0 = time.perf_counter()
        lean.prefill(cache, 0, add)
        best = min(best, time.perf_counter() - t0)
    return 1000 * best


@torch.inference_mode()
def int8_agreement(model: AudioLM, lean_int8: LeanLM, n: int = 160) -> dict:
    ids = _ids(model, n, 7)
    ref_hidden, _ = model(torch.tensor([ids]))
    ref = model.logits(ref_hidden)[0]
    hidden = lean_int8.forward(torch.tensor([ids]), lean_int8.new_cache(1, n), [0])
    got = lean_int8.logits(hidden)[0]
    cos = torch.nn.functional.cosine_similarity(ref_hidden[0], hidden[0], dim=-1)
    return {"top1_agreement": float((ref.argmax(-1) == got.argmax(-1)).float().mean()), "hidden_cosine_min": float(cos.min()),
            "hidden_cosine_mean": float(cos.mean())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", type=Path, default=DEFAULT_MODEL_DIR / "backbone_v2",
                   help="v2 backbone folder (missing: the base model with fresh rows, same cost)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--context", type=int, default=300)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--prefill", type=int, default=12)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if (args.backbone / "config.json").is_file():
        model = AudioLM.from_pretrained(args.backbone)
    else:
        print(f"(no backbone at {args.backbone}: timing the base model with fresh rows)")
        model = AudioLM(AudioLMConfig(), load_body(), torch.arange(0, 6000))
    lean = LeanLM.from_audio_lm(model, quantize=True)
    print(f"threads {args.threads}, context {args.context} tokens, output rows {model.head_ids.numel()}")
    for b in args.batches:
        tps = decode_speed(lean, model, b, args.context, args.steps, args.repeats)
        print(f"decode, {b} conversation(s) together: {tps:.1f} tokens/s each ({b * tps:.0f} in all)")
    print(f"prefill of {args.prefill} tokens onto a cached {args.context}-token conversation: "
          f"{prefill_ms(lean, model, args.context, args.prefill, args.repeats):.0f} ms")
    agree = int8_agreement(model, lean)
    print(f"int8 vs transformers fp32 on 160 tokens: top-1 agreement {agree['top1_agreement']:.1%}, hidden cosine "
          f"min {agree['hidden_cosine_min']:.4f} / mean {agree['hidden_cosine_mean']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
