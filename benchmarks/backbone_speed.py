"""Training and decoding speed of a backbone preset on this CPU (weights untrained; speed does not depend on them):
the transformers forward, the FastForward path (backbone/fast.py) with and without LM-head rows, and a batched step.

    python -m benchmarks.backbone_speed --preset default --threads 1 [--no-train]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import DynamicCache

from npc_server.backbone.fast import FastForward
from npc_server.backbone.model import build_model, preset


def _ms_per_call(fn, n: int = 100) -> float:
    for _ in range(10):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="default")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=280, help="tokens per sequence (SFT mean is ~277)")
    ap.add_argument("--no-train", action="store_true", help="only measure decoding")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = preset(args.preset, 2048)
    model = build_model(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, cfg.layout.size, (args.batch, args.length))
    for name, bf16 in (("bf16 autocast", True), ("fp32", False)) if not args.no_train else ():
        times = []
        for _ in range(4):
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - t)
        best = min(times[1:])
        print(f"train {name:<14} {best:.2f} s/step  {args.batch * args.length / best:,.0f} tokens/s")
    model.eval()
    prompt = x[0, :200].tolist()
    semantic = [(cfg.layout.audio_offset + 1024, cfg.layout.size)]  # the rows of an audio step
    fast = FastForward(model)

    def fresh() -> DynamicCache:
        cache = DynamicCache(config=model.config)
        fast.forward(cache, prompt, last_only=True)
        return cache

    with torch.inference_mode():
        cache = fresh()
        hf = _ms_per_call(lambda: model(input_ids=torch.tensor([[5]]), cache=cache, use_cache=True, logits_to_keep=1))
    cache = fresh()
    ff = _ms_per_call(lambda: fast.forward(cache, [5], last_only=True))
    cache = fresh()
    rows = _ms_per_call(lambda: fast.forward(cache, [5], last_only=True, rows=semantic))
    caches = [fresh() for _ in range(4)]
    batch = _ms_per_call(lambda: fast.forward_batch(caches, [5] * 4, rows=semantic), n=50)
    print("decode step (KV cache, 200-300-token context):")
    print(f"  transformers forward          {hf:.2f} ms/token  {1000 / hf:,.0f} tokens/s")
    print(f"  FastForward                   {ff:.2f} ms/token  {1000 / ff:,.0f} tokens/s")
    print(f"  FastForward, audio-step rows  {rows:.2f} ms/token  {1000 / rows:,.0f} tokens/s")
    print(f"  4 conversations, one batch    {batch:.2f} ms/step   {4000 / batch:,.0f} tokens/s")

if __name__ == "__main__":
    main()
