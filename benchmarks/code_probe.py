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
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from npc_server.paths import DEFAULT_MODEL_DIR, data_dir
from npc_server.tokenizer.modules import ConvReadout
from npc_server.tokenizer.tokenizer import AudioTokenizer
from npc_server.training.corpus.manifest import read_manifest
from npc_server.training.train_readout import CodeItem, fit_readout, load_items, phone_error_rate


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


def per_by_role(probe: CodeProbe, items: list[CodeItem], roles: list[str]) -> dict[str, float]:
    """Held-out PER over all items and per speaker role."""
    groups = {"all": items, **{role: [it for it, r in zip(items, roles) if r == role] for role in set(roles)}}
    return {k: phone_error_rate(probe, group) for k, group in sorted(groups.items())}


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
    params = list(probe.readout.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    step, _, _ = fit_readout(probe, params, opt, train, args.minutes, args.lr, 2400, random.Random(0),
                             desc=f"probe {args.stream}")
    res = {"stream": args.stream, "minutes": args.minutes, "steps": step, "train_utterances": len(train),
           "heldout_utterances": len(held), "per": per_by_role(probe, held, roles)}
    print(json.dumps(res, indent=2))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
