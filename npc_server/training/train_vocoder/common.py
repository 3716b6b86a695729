"""What the vocoder's stages share: the time-budgeted, resumable training loop and loading / writing the vocoder."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from npc_server.vocoder.flow import FlowConfig, FlowDecoder
from npc_server.vocoder.generator import Generator, GeneratorConfig
from npc_server.vocoder.vocoder import Vocoder


def _lr(base: float, frac: float, step: int, warmup: int = 200) -> float:
    w = min(1.0, (step + 1) / warmup)
    return base * w * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def train_loop(name, model, make_batch, loss_fn, run_dir: Path, minutes: float, lr: float, log_every: int = 25):
    """Time-budgeted training of `model` on `loss_fn(model, make_batch()) -> (loss, parts)` (AdamW, warm-up + cosine,
    clipped gradients, tqdm); resumes from and saves `run_dir`/ckpt_<name>.pt every 2 min. -> statistics."""
    ckpt_path = run_dir / f"ckpt_{name}.pt"
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.8, 0.99), weight_decay=0.01)
    step, spent = 0, 0.0
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        missing, unexpected = model.load_state_dict(ck["model"], strict=False)
        if missing or unexpected:
            print(f"{ckpt_path}: architecture changed ({len(missing)} new, {len(unexpected)} dropped tensors); "
                  "warm start with a fresh optimiser and time budget")
        else:
            opt.load_state_dict(ck["opt"])
            step, spent = ck["step"], ck["spent_s"]
            print(f"resumed {name} from {ckpt_path} at step {step} ({spent / 60:.1f} min spent)")
    budget = minutes * 60
    model.train()
    t0, last_save = time.time() - spent, time.time()
    history, part_sums = [], {}
    bar = tqdm(total=int(budget), desc=f"train {name}", unit="s", initial=int(spent))
    while time.time() - t0 < budget:
        frac = (time.time() - t0) / budget
        for group in opt.param_groups:
            group["lr"] = _lr(lr, frac, step)
        loss, parts = loss_fn(model, make_batch())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        history.append(loss.item())
        for k, v in parts.items():
            part_sums[k] = part_sums.get(k, 0.0) + v
        if step % log_every == 0:  # loss terms averaged over the last log_every steps
            bar.set_postfix(step=step, loss=f"{np.mean(history[-log_every:]):.4f}",
                            **{k: f"{v / log_every:.3f}" for k, v in part_sums.items()})
            part_sums = {}
        bar.update(int(time.time() - t0) - bar.n)
        if time.time() - last_save > 120:
            _save_ckpt(ckpt_path, model, opt, step, time.time() - t0)
            last_save = time.time()
    bar.close()
    _save_ckpt(ckpt_path, model, opt, step, time.time() - t0)
    model.eval()
    first = float(np.mean(history[:log_every])) if history else float("nan")
    last = float(np.mean(history[-log_every:])) if history else float("nan")
    return {"steps": step, "minutes": (time.time() - t0) / 60, "loss_first": first, "loss_last": last}


def _save_ckpt(path: Path, model, opt, step: int, spent: float) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "spent_s": spent}, tmp)
    tmp.replace(path)


def load_or_new_vocoder(out: Path, init: Path | None, flow_cfg: FlowConfig, gen_cfg: GeneratorConfig) -> Vocoder:
    for d in (out, init):
        if d is not None and (d / "model.safetensors").exists():
            print(f"starting from the vocoder in {d}")
            return Vocoder.from_pretrained(d)
    return Vocoder(FlowDecoder(flow_cfg), Generator(gen_cfg))


def export_vocoder(vocoder: Vocoder, out: Path, info: dict, component: str, init: Path | None = None) -> None:
    """Write the vocoder to `out`, taking only `component` ("flow" or "generator") from this run: the other one
    is re-read from `out` so that two stages training at the same time do not undo each other. training.json keeps
    the history (of `out`, else of `init`); a stage trained again is added as "flow_2", "flow_3", ..."""
    if (out / "model.safetensors").exists():
        shipped = Vocoder.from_pretrained(out)
        setattr(shipped, component, getattr(vocoder, component))
        vocoder = shipped
    vocoder.save_pretrained(out)
    info_path = out / "training.json"
    source = info_path if info_path.exists() else (init / "training.json" if init is not None else None)
    history = json.loads(source.read_text()) if source is not None and source.exists() else {}
    for key, value in info.items():
        name, n = key, 2
        while name in history:
            name, n = f"{key}_{n}", n + 1
        history[name] = value
    info_path.write_text(json.dumps(history, indent=2))
    print(f"saved vocoder to {out} ({(out / 'model.safetensors').stat().st_size / 1e6:.1f} MB)")
