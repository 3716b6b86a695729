"""`npc-server train tokenizer`: train the dual-codebook audio tokenizer on the synthesised corpus."""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from npc_server.argtools import advanced, alias
from npc_server.audio.io import AudioError, load_audio
from npc_server.eval.metrics import ctc_phone_errors
from npc_server.paths import REPO_ROOT, data_dir
from npc_server.tokenizer.features import f0_track, frame_energy, log_f0
from npc_server.tokenizer.phones import PhoneInventory
from npc_server.tokenizer.tokenizer import GROUP_LINGUISTIC, GROUP_SEMANTIC, AudioTokenizer, preset
from npc_server.training.corpus.manifest import read_manifest

SR = 16000


# ------------------------------------------------------------------------------------------- corpus + cache
def _prepare_one(args: tuple[str, dict]) -> tuple[str, np.ndarray, np.ndarray] | None:
    root, row = args
    try:
        wav, _ = load_audio(Path(root) / row["audio"], target_sr=SR)
    except (AudioError, FileNotFoundError):
        return None
    from npc_server.tokenizer.features import FeatureConfig

    cfg = FeatureConfig()
    group = int(0.12 * SR)
    n_frames = math.ceil(len(wav) / group) * group // cfg.hop_length
    f0 = f0_track(wav, n_frames, cfg)
    pcm = (np.clip(wav, -1, 1) * 32767).round().astype(np.int16)
    return row["id"], pcm, f0.astype(np.float16)


def prepare_cache(corpus: Path, rows: list[dict], cache: Path, workers: int = 2, shard_size: int = 500) -> None:
    """16 kHz int16 audio + F0 per utterance into npz shards; rerunning only adds utterances not cached yet."""
    cache.mkdir(parents=True, exist_ok=True)
    done = _cached_ids(cache)
    todo = [r for r in rows if r["id"] not in done]
    if not todo:
        return
    start = len(list(cache.glob("shard_*.npz")))
    ctx = get_context("fork")
    with ctx.Pool(max(1, workers)) as pool:
        bar = tqdm(total=len(todo), desc="tokenizer cache", unit="utt")
        for s in range(0, len(todo), shard_size):
            part = todo[s : s + shard_size]
            ids, wavs, f0s = [], [], []
            for res in pool.imap(_prepare_one, [(str(corpus), r) for r in part], chunksize=8):
                bar.update(1)
                if res is not None:
                    ids.append(res[0])
                    wavs.append(res[1])
                    f0s.append(res[2])
            if ids:
                _save_shard(cache / f"shard_{start:04d}.npz", ids, wavs, f0s)
                start += 1
        bar.close()


def _cached_ids(cache: Path) -> set[str]:
    done: set[str] = set()
    for shard in sorted(cache.glob("shard_*.npz")):
        with np.load(shard) as z:
            done.update(z["ids"].tolist())
    return done


def _save_shard(path: Path, ids, wavs, f0s) -> None:
    tmp = path.with_suffix(".tmp.npz")
    np.savez(
        tmp,
        ids=np.array(ids),
        wav=np.concatenate(wavs),
        wav_off=np.cumsum([0] + [len(w) for w in wavs]),
        f0=np.concatenate(f0s),
        f0_off=np.cumsum([0] + [len(f) for f in f0s]),
    )
    os.replace(tmp, path)


@dataclass
class Item:
    id: str
    wav: np.ndarray  # int16 16 kHz
    f0: np.ndarray  # float16 Hz per 10 ms frame
    phones: list[int]


def load_cache(cache: Path, rows: list[dict], inventory: PhoneInventory) -> list[Item]:
    by_id = {r["id"]: r for r in rows}
    items = []
    for shard in sorted(cache.glob("shard_*.npz")):
        z = np.load(shard)
        ids, wav, wo, f0, fo = z["ids"], z["wav"], z["wav_off"], z["f0"], z["f0_off"]
        for i, uid in enumerate(ids.tolist()):
            if uid in by_id:
                phones = inventory.encode(by_id[uid].get("phonemes", ""))
                if phones:
                    items.append(Item(uid, wav[wo[i] : wo[i + 1]], f0[fo[i] : fo[i + 1]], phones))
    return items


