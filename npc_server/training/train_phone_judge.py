"""Training and scoring of the mel phone judge (`npc-server train vocoder --stage judge`): CTC on the ground-truth
log-mels of the flow's mel cache, phones from the corpus manifest, phone error rate on held-out utterances."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from npc_server.audio.io import load_audio, resample
from npc_server.eval.metrics import judge_phone_error_rate
from npc_server.tokenizer.phones import PhoneInventory
from npc_server.training.train_readout import batches
from npc_server.training.train_vocoder.common import train_loop
from npc_server.vocoder.mel import LogMel, MelConfig
from npc_server.vocoder.phone_judge import PhoneJudge


@dataclass
class JudgeItem:
    mel: torch.Tensor  # [n_mels, F] raw log-mel
    phones: list[int]  # reference phone ids (1..n)
    uid: str = ""
    speaker: str = ""


def items_from_mel_cache(mel_cache: dict, rows: list[dict], inventory: PhoneInventory) -> list[JudgeItem]:
    """Every cached mel (originals and pitch-shifted copies) with the phones of its utterance."""
    phonemes = {r["id"]: r.get("phonemes", "") for r in rows}
    out = []
    for uid, item in mel_cache.items():
        phones = inventory.encode(phonemes.get(uid, ""))
        for mel, *_ in item["mels"]:
            if phones and mel.shape[-1] // 2 >= len(phones):
                out.append(JudgeItem(mel, phones, uid, item["speaker"]))
    return out


def heldout_items(rows: list[dict], corpus: Path, inventory: PhoneInventory, n: int, role: str = "npc",
                  seed: int = 0) -> list[JudgeItem]:
    """Log-mels of `n` held-out utterances of one role, computed from their audio."""
    pool = [r for r in rows if r.get("split") == "heldout" and r.get("role") == role]
    random.Random(seed).shuffle(pool)
    cfg = MelConfig()
    logmel = LogMel(cfg)
    out = []
    for r in pool[:n]:
        phones = inventory.encode(r.get("phonemes", ""))
        if not phones:
            continue
        wav, sr = load_audio(corpus / r["audio"])
        with torch.no_grad():
            mel = logmel(torch.from_numpy(resample(wav, sr, cfg.sample_rate)))[0]
        out.append(JudgeItem(mel, phones, r["id"], r["speaker"]))
    return out


def collate(items: list[JudgeItem]):
    frames = torch.tensor([it.mel.shape[-1] for it in items])
    mel = torch.full((len(items), items[0].mel.shape[0], int(frames.max())), MelConfig().log_floor).log()
    for b, it in enumerate(items):
        mel[b, :, : frames[b]] = it.mel.float()
    targets = torch.tensor([p for it in items for p in it.phones])
    tlen = torch.tensor([len(it.phones) for it in items])
    return mel, frames, targets, tlen


def ctc_loss(judge: PhoneJudge, batch) -> torch.Tensor:
    mel, frames, targets, tlen = batch
    lp = F.log_softmax(judge(mel).float(), dim=-1).transpose(0, 1)
    return F.ctc_loss(lp, targets, judge.out_lengths(frames), tlen, blank=0, zero_infinity=True)


def train_judge(judge: PhoneJudge, items: list[JudgeItem], valid: list[JudgeItem], run_dir: Path, minutes: float,
                lr: float, max_frames: int, seed: int) -> dict:
    """Time-budgeted CTC training (the vocoder stages' loop, resumable from `run_dir`/ckpt_judge.pt) on length
    buckets of about `max_frames` padded mel frames; returns the statistics with the held-out PER."""
    rng = random.Random(seed)
    buckets = batches([it.mel.shape[-1] for it in items], max_frames, rng)
    stats = train_loop("judge", judge, lambda: collate([items[i] for i in rng.choice(buckets)]),
                       lambda model, batch: (ctc_loss(model, batch), {}), run_dir, minutes, lr, log_every=50)
    per = judge_phone_error_rate(judge, [v.mel for v in valid], [v.phones for v in valid]) if valid else float("nan")
    return {**stats, "heldout_per": per, "heldout_utterances": len(valid), "train_mels": len(items)}
