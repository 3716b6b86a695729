"""`npc-server train dpo`: backbone stage 3, DPO on (correct, wrong/ignoring) answer pairs, loss on text tokens."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from npc_server.argtools import advanced
from npc_server.training.lm_common import (
    add_data_args,
    corpus_dir,
    load_bundle,
    prepare_token_cache,
    save_bundle,
)
from npc_server.training.lm_data import collate_pairs, dpo_examples, fit_length
from npc_server.training.loop import (
    add_train_args,
    config_from_args,
    setup_distributed,
    teardown_distributed,
    train,
)
from npc_server.training.losses import make_dpo_loss


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="npc-server train dpo", description=__doc__)
    add_data_args(parser)
    parser.add_argument("--init", type=Path, required=True, help="SFT backbone bundle; also the frozen reference")
    add_train_args(parser, steps=300, lr=5e-6, batch_size=4)
    a = advanced(parser)
    a.add_argument("--beta", type=float, default=0.1, help="DPO temperature")
    a.add_argument("--sft-weight", type=float, default=0.0, help="add the chosen answer's LM loss times this")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = config_from_args(args)
    rank, world = setup_distributed()
    corpus = corpus_dir(args)
    cache = prepare_token_cache(args, rank, world)
    model, config, tok, template = load_bundle(args.init)
    reference, *_ = load_bundle(args.init)
    pairs = dpo_examples(corpus, cache, template, split="train", personas_dir=args.personas)
    if not pairs:
        raise ValueError(f"no DPO pairs in {corpus} (dialogues need rejected_text and cached audio)")
    pairs = fit_length(pairs, args.max_len)
    pad = config.layout.special("<|pad|>")
    train(model.train(), pairs, lambda b: collate_pairs(b, pad), make_dpo_loss(reference, args.beta, args.sft_weight),
          cfg, save_final=lambda m, d: save_bundle(m, config, tok, d), desc="dpo")
    teardown_distributed()
    return 0
