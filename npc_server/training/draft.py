"""`npc-server train draft`: the draft backbone of speculative audio decoding, trained on the SFT data and
optionally distilled from the backbone (KL to its next-token distribution where answer audio is predicted)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from npc_server.argtools import advanced
from npc_server.backbone.model import PRESETS, build_model, count_parameters, preset
from npc_server.backbone.template import KIND_AUDIO
from npc_server.training.lm_common import (
    add_data_args,
    corpus_dir,
    load_bundle,
    prepare_token_cache,
    save_bundle,
)
from npc_server.training.lm_data import collate, sft_training_set
from npc_server.training.loop import (
    add_train_args,
    config_from_args,
    setup_distributed,
    teardown_distributed,
    train,
)
from npc_server.training.losses import token_losses


def make_draft_loss(teacher: torch.nn.Module | None, distill: float, audio_end_id: int):
    """Next-token cross-entropy on the targets, plus `distill` x KL(backbone || draft) on the positions that
    predict answer audio (semantic tokens and the <|audio_end|> that closes a span): what the draft proposes."""
    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)

    def loss_fn(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        t = token_losses(model, batch)
        logits, labels, kinds, per_tok, valid, loss = t.logits, t.labels, t.kinds, t.per_token, t.valid, t.mean
        audio = valid & ((kinds == KIND_AUDIO) | (labels == audio_end_id))
        metrics = {}
        with torch.no_grad():
            if audio.any():
                metrics["audio_loss"] = float(per_tok[audio].mean())
            if (valid & ~audio).any():
                metrics["other_loss"] = float(per_tok[valid & ~audio].mean())
        if teacher is not None and distill > 0 and audio.any():
            device = batch["input_ids"].device
            if next(teacher.parameters()).device != device:
                teacher.to(device)
            with torch.no_grad():
                hidden = teacher.model(input_ids=batch["input_ids"],
                                       attention_mask=batch["attention_mask"]).last_hidden_state[:, :-1]
                t_logp = torch.log_softmax(teacher.lm_head(hidden[audio]).float(), dim=-1)
            s_logp = torch.log_softmax(logits[audio], dim=-1)
            kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
            loss = loss + distill * kl
            metrics["kl_audio"] = float(kl.detach())
        return loss, metrics

    return loss_fn


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="npc-server train draft", description=__doc__)
    add_data_args(parser)
    parser.add_argument("--init-target", type=Path, required=True,
                        help="the backbone bundle the draft serves (its text tokenizer and vocabulary; the teacher)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="draft", help="draft model size")
    parser.add_argument("--init", type=Path, default=None, help="continue from this draft bundle")
    parser.add_argument("--export", type=Path, default=None,
                        help="also write the final draft bundle here (e.g. models/default/draft)")
    add_train_args(parser, steps=3000, lr=1e-3)
    a = advanced(parser)
    a.add_argument("--distill", type=float, default=1.0,
                   help="weight of KL(backbone || draft) on answer-audio positions (0: plain LM loss, no "
                        "backbone forward passes, ~3x faster per step)")
    a.add_argument("--pretrain-mix", type=float, default=0.1,
                   help="add this fraction (relative to the SFT set) of pretraining sequences")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = config_from_args(args)
    rank, world = setup_distributed()
    corpus = corpus_dir(args)
    cache = prepare_token_cache(args, rank, world)

    target, target_config, tok, template = load_bundle(args.init_target)
    if args.init:
        model, config, _, _ = load_bundle(args.init)
        if config.n_text != target_config.n_text:
            raise ValueError(f"draft {args.init} does not share the vocabulary of {args.init_target}")
    else:
        config = preset(args.preset, n_text=target_config.n_text)
        torch.manual_seed(cfg.seed)
        model = build_model(config)
    if config.max_positions < target_config.max_positions:
        raise ValueError(f"a draft needs the backbone's context ({target_config.max_positions}), preset "
                         f"{config.preset!r} has {config.max_positions}")
    if rank == 0:
        print(f"draft {config.preset}: {count_parameters(model) / 1e6:.2f}M parameters "
              f"(backbone {count_parameters(target) / 1e6:.2f}M), distill weight {args.distill}")
    examples = sft_training_set(corpus, cache, template, args.personas, args.pretrain_mix, cfg.seed, args.max_len)
    pad = config.layout.special("<|pad|>")
    loss_fn = make_draft_loss(target if args.distill > 0 else None, args.distill,
                              config.layout.special("<|audio_end|>"))

    def save_final(m: torch.nn.Module, directory: Path) -> None:
        save_bundle(m, config, tok, directory)
        if args.export:
            save_bundle(m, config, tok, args.export)

    train(model.train(), examples, lambda b: collate(b, pad), loss_fn, cfg, save_final=save_final, desc="draft")
    teardown_distributed()
    return 0
