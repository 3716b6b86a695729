"""`npc-server train readout`: retrain the linguistic stream's CTC phone readout on frozen codes (encoders untouched).

The readout is the probe that measures how much phonetic content the linguistic codes carry (issue 4's phone error
rate); it is not on the serving path. Because the encoders and quantisers stay as they are, the codes (and so the
backbone and vocoder trained on them) do not change. The readout learns from the audio-token cache of the corpus
(`<corpus>/tokens/*.npz`, written by the backbone's `tokenize_corpus`), so no audio is decoded here; that cache
must come from the same encoders (after retraining the tokenizer, delete it so that it is filled again).

  npc-server train readout --rnn-layers 2 --minutes 20 --threads 1
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from npc_server.argtools import advanced
from npc_server.eval.metrics import ctc_phone_errors
from npc_server.paths import DEFAULT_MODEL_DIR, REPO_ROOT, data_dir
from npc_server.tokenizer.linguistic import LinguisticTokenizer
from npc_server.tokenizer.quantizers import FiniteScalarQuantizer
from npc_server.tokenizer.tokenizer import AudioTokenizer
from npc_server.training.corpus.manifest import read_manifest


@dataclass
class CodeItem:
    codes: np.ndarray  # linguistic codes, int64 [T]
    phones: list[int]  # reference phone ids (1..n; 0 is the CTC blank)
    uid: str = ""  # utterance id in the manifest


def load_items(corpus: Path, tokens: Path, split: str, model: AudioTokenizer,
               stream: str = "linguistic") -> list[CodeItem]:
    """Codes of one stream ("linguistic" or "semantic") from the token cache + reference phones from the manifest
    for one split (rows without tokens or phones are skipped)."""
    items = []
    up = getattr(model, stream).cfg.ctc_upsample
    for r in read_manifest(corpus):
        if r.get("split") != split:
            continue
        path = tokens / f"{r['id']}.npz"
        if not path.is_file():
            continue
        phones = model.inventory.encode(r.get("phonemes", ""))
        with np.load(path) as z:
            codes = z[stream].astype(np.int64)
        if phones and len(codes) * up >= len(phones):
            items.append(CodeItem(codes, phones, r["id"]))
    return items


def batches(lengths: list[int], max_tokens: int, rng: random.Random) -> list[list[int]]:
    """Indices of `lengths` in length-sorted buckets of at most `max_tokens` padded steps, in random order."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i] + rng.random())
    out, cur, longest = [], [], 0
    for i in order:
        longest = max(longest, lengths[i])
        if cur and longest * (len(cur) + 1) > max_tokens:
            out.append(cur)
            cur, longest = [], lengths[i]
        cur.append(i)
    if cur:
        out.append(cur)
    rng.shuffle(out)
    return out


def collate(items: list[CodeItem], idx: list[int]):
    lengths = torch.tensor([len(items[i].codes) for i in idx])
    codes = torch.zeros(len(idx), int(lengths.max()), dtype=torch.long)
    for b, i in enumerate(idx):
        codes[b, : lengths[b]] = torch.from_numpy(items[i].codes)
    targets = torch.tensor([p for i in idx for p in items[i].phones])
    tlen = torch.tensor([len(items[i].phones) for i in idx])
    return codes, lengths, targets, tlen


def jitter_codes(codes: torch.Tensor, p: float, fsq: FiniteScalarQuantizer, generator: torch.Generator | None = None):
    """Move each FSQ digit of each code one grid step up or down with probability `p` (clamped to the grid).

    Unseen voices land on neighbouring grid points of the codes a training voice would get for the same phone
    (docs/log/2026-11-30-tokenizer-gru-phone-readout.md), so the readout is trained to read those neighbours the same way."""
    if p <= 0:
        return codes
    digits = fsq.digits(codes)
    move = (torch.rand(digits.shape, generator=generator) < p).long()
    sign = torch.randint(0, 2, digits.shape, generator=generator) * 2 - 1
    top = fsq.levels.long() - 1
    return fsq.from_digits(torch.minimum(torch.clamp(digits + move * sign, min=0), top))


def ctc_loss(ling: LinguisticTokenizer, batch, jitter: float = 0.0) -> torch.Tensor:
    codes, lengths, targets, tlen = batch
    if jitter > 0:
        codes = jitter_codes(codes, jitter, ling.vq)
    logits = ling.phone_logits(codes, lengths)
    lp = F.log_softmax(logits.float(), dim=-1).transpose(0, 1)
    return F.ctc_loss(lp, targets, lengths * ling.cfg.ctc_upsample, tlen, blank=0, zero_infinity=True)


@torch.no_grad()
def phone_error_rate(ling: LinguisticTokenizer, items: list[CodeItem], max_tokens: int = 4000) -> float:
    """Greedy-CTC PER of the readout over `items`."""
    was = ling.training
    ling.eval()
    errs = total = 0
    for idx in batches([len(it.codes) for it in items], max_tokens, random.Random(0)):
        codes, lengths, _, _ = collate(items, idx)
        logits = ling.phone_logits(codes, lengths)
        for b, i in enumerate(idx):
            n = int(lengths[b]) * ling.cfg.ctc_upsample
            errs += ctc_phone_errors(logits[b, :n], items[i].phones)
            total += len(items[i].phones)
    ling.train(was)
    return errs / max(1, total)


