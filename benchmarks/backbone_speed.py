"""Training and decoding speed of a backbone preset on this CPU (weights untrained; speed does not depend on them).

    python -m benchmarks.backbone_speed --preset default --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import DynamicCache

from npc_server.backbone.model import build_model, preset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="default")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=280, help="tokens per sequence (SFT mean is ~277)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = preset(args.preset, 2048)
    model = build_model(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, cfg.layout.size, (args.batch, args.length))
    for name, bf16 in (("bf16 autocast", True), ("fp32", False)):
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
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        model(input_ids=x[:1, :200], cache=cache, use_cache=True, logits_to_keep=1)
        t = time.perf_counter()
        for _ in range(50):
            model(input_ids=torch.tensor([[5]]), cache=cache, use_cache=True, logits_to_keep=1)
        ms = (time.perf_counter() - t) / 50 * 1000
    print(f"decode (KV cache, 200-token context) {ms:.2f} ms/token  {1000 / ms:,.0f} tokens/s")


if __name__ == "__main__":
    main()
