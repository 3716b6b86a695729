"""`npc-server train tokenizer-v2`: the linguistic codebook on the frozen Whisper encoder, and its phone readout.

Steps (each resumable; the feature cache makes a second run skip the encoder):
  1. features: every corpus utterance through the tokenizer's own stream (block-causal Whisper encoder, pooled to
     60 ms) -> <corpus>/whisper_features/<id>.npz (pooled features fp16 + the semantic codes of the kept v1 stream)
  2. k-means: 1024 centroids on the train split's features (player and NPC audio)
  3. tokens: every utterance's linguistic codes (nearest centroid) + semantic codes -> <corpus>/tokens_v2/<id>.npz,
     the token cache the backbone stages read
  4. readout: the CTC phone readout on the train split's codes (the probe behind the phone error rate)
The v1 tokenizer (`--init`) gives the semantic stream, its log-mel and the phone inventory.

  npc-server train tokenizer-v2 --corpus ~/.cache/npc-voice/corpus/v2 --out runs/tokenizer_v2
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from npc_server.argtools import advanced
from npc_server.paths import DEFAULT_MODEL_DIR, REPO_ROOT, data_dir
from npc_server.tokenizer.tokenizer import AudioTokenizer, interleave
from npc_server.tokenizer.tokenizer_v2 import TokenizerV2Config, WhisperTokenizer


def build_from_v1(v1_dir: Path, encoder=None, whisper: str = "whisper-base") -> WhisperTokenizer:
    """A v2 tokenizer with the v1 tokenizer's semantic stream, log-mel and phone inventory (codebook still empty)."""
    from npc_server.pretrained import whisper_encoder

    v1 = AudioTokenizer.from_pretrained(v1_dir).float()
    enc = encoder if encoder is not None else whisper_encoder(whisper)
    cfg = TokenizerV2Config(whisper=whisper, encoder=enc.cfg, features=v1.cfg.features, semantic=v1.cfg.semantic,
                            phones=list(v1.cfg.phones), block_groups=v1.cfg.block_groups)
    model = WhisperTokenizer(cfg, enc)
    model.mel.load_state_dict(v1.mel.state_dict())
    model.semantic.load_state_dict(v1.semantic.state_dict())
    return model.eval()


@torch.inference_mode()
def utterance_features(model: WhisperTokenizer, wav: np.ndarray, sr: int) -> tuple[np.ndarray, np.ndarray]:
    """(pooled Whisper features [T_l, dim], semantic codes [T_s]) of one utterance, block by block as served."""
    tap: list[torch.Tensor] = []
    model.feature_tap = tap
    try:
        toks = model.encode(wav, sr)
    finally:
        model.feature_tap = None
    return torch.cat(tap, dim=1)[0].numpy(), toks.semantic.numpy()


def extract(model: WhisperTokenizer, corpus: Path, rows: list[dict], out: Path, progress: bool = True) -> int:
    from npc_server.audio.io import load_audio

    out.mkdir(parents=True, exist_ok=True)
    done = 0
    for r in tqdm(rows, desc="whisper features", disable=not progress):
        path = out / f"{r['id']}.npz"
        if path.is_file():
            continue
        wav, sr = load_audio(corpus / r["audio"])
        feats, sem = utterance_features(model, wav, sr)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, features=feats.astype(np.float16), semantic=sem.astype(np.int16))
        tmp.replace(path)
        done += 1
    return done


def kmeans(x: torch.Tensor, k: int, iters: int = 25, seed: int = 0, progress: bool = True) -> torch.Tensor:
    """Plain k-means (k-means++ seeding on a sample, Lloyd steps); empty clusters are re-seeded from far points."""
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    if n < k:
        raise ValueError(f"k-means with {k} centroids needs at least {k} vectors, got {n}")
    xx = (x * x).sum(-1)

    def nearest(c):
        d = xx[:, None] - 2 * x @ c.T + (c * c).sum(-1)[None]
        return d.min(-1)

    # k-means++ on a subsample
    sub = x[torch.randperm(n, generator=g)[: min(n, 20 * k)]]
    cents = [sub[torch.randint(0, sub.shape[0], (1,), generator=g)].squeeze(0)]
    dmin = ((sub - cents[0]) ** 2).sum(-1)
    for _ in tqdm(range(1, k), desc="k-means++ seeds", disable=not progress, leave=False):
        i = torch.multinomial(dmin.clamp_min(1e-12), 1, generator=g)
        cents.append(sub[i].squeeze(0))
        dmin = torch.minimum(dmin, ((sub - sub[i]) ** 2).sum(-1))
    c = torch.stack(cents)
    for it in tqdm(range(iters), desc="k-means", disable=not progress):
        dist, assign = nearest(c)
        counts = torch.bincount(assign, minlength=k).float()
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        empty = counts == 0
        c = torch.where(empty[:, None], c, sums / counts.clamp_min(1)[:, None])
        if empty.any():  # re-seed from the worst-fit points
            far = dist.topk(int(empty.sum())).indices
            c[empty] = x[far]
    return c


