"""Backbone losses: next-token cross-entropy on target positions, and DPO with log-probs over text tokens only."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from npc_server.backbone.template import KIND_AUDIO, KIND_TEXT
from npc_server.training.lm_data import IGNORE


def _logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@dataclass
class TokenLosses:
    """Next-token cross-entropy of one batch, position by position (everything shifted: position t predicts t+1)."""

    logits: torch.Tensor  # [B, T-1, V] float32
    labels: torch.Tensor  # [B, T-1], IGNORE where nothing is predicted
    kinds: torch.Tensor  # [B, T-1] token kinds of the labels
    per_token: torch.Tensor  # [B, T-1], 0 where ignored
    valid: torch.Tensor  # [B, T-1] bool

    @property
    def mean(self) -> torch.Tensor:
        return self.per_token.sum() / self.valid.sum().clamp(min=1)


def token_losses(model: torch.nn.Module, batch: dict) -> TokenLosses:
    logits = _logits(model, batch)[:, :-1].float()
    labels = batch["labels"][:, 1:]
    per_tok = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE,
                              reduction="none").view_as(labels)
    return TokenLosses(logits, labels, batch["kinds"][:, 1:], per_tok, labels != IGNORE)


def lm_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean cross-entropy over target positions; reports text and audio losses separately."""
    t = token_losses(model, batch)
    loss, per_tok, valid, kinds = t.mean, t.per_token, t.valid, t.kinds
    metrics = {}
    with torch.no_grad():
        for name, kind in (("text_loss", KIND_TEXT), ("audio_loss", KIND_AUDIO)):
            m = valid & (kinds == kind)
            if m.any():
                metrics[name] = float(per_tok[m].mean())
    return loss, metrics


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, kinds: torch.Tensor,
                   kind: int | None = KIND_TEXT) -> torch.Tensor:
    """Sum of log p(label) over target positions of the given kind (None = all targets); logits are unshifted
    model outputs [B, T, V], labels/kinds [B, T]. Returns [B]."""
    logits = logits[:, :-1].float()
    labels = labels[:, 1:]
    kinds = kinds[:, 1:]
    mask = labels != IGNORE
    if kind is not None:
        mask = mask & (kinds == kind)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Direct Preference Optimisation (Rafailov et al. 2023) on per-sequence log-probs."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    margin = chosen_reward - rejected_reward
    loss = -F.logsigmoid(margin).mean()
    with torch.no_grad():
        metrics = {"reward_acc": float((margin > 0).float().mean()), "margin": float(margin.mean()),
                   "chosen_reward": float(chosen_reward.mean()), "rejected_reward": float(rejected_reward.mean())}
    return loss, metrics


def make_dpo_loss(reference: torch.nn.Module, beta: float = 0.1, sft_weight: float = 0.0):
    """Loss function for `loop.train` on `collate_pairs` batches (chosen rows first, then rejected). The DPO
    log-probs cover KIND_TEXT target positions only; `sft_weight` adds the chosen answer's full LM loss
    (text and audio) to keep the audio channel anchored."""
    reference.eval()
    for p in reference.parameters():
        p.requires_grad_(False)

    def loss_fn(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        n = int(batch["n_pairs"])
        device = batch["input_ids"].device
        if next(reference.parameters()).device != device:
            reference.to(device)
        logits = _logits(model, batch)
        logps = sequence_logps(logits, batch["labels"], batch["kinds"], KIND_TEXT)
        with torch.no_grad():
            ref_logps = sequence_logps(_logits(reference, batch), batch["labels"], batch["kinds"], KIND_TEXT)
        loss, metrics = dpo_loss(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], beta)
        if sft_weight > 0:
            lg = logits[:n, :-1].float()
            labels = batch["labels"][:n, 1:]
            nll = F.cross_entropy(lg.reshape(-1, lg.size(-1)), labels.reshape(-1), ignore_index=IGNORE)
            loss = loss + sft_weight * nll
            metrics["sft_nll"] = float(nll)
        return loss, metrics

    return loss_fn