def new_readout(model: AudioTokenizer, rnn_layers: int, keep_conv: bool) -> None:
    """Replace the linguistic readout by one with `rnn_layers` GRU layers; `keep_conv` copies the old weights that
    fit: the conv stack and head, and the GRU too when the old readout already had the same one (so a second run
    continues the first)."""
    ling = model.linguistic
    old = ling.readout.state_dict()
    ling.cfg.readout_rnn_layers = rnn_layers
    fresh = LinguisticTokenizer(ling.cfg).readout
    if keep_conv:
        own = fresh.state_dict()
        fresh.load_state_dict({k: v for k, v in old.items() if k in own and own[k].shape == v.shape}, strict=False)
    ling.readout = fresh


def fit_readout(module, params: list[torch.nn.Parameter], opt: torch.optim.Optimizer, train: list[CodeItem],
                minutes: float, lr: float, batch_tokens: int, rng: random.Random, jitter: float = 0.0,
                valid: list[CodeItem] | None = None, max_steps: int | None = None,
                desc: str = "readout") -> tuple[int, list[float], float]:
    """Train `params` of a readout (`module` has `phone_logits`, `vq`, `cfg.ctc_upsample`) with CTC for `minutes`:
    100 warm-up steps, then cosine to 5% of `lr` over the time budget; valid PER every 500 steps when `valid` is
    given. -> (steps, losses, seconds)."""
    budget = minutes * 60
    t0, step, losses = time.perf_counter(), 0, []
    lengths = [len(it.codes) for it in train]
    bar = tqdm(total=int(budget), unit="s", desc=desc)
    done = False
    while not done:
        for idx in batches(lengths, batch_tokens, rng):
            frac = min(1.0, (time.perf_counter() - t0) / budget)
            for g in opt.param_groups:
                g["lr"] = lr * min(1.0, (step + 1) / 100) * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * frac)))
            loss = ctc_loss(module, collate(train, idx), jitter)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            losses.append(float(loss.detach()))
            bar.n = min(int(budget), int(time.perf_counter() - t0))
            bar.set_postfix(step=step, loss=f"{np.mean(losses[-50:]):.3f}")
            if step % 500 == 0 and valid:
                per = phone_error_rate(module, valid)
                tqdm.write(f"step {step}: loss {np.mean(losses[-50:]):.3f}, valid PER {per:.2%}")
            if time.perf_counter() - t0 >= budget or (max_steps and step >= max_steps):
                done = True
                break
    bar.close()
    return step, losses, time.perf_counter() - t0


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2%}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="npc-server train readout", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, default=data_dir() / "corpus" / "default")
    p.add_argument("--tokens", type=Path, default=None, help="audio-token cache (default: <corpus>/tokens)")
    p.add_argument("--tokenizer", type=Path, default=DEFAULT_MODEL_DIR / "tokenizer", help="tokenizer to start from")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "readout",
                   help="where to write the tokenizer with the new readout (encoders copied unchanged; default "
                        "runs/readout)")
    p.add_argument("--minutes", type=float, default=20.0, help="training budget (the LR schedule follows it)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (tests)")
    p.add_argument("--batch-tokens", type=int, default=2400, help="padded codes per batch")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    a = advanced(p)
    a.add_argument("--rnn-layers", type=int, default=2, help="bidirectional GRU layers on top of the conv readout")
    a.add_argument("--fresh-conv", action="store_true", help="do not warm-start the conv stack from the old readout")
    a.add_argument("--code-jitter", type=float, default=0.0,
                   help="training augmentation: probability that each FSQ digit of a code moves one grid step")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    corpus = args.corpus.expanduser()
    tokens = (args.tokens or corpus / "tokens").expanduser()
    if not tokens.is_dir():
        raise SystemExit(f"no token cache at {tokens}: run `npc-server train pretrain` once (it fills it) or "
                         "tokenize the corpus first")

    model = AudioTokenizer.from_pretrained(args.tokenizer).float()
    if args.code_jitter > 0 and model.linguistic.cfg.quantizer != "fsq":
        raise SystemExit("--code-jitter needs the FSQ quantiser (the grid defines the neighbours)")
    for prm in model.parameters():
        prm.requires_grad_(False)
    train, valid = load_items(corpus, tokens, "train", model), load_items(corpus, tokens, "valid", model)
    if not train:
        raise SystemExit(f"no train utterances with tokens in {tokens}")
    valid = valid[:400]
    per_before = phone_error_rate(model.linguistic, valid) if valid else None
    new_readout(model, args.rnn_layers, keep_conv=not args.fresh_conv)
    ling = model.linguistic
    params = list(ling.readout.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    print(f"readout: {len(train)} train / {len(valid)} valid utterances, {sum(p.numel() for p in params):,} "
          f"parameters, valid PER before {_pct(per_before)}")

    step, losses, seconds = fit_readout(ling, params, opt, train, args.minutes, args.lr, args.batch_tokens, rng,
                                        args.code_jitter, valid, args.max_steps)
    per_after = phone_error_rate(ling, valid) if valid else None
    model.save_pretrained(args.out)
    record = {
        "readout": {
            "rnn_layers": args.rnn_layers, "code_jitter": args.code_jitter, "steps": step,
            "minutes": round(seconds / 60, 1),
            "loss_first": round(float(np.mean(losses[:50])), 4), "loss_last": round(float(np.mean(losses[-50:])), 4),
            "train_utterances": len(train), "valid_per_before": per_before, "valid_per_after": per_after,
            "command": "npc-server train readout " + " ".join(sys.argv[3:] if argv is None else argv),
        }
    }
    info = args.out / "training.json"
    old = json.loads(info.read_text()) if info.exists() else {}
    info.write_text(json.dumps({**old, **record}, indent=2) + "\n")
    print(f"valid PER {_pct(per_before)} -> {_pct(per_after)}; wrote {args.out}")
    return 0
