"""Shared training loop for the backbone stages: AdamW, cosine LR, bf16 autocast, resumable checkpoints, DDP (gloo)."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from npc_server.argtools import advanced

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig:
    out_dir: Path
    steps: int = 1000
    batch_size: int = 8  # per process
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    precision: str = "bf16"  # "bf16" (autocast) | "fp32"
    ckpt_every: int = 200
    log_every: int = 10
    seed: int = 0
    stop_after: int | None = None  # end this run after N total steps (resume later with the same --steps)
    resume: bool = True
    bucket: bool = True  # length-bucketed batches (less padding)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"precision must be bf16 or fp32, got {self.precision!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")


def add_train_args(parser: argparse.ArgumentParser, steps: int, lr: float, batch_size: int = 8) -> None:
    g = parser.add_argument_group("training loop")
    g.add_argument("--out", type=Path, required=True, help="run folder (checkpoint.pt, train_log.jsonl, model/)")
    g.add_argument("--steps", type=int, default=steps)
    g.add_argument("--batch-size", type=int, default=batch_size, help="examples per process per step")
    g.add_argument("--lr", type=float, default=lr)
    g.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of --steps")
    g.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="bf16 autocast or fp32; auto (default) measures which is faster on this CPU")
    g.add_argument("--ckpt-every", type=int, default=200)
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop-after", type=int, default=None, help="stop after this many total steps (resumable)")
    g.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint.pt in --out")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    a = advanced(parser)
    a.add_argument("--weight-decay", type=float, default=0.1)
    a.add_argument("--no-bucket", action="store_true", help="plain random batches instead of length-bucketed ones")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    from npc_server.training.precision import resolve

    if args.threads:
        torch.set_num_threads(args.threads)
    precision = resolve(args.precision)
    if args.precision == "auto":
        log.info("precision: %s (measured faster on this CPU)", precision)
    return TrainConfig(
        out_dir=args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        warmup_steps=args.warmup_steps if args.warmup_steps is not None else max(1, args.steps // 20),
        weight_decay=args.weight_decay, precision=precision, ckpt_every=args.ckpt_every,
        log_every=args.log_every, seed=args.seed, stop_after=args.stop_after, resume=not args.no_resume,
        bucket=not args.no_bucket,
    )


# --- distributed -----------------------------------------------------------------------------------------------
def setup_distributed() -> tuple[int, int]:
    """(rank, world). Initialises a gloo (CPU) / nccl (CUDA) process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("NPC_DIST_BACKEND") != "gloo" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # generous timeout: rank 0 may tokenize or train a tokenizer while the others wait at a barrier
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=6))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def param_checksum(model: torch.nn.Module) -> float:
    """A position-weighted sum of all parameters: equal across ranks iff the replicas are (practically) equal."""
    total = 0.0
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            flat = p.detach().double().flatten()
            total += float((flat * torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64)).sum()) * (i + 1)
    return total


# --- schedule / data order -------------------------------------------------------------------------------------
def lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class DataOrder:
    """Which examples each rank sees at each step: a seeded permutation per epoch, a function of the step only,
    so a resumed run continues exactly where it stopped.

    With `lengths`, each epoch is length-bucketed to cut padding: the permutation is cut into pools of
    `pool_batches` global batches, each pool is sorted by length and cut into global batches (world x batch_size
    consecutive examples, so all ranks get similar lengths), and the batch order is shuffled again."""

    def __init__(self, n: int, batch_size: int, rank: int, world: int, seed: int,
                 lengths: list[int] | None = None, pool_batches: int = 32):
        if lengths is not None and len(lengths) != n:
            raise ValueError("need one length per example")
        self.n, self.b, self.rank, self.world, self.seed = n, batch_size, rank, world, seed
        self.lengths, self.pool_batches = lengths, pool_batches
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
            if self.lengths is not None:
                gb = self.b * self.world
                pool = gb * self.pool_batches
                batches = []
                for i in range(0, self.n, pool):
                    chunk = sorted(perm[i:i + pool], key=lambda j: self.lengths[j])
                    batches += [chunk[k:k + gb] for k in range(0, len(chunk), gb)]
                order = torch.randperm(len(batches), generator=g).tolist()
                perm = [j for b in order for j in batches[b]]
            self._perms = {epoch: perm}
        return self._perms[epoch]

    def indices(self, step: int) -> list[int]:
        start = (step * self.world + self.rank) * self.b
        return [self._perm(i // self.n)[i % self.n] for i in range(start, start + self.b)]


# --- loop ------------------------------------------------------------------------------------------------------
LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict[str, float]]]


def autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train(
    model: torch.nn.Module,
    examples: list,
    collate_fn: Callable[[list], dict],
    loss_fn: LossFn,
    cfg: TrainConfig,
    save_final: Callable[[torch.nn.Module, Path], None],
    desc: str = "train",
) -> dict:
    """Train `model` in place. Returns the run summary (also written to out_dir/summary.json by rank 0)."""
    rank, world = setup_distributed()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else \
        torch.device("cpu")
    torch.manual_seed(cfg.seed)
    model.to(device).train()
    if not examples:
        raise ValueError("no training examples")
    out = cfg.out_dir
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    barrier()

    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: lr_factor(s, cfg))

    start = 0
    ckpt_path = out / CHECKPOINT
    if cfg.resume and ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optim.load_state_dict(state["optim"])
        sched.load_state_dict(state["sched"])
        start = int(state["step"])
        if state.get("world", world) != world or state.get("batch_size", cfg.batch_size) != cfg.batch_size:
            log.warning("resuming with a different world size / batch size: the data order changes")
        if rank == 0:
            log.info("resumed from %s at step %d", ckpt_path, start)

    wrapped = DistributedDataParallel(model) if world > 1 else model
    lengths = [max(len(e.chosen), len(e.rejected)) if hasattr(e, "chosen") else len(e) for e in examples]
    order = DataOrder(len(examples), cfg.batch_size, rank, world, cfg.seed, lengths if cfg.bucket else None)
    end = min(cfg.steps, cfg.stop_after) if cfg.stop_after else cfg.steps

    def save_checkpoint(step: int) -> None:
        if rank == 0:
            tmp = ckpt_path.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "optim": optim.state_dict(), "sched": sched.state_dict(),
                        "step": step, "world": world, "batch_size": cfg.batch_size, "config": _jsonable(cfg)}, tmp)
            tmp.replace(ckpt_path)
        barrier()

    log_file = (out / "train_log.jsonl").open("a", encoding="utf-8") if rank == 0 else None
    bar = tqdm(range(start, end), desc=desc, initial=start, total=end, disable=rank != 0, dynamic_ncols=True)
    t0 = time.perf_counter()
    last: dict[str, float] = {}
    for step in bar:
        batch = collate_fn([examples[i] for i in order.indices(step)])
        batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        with autocast(cfg.precision, device):
            loss, metrics = loss_fn(wrapped, batch)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optim.step()
        sched.step()
        last = {"loss": float(loss.detach()), "grad_norm": float(grad_norm), **metrics}
        if rank == 0:
            bar.set_postfix(loss=f"{last['loss']:.3f}")
            if (step + 1) % cfg.log_every == 0 or step + 1 == end:
                rec = {"step": step + 1, "lr": sched.get_last_lr()[0], "elapsed_s": time.perf_counter() - t0, **last}
                log_file.write(json.dumps(rec) + "\n")
                log_file.flush()
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == end:
            save_checkpoint(step + 1)
    bar.close()
    if log_file:
        log_file.close()

    checksum = param_checksum(model)
    checksums = [checksum]
    if dist.is_initialized():
        checksums = [None] * world
        dist.all_gather_object(checksums, checksum)
        if max(checksums) - min(checksums) > 1e-6 * max(1.0, abs(checksum)):
            raise RuntimeError(f"replicas diverged: parameter checksums {checksums}")
    complete = end >= cfg.steps
    summary = {"stage": desc, "steps_done": end, "steps": cfg.steps, "complete": complete, "world": world,
               "resumed_from": start, "examples": len(examples), "last": last, "param_checksums": checksums,
               "train_s": time.perf_counter() - t0, "config": _jsonable(cfg)}
    if rank == 0:
        if complete:
            save_final(model, out / "model")
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    barrier()
    return summary


def _jsonable(cfg: TrainConfig) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}


def teardown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
