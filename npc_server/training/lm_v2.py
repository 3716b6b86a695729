"""Shared training code of backbone v2's stages: the model to start from, batches of fixed shapes, the loss, the
time-budgeted loop with checkpoints, and the per-run log.

Every stage starts from the last saved weights (`--init`, default the shipped backbone when it is a v2 one), so
training goes on across runs; each run appends its record (loss, tokens, minutes, eval figure) to
`<out>/training.json`.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import re
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from npc_server.backbone.audio_lm import AudioLM, AudioLMConfig, load_body
from npc_server.backbone.template_v2 import IGNORE, Example

LENGTH_BUCKETS = (64, 96, 128, 192, 256, 384)  # padded sequence lengths: few shapes (a new one costs on CPU)


def is_v2_backbone(directory: Path) -> bool:
    try:
        return json.loads((Path(directory) / "config.json").read_text()).get("version") == 2
    except (OSError, ValueError):
        return False


def head_text_ids(text_tokenizer, texts: list[str], extra: list[int] = ()) -> torch.Tensor:
    """The text ids an answer may use: every id of `texts` (+ the base model's bos/eos and `extra`)."""
    ids = set(extra) | {text_tokenizer.bos_token_id, text_tokenizer.eos_token_id}
    for t in texts:
        ids.update(text_tokenizer.encode(t, add_special_tokens=False))
    return torch.tensor(sorted(i for i in ids if i is not None), dtype=torch.long)


LATIN_PIECE = re.compile(r"^[A-Za-z0-9 .,!?'\-]+$")


def common_text_ids(text_tokenizer, below: int = 16000) -> list[int]:
    """Latin-script pieces among the base vocabulary's first `below` ids (roughly its most frequent): a general
    English output vocabulary (11,712 ids of Gemma 3's first 16,000) for speech outside the training texts."""
    out = []
    for i in range(below):
        piece = text_tokenizer.convert_ids_to_tokens(i).replace("\u2581", " ")
        if piece.strip() and LATIN_PIECE.match(piece):
            out.append(i)
    return out


def start_model(init: Path | None, cfg: AudioLMConfig, texts: list[str], text_tokenizer, body=None) -> AudioLM:
    """Continue from a saved v2 backbone, or build a fresh one (new rows, zero LoRA) whose head covers `texts`."""
    if init is not None and is_v2_backbone(init):
        model = AudioLM.from_pretrained(init, body=body)
        missing = set(head_text_ids(text_tokenizer, texts).tolist()) - set(model.head_ids.tolist())
        if missing:  # the head is tied to the embeddings: new text rows cost no new parameters
            model.set_head(torch.cat([model.head_text_ids(), torch.tensor(sorted(missing), dtype=torch.long)]))
            print(f"{len(missing)} text ids of the data added to the output rows of {init}")
        return model
    body = body if body is not None else load_body(cfg.base)
    return AudioLM(cfg, body, head_text_ids(text_tokenizer, texts))


def bucket_length(n: int) -> int:
    for b in LENGTH_BUCKETS:
        if n <= b:
            return b
    raise ValueError(f"example of {n} tokens is longer than the longest bucket ({LENGTH_BUCKETS[-1]})")


def make_batches(examples: list[Example], batch_tokens: int, rng: random.Random) -> list[tuple[int, list[int]]]:
    """(padded length, example indices) with about `batch_tokens` padded tokens each, in random order."""
    by_bucket: dict[int, list[int]] = {}
    for i, ex in enumerate(examples):
        by_bucket.setdefault(bucket_length(len(ex.ids)), []).append(i)
    out = []
    for length, idx in by_bucket.items():
        rng.shuffle(idx)
        size = max(1, batch_tokens // length)
        out += [(length, idx[k : k + size]) for k in range(0, len(idx), size) if len(idx[k : k + size]) == size]
    rng.shuffle(out)
    return out


def collate(examples: list[Example], idx: list[int], length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(idx), length), pad_id, dtype=torch.long)
    tgt = torch.full((len(idx), length), IGNORE, dtype=torch.long)
    for b, i in enumerate(idx):
        ex = examples[i]
        ids[b, : len(ex.ids)] = torch.tensor(ex.ids)
        tgt[b, : len(ex.targets)] = torch.tensor(ex.targets)
    return ids, tgt


def lm_loss(model: AudioLM, ids: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the target positions (logits only there, over the output rows)."""
    hidden, _ = model(ids)
    rows = model.head_index[targets.clamp_min(0)]
    keep = (targets != IGNORE) & (rows >= 0)
    logits = model.logits(hidden[keep]).float()
    return F.cross_entropy(logits, rows[keep]), int(keep.sum())


@dataclass
class RunResult:
    steps: int
    tokens: int
    seconds: float
    losses: list[float]


class _LossOf(torch.nn.Module):
    """A batch's loss as one module's forward, so that DistributedDataParallel sees every use of the parameters."""

    def __init__(self, model: AudioLM, loss: Callable[..., torch.Tensor]):
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.loss(self.model, *tensors)


def _lm_batch_loss(model: AudioLM, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return lm_loss(model, ids, targets)[0]


def sequence_logps(model: AudioLM, ids: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the summed log-probability of its target tokens (over the output rows), and their count."""
    hidden, _ = model(ids)
    rows = model.head_index[targets.clamp_min(0)]
    keep = (targets != IGNORE) & (rows >= 0)
    logp = torch.log_softmax(model.logits(hidden[keep]).float(), -1).gather(1, rows[keep][:, None])[:, 0]
    seq = torch.zeros(ids.shape[0], dtype=logp.dtype).index_add(0, keep.nonzero()[:, 0], logp)
    return seq, keep.sum(1)


def train_loop(model: AudioLM, examples: list, minutes: float, batch_tokens: int, lr: float,
               precision: str, pad_id: int, seed: int = 0, max_steps: int | None = None,
               save: Callable[[], None] | None = None, save_every_minutes: float = 15.0,
               progress: bool = True, batch_loss: Callable[..., torch.Tensor] = _lm_batch_loss,
               make_batch: Callable[..., tuple] = collate) -> RunResult:
    """AdamW on the trainable parameters (LoRA at `lr`, new embedding rows at 4x), warm-up then cosine to 10% over
    the time budget; `save()` every `save_every_minutes` and at the end (rank 0).

    By default the loss is the LM loss on `Example`s; a stage with other examples (DPO pairs) passes
    `make_batch(examples, idx, length, pad_id) -> tensors` and `batch_loss(model, *tensors) -> loss` (examples need
    an `ids` list for the length buckets).

    Under torchrun (WORLD_SIZE > 1) each rank takes its share of every epoch's batches, gradients are averaged by
    DistributedDataParallel, and the ranks agree each step on whether the time budget is spent."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from npc_server.training.loop import barrier, setup_distributed

    rank, world = setup_distributed()
    rng = random.Random(seed)  # the same on every rank: the same batches, split by rank
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    rows = [model.new_embed.weight]
    for p in lora + rows:
        p.requires_grad_(True)
    loss_of = _LossOf(model, batch_loss)
    wrapped = DistributedDataParallel(loss_of) if world > 1 else loss_of
    opt = torch.optim.AdamW([{"params": lora, "lr": lr, "base": lr}, {"params": rows, "lr": 4 * lr, "base": 4 * lr}],
                            weight_decay=0.0, betas=(0.9, 0.98))
    model.train()
    budget, t0, last_save = minutes * 60, time.perf_counter(), time.perf_counter()
    step, tokens, losses = 0, 0, []
    bar = tqdm(total=int(budget), unit="s", desc="train", disable=not progress or rank != 0)
    done = not examples
    while not done:
        epoch = make_batches(examples, batch_tokens, rng)
        per_rank = len(epoch) // world
        if per_rank == 0:
            raise ValueError(f"{len(examples)} examples make fewer batches than ranks ({world})")
        for length, idx in epoch[rank * per_rank : (rank + 1) * per_rank]:
            frac = min(1.0, (time.perf_counter() - t0) / budget)
            for g in opt.param_groups:
                g["lr"] = g["base"] * min(1.0, (step + 1) / 30) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
            tensors = make_batch(examples, idx, length, pad_id)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = wrapped(*tensors)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(lora + rows, 1.0)
            opt.step()
            step += 1
            tokens += int((tensors[0] != pad_id).sum()) * world
            losses.append(float(loss.detach()))
            elapsed = time.perf_counter() - t0
            bar.n = min(int(budget), int(elapsed))
            bar.set_postfix(step=step, loss=f"{np.mean(losses[-20:]):.3f}", tok_s=f"{tokens / elapsed:.0f}")
            if rank == 0 and not progress and step % 20 == 0:
                print(f"step {step}: loss {np.mean(losses[-20:]):.3f}, {tokens / elapsed:.0f} tok/s, "
                      f"{elapsed / 60:.1f} min", flush=True)
            if save is not None and time.perf_counter() - last_save > save_every_minutes * 60:
                model.eval()
                if rank == 0:
                    save()
                barrier()
                model.train()
                last_save = time.perf_counter()
            stop = torch.tensor([float(elapsed >= budget or (max_steps is not None and step >= max_steps))])
            if world > 1:
                dist.all_reduce(stop, op=dist.ReduceOp.MAX)
            if stop.item() > 0:
                done = True
                break
    bar.close()
    model.eval()
    for p in lora + rows:
        p.requires_grad_(False)
    if save is not None and rank == 0:
        save()
    barrier()
    return RunResult(step, tokens, time.perf_counter() - t0, losses)


def token_cache(corpus: Path, tokens: Path | None, command: str) -> tuple[Path, Path]:
    """(corpus, its v2 token cache) of a stage's --corpus / --tokens; ends the command when the cache is missing."""
    corpus = Path(corpus).expanduser()
    tokens = Path(tokens or corpus / "tokens_v2").expanduser()
    if not tokens.is_dir():
        raise SystemExit(f"npc-server {command}: no v2 token cache at {tokens}; run `npc-server train tokenizer-v2 "
                         f"--corpus {corpus}` first")
    return corpus, tokens


@contextlib.contextmanager
def stop_on_signals():
    """While training: SIGTERM and SIGINT (`kill`, Ctrl-C; also for a run started in the background, where the shell
    ignores SIGINT) raise KeyboardInterrupt, which a stage's loop takes as "end the run now and keep what it
    learned". The previous handlers come back afterwards. Outside the main thread it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    before = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def continue_run_log(init: Path | None, out: Path) -> None:
    """Start <out>/training.json from the log of the backbone a run continues, so the file is the curve across runs."""
    if init is not None and (Path(init) / "training.json").exists() and Path(init).resolve() != Path(out).resolve():
        Path(out).mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(init) / "training.json", Path(out) / "training.json")


def run_record(stage: str, init: str, result: RunResult, precision: str, threads: int, command: str, **extra) -> dict:
    """A run's entry in training.json: what ran, how long, how fast, the loss at its start and end (+ `extra`)."""
    mean = lambda xs: round(float(np.mean(xs)), 4) if xs else None
    return {"stage": stage, "date": time.strftime("%Y-%m-%d %H:%M"), "init": init, **extra, "steps": result.steps,
            "tokens": result.tokens, "minutes": round(result.seconds / 60, 1),
            "tokens_per_s": round(result.tokens / max(result.seconds, 1e-9)),
            "loss_first": mean(result.losses[:20]), "loss_last": mean(result.losses[-20:]),
            "precision": precision, "threads": threads, "command": command}


def append_run_log(out: Path, record: dict) -> None:
    path = Path(out) / "training.json"
    runs = json.loads(path.read_text()).get("runs", []) if path.exists() else []
    path.write_text(json.dumps({"runs": runs + [record]}, indent=2, ensure_ascii=False) + "\n")
