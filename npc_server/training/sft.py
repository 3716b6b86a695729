"""`npc-server train sft`: backbone stage 2, supervised fine-tuning on spoken NPC dialogues (incl. multi-turn)."""

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
from npc_server.training.lm_data import PRETRAIN_TASKS, collate, parse_tasks, sft_training_set
from npc_server.training.loop import (
    add_train_args,
    config_from_args,
    setup_distributed,
    teardown_distributed,
    train,
)
from npc_server.training.losses import lm_loss


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="npc-server train sft", description=__doc__)
    add_data_args(parser)
    parser.add_argument("--init", type=Path, required=True, help="pretrained backbone bundle (…/model)")
    add_train_args(parser, steps=2000, lr=3e-4)
    a = advanced(parser)
    a.add_argument("--pretrain-mix", type=float, default=0.1,
                   help="add this fraction (relative to the SFT set) of pretraining sequences against forgetting")
    a.add_argument("--pretrain-tasks", default=",".join(PRETRAIN_TASKS),
                   help="comma-separated tasks of those pretraining sequences (e.g. asr: keep learning to listen)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = config_from_args(args)
    rank, world = setup_distributed()
    corpus = corpus_dir(args)
    cache = prepare_token_cache(args, rank, world)
    model, config, tok, template = load_bundle(args.init)
    examples = sft_training_set(corpus, cache, template, args.personas, args.pretrain_mix, cfg.seed, args.max_len,
                                parse_tasks(args.pretrain_tasks))
    pad = config.layout.special("<|pad|>")
    train(model.train(), examples, lambda b: collate(b, pad), lm_loss, cfg,
          save_final=lambda m, d: save_bundle(m, config, tok, d), desc="sft")
    teardown_distributed()
    return 0