def make_batches(items: list[Item], batch_seconds: float, block: int, rng: random.Random) -> list[list[int]]:
    """Length-bucketed batches of at most `batch_seconds` padded audio."""
    order = sorted(range(len(items)), key=lambda i: len(items[i].wav) + rng.random() * 800)
    batches, cur, cur_max = [], [], 0
    for i in order:
        n = math.ceil(len(items[i].wav) / block) * block
        if cur and max(cur_max, n) * (len(cur) + 1) > batch_seconds * SR:
            batches.append(cur)
            cur, cur_max = [], 0
        cur.append(i)
        cur_max = max(cur_max, n)
    if cur:
        batches.append(cur)
    rng.shuffle(batches)
    return batches


def collate(items: list[Item], idx: list[int], block: int):
    n_max = max(math.ceil(len(items[i].wav) / block) * block for i in idx)
    wav = torch.zeros(len(idx), n_max)
    f0 = torch.zeros(len(idx), n_max // 160)
    lengths, targets, tlen = [], [], []
    for b, i in enumerate(idx):
        it = items[i]
        wav[b, : len(it.wav)] = torch.from_numpy(it.wav.astype(np.float32) / 32767.0)
        m = min(len(it.f0), f0.shape[1])
        f0[b, :m] = torch.from_numpy(it.f0[:m].astype(np.float32))
        lengths.append(len(it.wav))
        targets.extend(it.phones)
        tlen.append(len(it.phones))
    return wav, torch.tensor(lengths), f0, torch.tensor(targets, dtype=torch.long), torch.tensor(tlen, dtype=torch.long)


# ------------------------------------------------------------------------------------------- losses
def compute_losses(model: AudioTokenizer, batch, weights: dict[str, float] | None = None):
    w = {"ctc_l": 1.0, "ctc_l_cont": 0.2, "ctc_s": 0.2, "mel": 1.0, "f0": 0.5, "voicing": 0.2, "energy": 0.2}
    w.update(weights or {})
    wav, lengths, f0, targets, tlen = batch
    out = model(wav, lengths)
    groups = out["groups"]
    lin, sem = model.linguistic, model.semantic

    def ctc(logits, per_group):
        lp = F.log_softmax(logits.float(), dim=-1).transpose(0, 1)
        return F.ctc_loss(lp, targets, groups * per_group, tlen, blank=0, zero_infinity=True)

    losses = {
        "ctc_l": ctc(lin.readout(out["ling"]["zq"]), GROUP_LINGUISTIC * lin.cfg.ctc_upsample),
        "ctc_l_cont": ctc(lin.readout(out["ling"]["z"]), GROUP_LINGUISTIC * lin.cfg.ctc_upsample),
        "ctc_s": ctc(sem.readout(out["sem"]["zq"]), GROUP_SEMANTIC * sem.cfg.ctc_upsample),
    }
    pred = sem.decoder(out["sem"]["zq"]).float()
    t = pred.shape[-1]
    mask = (torch.arange(t)[None, :] < (groups * 12)[:, None]).float()
    denom = mask.sum().clamp_min(1)
    n_mels = out["mel"].shape[1]
    losses["mel"] = ((pred[:, :n_mels] - out["mel"].float()).abs().mean(1) * mask).sum() / denom
    voiced = (f0 > 0).float()
    vm = voiced * mask
    losses["f0"] = ((pred[:, n_mels] - log_f0(f0)).abs() * vm).sum() / vm.sum().clamp_min(1)
    losses["voicing"] = (F.binary_cross_entropy_with_logits(pred[:, n_mels + 1], voiced, reduction="none") * mask).sum() / denom
    energy = (frame_energy(out["mel_raw"].float()) + 5.0) / 5.0
    losses["energy"] = ((pred[:, n_mels + 2] - energy).abs() * mask).sum() / denom
    total = sum(w[k] * v for k, v in losses.items()) + out["ling"]["vq_loss"] + out["sem"]["vq_loss"]
    losses["vq"] = out["ling"]["vq_loss"] + out["sem"]["vq_loss"]
    return total, losses, out


@torch.no_grad()
def quick_per(model: AudioTokenizer, items: list[Item], block: int, limit: int = 200) -> float:
    """PER of the linguistic-code readout on cached items (batched forward; same maths as encode)."""
    model.eval()
    errs = total = 0
    for s in range(0, min(limit, len(items)), 16):
        idx = list(range(s, min(s + 16, limit, len(items))))
        wav, lengths, *_ = collate(items, idx, block)
        out = model(wav, lengths)
        logits = model.linguistic.phone_logits(out["ling"]["codes"])
        for b, i in enumerate(idx):
            n = int(out["groups"][b]) * GROUP_LINGUISTIC * model.linguistic.cfg.ctc_upsample
            errs += ctc_phone_errors(logits[b, :n], items[i].phones)
            total += len(items[i].phones)
    model.train()
    return errs / max(1, total)


@torch.no_grad()
def recalibrate_norms(model: AudioTokenizer, items: list[Item], block: int, batch_seconds: float = 24.0,
                      max_batches: int = 150, seed: int = 0) -> None:
    """Set every FrameNorm's running statistics to the exact mean/variance of the final model over training data.

    The moving averages kept during training lag behind the drifting encoder; eval mode uses them, so they are
    recomputed once at the end (as for BatchNorm "precise statistics").
    """
    from npc_server.tokenizer.modules import FrameNorm

    norms = [m for m in model.modules() if isinstance(m, FrameNorm)]
    if not norms:
        return
    acc = {id(n): [0.0, 0.0, 0.0] for n in norms}

    def hook(mod, inputs, _out):
        x, mask = inputs[0].float(), inputs[1] if len(inputs) > 1 else None
        flat = x.reshape(-1, x.shape[-1])
        if mask is not None:
            flat = flat[mask.reshape(-1)]
        a = acc[id(mod)]
        a[0] += flat.shape[0]
        a[1] = a[1] + flat.sum(0)
        a[2] = a[2] + flat.pow(2).sum(0)

    handles = [n.register_forward_hook(hook) for n in norms]
    was_training = model.training
    model.eval()  # eval mode: the hook sees the raw encoder output; nothing else changes
    batches = make_batches(items, batch_seconds, block, random.Random(seed))[:max_batches]
    for idx in tqdm(batches, desc="recalibrate norms", unit="batch"):
        wav, lengths, *_ = collate(items, idx, block)
        model(wav, lengths)
    for h in handles:
        h.remove()
    for n in norms:
        cnt, s1, s2 = acc[id(n)]
        mean = s1 / cnt
        n.running_mean.copy_(mean)
        n.running_var.copy_((s2 / cnt - mean.pow(2)).clamp_min(0))
    model.train(was_training)


def set_mel_stats(model: AudioTokenizer, items: list[Item], n: int = 300, seed: int = 0) -> None:
    rng = random.Random(seed)
    pick = rng.sample(items, min(n, len(items)))
    mels = []
    with torch.no_grad():
        for it in pick:
            w = torch.from_numpy(it.wav.astype(np.float32) / 32767.0)
            w = F.pad(w, (0, (-len(w)) % 160))
            mels.append(model.mel.raw(w[None])[0])
    cat = torch.cat(mels, dim=1)
    model.mel.mean.copy_(cat.mean(1))
    model.mel.std.copy_(cat.std(1).clamp_min(0.1))


# ------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="npc-server train tokenizer", description=__doc__)
    p.add_argument("--corpus", type=Path, default=data_dir() / "corpus" / "default", help="corpus root (manifest.jsonl)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "tokenizer" / "model",
                   help="where to write model.safetensors + config.json (default runs/tokenizer/model)")
    p.add_argument("--run-dir", type=Path, default=REPO_ROOT / "runs" / "tokenizer", help="checkpoints, cache and logs")
    p.add_argument("--minutes", type=float, default=30.0, help="training wall-clock budget (the LR schedule follows it)")
    p.add_argument("--batch-seconds", type=float, default=48.0, help="padded audio seconds per batch")
    p.add_argument("--lr", type=float, default=2e-3)
    warmup = p.add_argument("--warmup-steps", dest="warmup", type=int, default=150, help="warm-up steps")
    alias(p, warmup, "--warmup")
    p.add_argument("--max-hours", type=float, default=None, help="train on a random subset of this many hours")
    precision = p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                               help="bf16 autocast or fp32; auto (default) measures which is faster on this CPU")
    alias(p, precision, "--dtype")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=2, help="processes for the audio/F0 cache")
    p.add_argument("--ckpt-every", type=float, default=120.0, help="seconds between resumable checkpoints")
    resume = p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint in --run-dir")
    alias(p, resume, "--fresh")
    p.add_argument("--prepare-only", action="store_true", help="only build the audio/F0 cache (works on a growing corpus)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (tests)")
    p.add_argument("--seed", type=int, default=0)
    a = advanced(p)
    a.add_argument("--preset", default="default", choices=["default", "tiny"])
    a.add_argument("--max-seconds", type=float, default=15.0, help="skip longer training utterances")
    a.add_argument("--freeze-norms", action="store_true",
                   help="recalibrate the pre-quantiser FrameNorm statistics, then train with them fixed (fine-tuning)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    corpus = args.corpus.expanduser()
    rows = read_manifest(corpus)
    train_rows = [r for r in rows if r.get("split") == "train" and r.get("duration", 0) <= args.max_seconds]
    valid_rows = [r for r in rows if r.get("split") == "valid"]
    if not train_rows:
        raise SystemExit(f"no training utterances in {corpus}/manifest.jsonl")
    run_dir = args.run_dir
    cache = run_dir / "cache"
    if args.max_hours is not None:
        rng.shuffle(train_rows)
        cached = _cached_ids(cache)
        train_rows.sort(key=lambda r: r["id"] not in cached)  # stable: already-cached utterances first
        keep, acc = [], 0.0
        for r in train_rows:
            if acc >= args.max_hours * 3600:
                break
            keep.append(r)
            acc += r.get("duration", 0.0)
        train_rows = keep
    valid_rows = rng.sample(valid_rows, min(200, len(valid_rows)))
    run_dir.mkdir(parents=True, exist_ok=True)
    prepare_cache(corpus, train_rows + valid_rows, cache, workers=args.workers)
    if args.prepare_only:
        return 0

    ckpt_path = run_dir / "checkpoint.pt"
    ckpt = None if args.no_resume or not ckpt_path.exists() else torch.load(ckpt_path, map_location="cpu", weights_only=False)
    if ckpt is not None:
        from npc_server.tokenizer.tokenizer import AudioTokenizerConfig

        cfg = AudioTokenizerConfig.from_dict(ckpt["config"])
        print(f"resuming from {ckpt_path} (step {ckpt['step']}, {ckpt['elapsed'] / 60:.1f} min done)")
    else:
        inventory = PhoneInventory.build(r.get("phonemes", "") for r in train_rows)
        cfg = preset(args.preset, inventory.phones)
    model = AudioTokenizer(cfg)
    inventory = model.inventory
    train = load_cache(cache, train_rows, inventory)
    valid = load_cache(cache, valid_rows, inventory)
    hours = sum(len(it.wav) for it in train) / SR / 3600
    print(f"tokenizer: {model.num_parameters() / 1e6:.2f}M params ({model.num_parameters(True) / 1e6:.2f}M in encoders), "
          f"{len(inventory)} phones, {len(train)} train utterances ({hours:.2f} h), {len(valid)} valid")
    if not train:
        raise SystemExit("no usable training utterances (audio missing or no phonemes)")

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    step, elapsed, epoch = 0, 0.0, 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        step, elapsed, epoch = ckpt["step"], ckpt["elapsed"], ckpt["epoch"]
    else:
        set_mel_stats(model, train, seed=args.seed)
    budget = args.minutes * 60
    block = cfg.block_samples
    if args.freeze_norms:
        recalibrate_norms(model, train, block, args.batch_seconds)
        _freeze_norms(model)
    from npc_server.training.precision import resolve

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=resolve(args.precision) == "bf16")
    log = (run_dir / "train_log.jsonl").open("a" if ckpt is not None else "w")
    model.train()
    bar = tqdm(total=int(budget), initial=int(min(elapsed, budget)), desc="train tokenizer", unit="s")
    t_last_ckpt = time.time()
    done = False
    while not done:
        batches = make_batches(train, args.batch_seconds, block, random.Random(args.seed + epoch))
        skip = ckpt.get("batch_in_epoch", 0) if ckpt is not None and epoch == ckpt["epoch"] else 0
        for bi, idx in enumerate(batches):
            if bi < skip:
                continue
            t0 = time.time()
            progress = min(1.0, elapsed / budget)
            lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
            for g in opt.param_groups:
                g["lr"] = lr
            batch = collate(train, idx, block)
            with autocast:
                total, losses, out = compute_losses(model, batch)
            opt.zero_grad(set_to_none=True)
            total.backward()
            gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            dt = time.time() - t0
            elapsed += dt
            bar.update(int(elapsed) - bar.n if int(elapsed) > bar.n else 0)
            rec = {k: round(float(v.detach()), 4) for k, v in losses.items()}
            usage_l = _batch_usage(out["ling"]["codes"], out["mask_l"], model.cfg.linguistic.codebook_size)
            usage_s = _batch_usage(out["sem"]["codes"], out["mask_s"], model.cfg.semantic.codebook_size)
            bar.set_postfix(step=step, ctc=rec["ctc_l"], mel=rec["mel"], f0=rec["f0"], use_l=round(usage_l, 2), use_s=round(usage_s, 2))
            rec.update(step=step, epoch=epoch, elapsed=round(elapsed, 1), lr=lr, grad_norm=float(gn), sec=round(dt, 3),
                       usage_l=usage_l, usage_s=usage_s)
            log.write(json.dumps(rec) + "\n")
            if time.time() - t_last_ckpt > args.ckpt_every:
                _checkpoint(ckpt_path, model, opt, step, elapsed, epoch, bi + 1)
                log.flush()
                t_last_ckpt = time.time()
            if elapsed >= budget or (args.max_steps is not None and step >= args.max_steps):
                done = True
                break
        else:
            epoch += 1
            ckpt = None
    bar.close()
    _checkpoint(ckpt_path, model, opt, step, elapsed, epoch, 0)
    log.close()
    model.eval()
    if not args.freeze_norms:
        recalibrate_norms(model, train, block, args.batch_seconds)
    model.save_pretrained(args.out)
    per = quick_per(AudioTokenizer.from_pretrained(args.out), valid, block) if valid else float("nan")
    summary = {"steps": step, "minutes": round(elapsed / 60, 2), "train_hours": round(hours, 2), "valid_per": round(per, 4), "out": str(args.out)}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return 0


def _freeze_norms(model: AudioTokenizer) -> None:
    from npc_server.tokenizer.modules import FrameNorm

    for m in model.modules():
        if isinstance(m, FrameNorm):
            m.frozen = True


def _batch_usage(codes: torch.Tensor, mask: torch.Tensor, size: int) -> float:
    """Fraction of the codebook used in this batch (a lower bound of the usage over the corpus)."""
    return codes[mask].unique().numel() / size


def _checkpoint(path: Path, model, opt, step, elapsed, epoch, batch_in_epoch) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "elapsed": elapsed, "epoch": epoch,
                "batch_in_epoch": batch_in_epoch, "config": model.cfg.to_dict()}, tmp)
    os.replace(tmp, path)