def main(argv: list[str] | None = None) -> int:
    from npc_server.training.corpus.manifest import read_manifest
    from npc_server.training.lm_data import save_tokens
    from npc_server.training.train_readout import (
        fit_readout,
        load_items,
        phone_error_rate,
    )

    p = argparse.ArgumentParser(prog="npc-server train tokenizer-v2", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, default=data_dir() / "corpus" / "default")
    p.add_argument("--init", type=Path, default=DEFAULT_MODEL_DIR / "tokenizer",
                   help="v1 tokenizer giving the semantic stream and phone inventory, or a v2 one to continue")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "tokenizer_v2")
    p.add_argument("--readout-minutes", type=float, default=15.0)
    p.add_argument("--readout-steps", type=int, default=None, help="stop the readout after this many steps (tests)")
    p.add_argument("--batch-tokens", type=int, default=2400)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    a = advanced(p)
    a.add_argument("--max-vectors", type=int, default=200_000, help="features sampled for k-means")
    a.add_argument("--kmeans-iters", type=int, default=25)
    a.add_argument("--keep-codebook", action="store_true", help="with a v2 --init: keep its centroids (train the readout only)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    progress = not args.no_progress
    corpus = args.corpus.expanduser()
    try:
        rows = [r for r in read_manifest(corpus) if (corpus / r["audio"]).is_file()]
    except FileNotFoundError as exc:
        raise SystemExit(f"npc-server train tokenizer-v2: {exc}")

    init_cfg = json.loads((args.init / "config.json").read_text())
    if init_cfg.get("version") == 2:
        model = WhisperTokenizer.from_pretrained(args.init).float()
    else:
        model = build_from_v1(args.init)
    t0 = time.perf_counter()
    feats_dir = corpus / "whisper_features"
    n_new = extract(model, corpus, rows, feats_dir, progress)
    t_feat = time.perf_counter() - t0
    print(f"features: {len(rows)} utterances ({n_new} new) in {t_feat / 60:.1f} min")

    # 2. k-means on the train split
    rng = np.random.default_rng(args.seed)
    train_rows = [r for r in rows if r["split"] == "train"]
    if not (args.keep_codebook and init_cfg.get("version") == 2):
        chunks = []
        for r in train_rows:
            with np.load(feats_dir / f"{r['id']}.npz") as z:
                chunks.append(z["features"])
        x = np.concatenate(chunks)
        if x.shape[0] > args.max_vectors:
            x = x[rng.choice(x.shape[0], args.max_vectors, replace=False)]
        t1 = time.perf_counter()
        model.linguistic.codebook.copy_(kmeans(torch.from_numpy(x.astype(np.float32)), model.cfg.linguistic.codebook_size,
                                               args.kmeans_iters, args.seed, progress))
        print(f"k-means: {x.shape[0]:,} vectors -> {model.cfg.linguistic.codebook_size} centroids in "
              f"{(time.perf_counter() - t1) / 60:.1f} min")

    # 3. the token cache
    tokens_dir = corpus / "tokens_v2"
    tokens_dir.mkdir(exist_ok=True)
    used = np.zeros(model.cfg.linguistic.codebook_size, dtype=np.int64)
    for r in tqdm(rows, desc="tokens", disable=not progress):
        with np.load(feats_dir / f"{r['id']}.npz") as z:
            f, sem = torch.from_numpy(z["features"].astype(np.float32)), z["semantic"].astype(np.int64)
        ling = model.linguistic.quantize(f[None])[0].numpy()
        if r["split"] == "train":
            used += np.bincount(ling, minlength=len(used))
        save_tokens(tokens_dir / f"{r['id']}.npz", ling, sem, interleave(ling, sem).numpy())
    print(f"codes in use on train: {(used > 0).mean():.1%}")

    # 4. the phone readout
    random_state = random.Random(args.seed)
    train = load_items(corpus, tokens_dir, "train", model)
    valid = load_items(corpus, tokens_dir, "valid", model)[:400]
    for prm in model.parameters():
        prm.requires_grad_(False)
    params = list(model.linguistic.proj.parameters()) + list(model.linguistic.readout.parameters())
    for prm in params:
        prm.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    model.linguistic.train()
    steps, losses, seconds = fit_readout(model.linguistic, params, opt, train, args.readout_minutes, args.lr,
                                         args.batch_tokens, random_state, 0.0, valid, args.readout_steps)
    model.eval()
    role = {r["id"]: r["role"] for r in rows}
    heldout = load_items(corpus, tokens_dir, "heldout", model)
    per = {"valid": phone_error_rate(model.linguistic, valid), "heldout": phone_error_rate(model.linguistic, heldout),
           "heldout_players": phone_error_rate(model.linguistic, [it for it in heldout if role[it.uid] == "player"])}
    model.save_pretrained(args.out)
    record = {"tokenizer_v2": {
        "corpus": str(corpus), "utterances": len(rows), "train_utterances": len(train_rows),
        "codes_used": float((used > 0).mean()), "readout_steps": steps, "readout_minutes": round(seconds / 60, 1),
        "readout_loss_last": round(float(np.mean(losses[-50:])), 4) if losses else None,
        "per": per, "command": "npc-server train tokenizer-v2 " + " ".join(sys.argv[3:] if argv is None else argv)}}
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"PER valid {per['valid']:.2%}, heldout {per['heldout']:.2%} (unseen player voices "
          f"{per['heldout_players']:.2%}); wrote {args.out}")
    return 0
