"""`npc-server train pretrain`: backbone stage 1 on ASR-like, TTS-like, audio-continuation and text sequences."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from npc_server.argtools import advanced
from npc_server.backbone.model import PRESETS, build_model, count_parameters, preset
from npc_server.backbone.template import ChatTemplate
from npc_server.backbone.text_tokenizer import TextTokenizer, corpus_texts
from npc_server.training.lm_common import (
    add_data_args,
    corpus_dir,
    load_bundle,
    prepare_token_cache,
    save_bundle,
)
from npc_server.training.lm_data import (
    PRETRAIN_TASKS,
    collate,
    fit_length,
    parse_tasks,
    persona_texts,
    pretrain_examples,
)
from npc_server.training.loop import (
    add_train_args,
    barrier,
    config_from_args,
    setup_distributed,
    teardown_distributed,
    train,
)
from npc_server.training.losses import lm_loss


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="npc-server train pretrain", description=__doc__)
    add_data_args(parser)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default", help="model size")
    parser.add_argument("--text-tokenizer", type=Path, default=None,
                        help="reuse this tokenizer.json (file or folder) instead of training one on the corpus")
    parser.add_argument("--init", type=Path, default=None, help="continue from this backbone bundle")
    add_train_args(parser, steps=4000, lr=1e-3)
    a = advanced(parser)
    a.add_argument("--text-vocab", type=int, default=2048, help="text tokenizer size (reserved text ids)")
    a.add_argument("--tasks", default=",".join(PRETRAIN_TASKS),
                   help=f"comma-separated pretraining tasks (default all: {','.join(PRETRAIN_TASKS)})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = config_from_args(args)
    rank, world = setup_distributed()
    corpus = corpus_dir(args)
    cache = prepare_token_cache(args, rank, world)

    if args.init:
        model, config, tok, template = load_bundle(args.init)
    else:
        if args.text_tokenizer:
            tok = TextTokenizer.from_pretrained(args.text_tokenizer)
        else:  # rank 0 trains it, every rank loads the same file
            tok_dir = cfg.out_dir / "text_tokenizer"
            if rank == 0:
                texts = corpus_texts(corpus) + list(persona_texts(args.personas).values())
                TextTokenizer.train(texts, vocab_size=args.text_vocab).save(tok_dir)
            barrier()
            tok = TextTokenizer.from_pretrained(tok_dir)
        config = preset(args.preset, n_text=max(args.text_vocab, tok.vocab_size))
        torch.manual_seed(cfg.seed)
        model = build_model(config)
        template = ChatTemplate(config.layout, tok)
    if rank == 0:
        print(f"backbone {config.preset}: {count_parameters(model) / 1e6:.2f}M parameters, vocab {config.vocab_size}")
    examples = fit_length(pretrain_examples(corpus, cache, template, split="train",
                                             tasks=parse_tasks(args.tasks)), args.max_len)
    pad = config.layout.special("<|pad|>")
    train(model, examples, lambda b: collate(b, pad), lm_loss, cfg,
          save_final=lambda m, d: save_bundle(m, config, tok, d), desc="pretrain")
    teardown_distributed()
    return 0
