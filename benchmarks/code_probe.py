"""How much phonetic content each audio-token stream carries: the same fresh CTC phone probe trained on frozen codes.

A diagnostic, not a model we ship. It trains one probe (3 convolutions + 2 bidirectional GRU layers, as the shipped
linguistic readout) on the frozen linguistic or semantic codes of the corpus' audio-token cache for a fixed time
and prints the held-out phone error rate by role (player voices are unseen). Running it for both streams with the
same budget tells whether the vocoder's semantic tokens hold the words it has to say:

    python -m benchmarks.code_probe --stream semantic --minutes 12
    python -m benchmarks.code_probe --stream linguistic --minutes 12
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from npc_server.paths import DEFAULT_MODEL_DIR, data_dir
from npc_server.tokenizer.modules import ConvReadout
from npc_server.tokenizer.phones import ctc_greedy, edit_distance
from npc_server.tokenizer.tokenizer import AudioTokenizer
from npc_server.training.train_readout import batches, collate, ctc_loss, load_items
from npc_server.training.train_tokenizer import read_manifest


class CodeProbe(nn.Module):
    """Frozen quantiser embedding of one stream -> trainable conv + BiGRU readout -> CTC phone logits."""

    def __init__(self, stream_model: nn.Module, n_phones: int, hidden: int = 192, rnn_layers: int = 2):
        super().__init__()
        cfg = stream_model.cfg
        self.vq = stream_model.vq
        self.cfg = SimpleNamespace(ctc_upsample=cfg.ctc_upsample)
        self.readout = ConvReadout(cfg.q_dim, hidden, n_phones + 1, cfg.ctc_upsample, 3, rnn_layers=rnn_layers)

    def phone_logits(self, codes: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        return self.readout(self.vq.embed(codes), lengths)


@torch.no_grad()
def per_by_role(probe: CodeProbe, items, roles: list[str]) -> dict[str, float]:
    probe.eval()
    errs: dict[str, list[int]] = {}
    for idx in batches(items, 4000, random.Random(0)):
        codes, lengths, _, _ = collate(items, idx)
        logits = probe.phone_logits(codes, lengths)
        for b, i in enumerate(idx):
            n = int(lengths[b]) * probe.cfg.ctc_upsample
            e = edit_distance(ctc_greedy(logits[b, :n].argmax(-1).tolist()), items[i].phones)
            for key in (roles[i], "all"):
                errs.setdefault(key, [0, 0])
                errs[key][0] += e
                errs[key][1] += len(items[i].phones)
    probe.train()
    return {k: e / max(1, t) for k, (e, t) in sorted(errs.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stream", choices=("linguistic", "semantic"), required=True)
    ap.add_argument("--corpus", type=Path, default=data_dir() / "corpus" / "default")
    ap.add_argument("--tokenizer", type=Path, default=DEFAULT_MODEL_DIR / "tokenizer")
    ap.add_argument("--minutes", type=float, default=12.0)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = random.Random(0)
    corpus = args.corpus.expanduser()
    model = AudioTokenizer.from_pretrained(args.tokenizer).float()
    for p in model.parameters():
        p.requires_grad_(False)
    train = load_items(corpus, corpus / "tokens", "train", model, args.stream)
    held = load_items(corpus, corpus / "tokens", "heldout", model, args.stream)
    if not train or not held:
        raise SystemExit(f"no train/heldout utterances with tokens in {corpus / 'tokens'}")
    role_of = {r["id"]: r["role"] for r in read_manifest(corpus)}
    roles = [role_of[item.uid] for item in held]
    probe = CodeProbe(getattr(model, args.stream), len(model.inventory))
    params = [p for p in probe.readout.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    budget, t0, step, losses = args.minutes * 60, time.perf_counter(), 0, []
    bar = tqdm(total=int(budget), unit="s", desc=f"probe {args.stream}")
    while time.perf_counter() - t0 < budget:
        for idx in batches(train, 2400, rng):
            frac = min(1.0, (time.perf_counter() - t0) / budget)
            for g in opt.param_groups:
                g["lr"] = args.lr * min(1.0, (step + 1) / 100) * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * frac)))
            loss = ctc_loss(probe, collate(train, idx))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            losses.append(float(loss))
            bar.n = min(int(budget), int(time.perf_counter() - t0))
            bar.set_postfix(step=step, loss=f"{np.mean(losses[-50:]):.3f}")
            if time.perf_counter() - t0 >= budget:
                break
    bar.close()
    res = {"stream": args.stream, "minutes": args.minutes, "steps": step, "train_utterances": len(train),
           "heldout_utterances": len(held), "per": per_by_role(probe, held, roles)}
    print(json.dumps(res, indent=2))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
