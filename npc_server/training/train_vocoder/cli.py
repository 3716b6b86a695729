"""`npc-server train vocoder`: train the mel->wave generator and the token->mel flow-matching decoder on the corpus."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from npc_server.argtools import advanced, alias
from npc_server.paths import DEFAULT_MODEL_DIR, REPO_ROOT, data_dir
from npc_server.training.corpus.manifest import read_manifest
from npc_server.training.train_vocoder.common import load_or_new_vocoder
from npc_server.training.train_vocoder.data import run_mel_cache
from npc_server.training.train_vocoder.flow_stage import resize_cond_transformers, train_flow
from npc_server.training.train_vocoder.generator_stage import train_generator
from npc_server.vocoder.flow import FlowConfig, check_cond_dropout
from npc_server.vocoder.generator import GeneratorConfig
from npc_server.vocoder.mel import MelConfig
from npc_server.vocoder.phone_judge import PhoneJudge, PhoneJudgeConfig


def _train_phone_judge(args, mel_cache: dict, minutes: float) -> int:
    """--stage judge: CTC phone judge on the run's ground-truth mels, scored on held-out NPC utterances."""
    from npc_server.tokenizer.phones import PhoneInventory
    from npc_server.training import train_phone_judge as tj

    phones = json.loads((args.tokenizer / "config.json").read_text())["phones"]
    inventory = PhoneInventory(phones)
    rows = read_manifest(args.corpus)
    items = tj.items_from_mel_cache(mel_cache, rows, inventory)
    if not items:
        raise SystemExit("no mels with phones for the judge (does the manifest have phonemes?)")
    valid = tj.heldout_items(rows, args.corpus, inventory, args.judge_heldout, seed=args.seed)
    judge = PhoneJudge(PhoneJudgeConfig(phones=phones))
    stats = tj.train_judge(judge, items, valid, args.run_dir, minutes, args.lr or 1e-3, max_frames=6000,
                           seed=args.seed)
    judge.save_pretrained(args.phone_judge)
    (args.phone_judge / "training.json").write_text(json.dumps(stats, indent=2))
    print(f"phone judge: {stats}; saved to {args.phone_judge}")
    return 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="npc-server train vocoder", description=__doc__)
    p.add_argument("--corpus", type=Path, default=data_dir() / "corpus" / "default")
    p.add_argument("--tokenizer", type=Path, default=DEFAULT_MODEL_DIR / "tokenizer")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "vocoder" / "model",
                   help="where to write the vocoder (default runs/vocoder/model; never the shipped model: pass "
                        "--init models/default/vocoder to continue from it)")
    p.add_argument("--run-dir", type=Path, default=REPO_ROOT / "runs" / "vocoder")
    p.add_argument("--stage", choices=["all", "generator", "mels", "flow", "judge"], default="all",
                   help="mels: only precompute the flow targets (no tokenizer needed yet); judge: train the mel phone "
                        "judge (on the run's mel cache) that --phone-weight uses")
    p.add_argument("--minutes", type=float, default=50.0, help="total training time (split 50/50 with --stage all)")
    p.add_argument("--max-hours", type=float, default=2.0, help="hours of corpus audio to use per stage")
    p.add_argument("--rebuild-tokens", action="store_true",
                   help="re-encode the semantic tokens (after the tokenizer changed) instead of reusing the cache")
    p.add_argument("--init", type=Path, default=None, help="start from an existing vocoder directory")
    batch = p.add_argument("--batch-size", dest="batch", type=int, default=8,
                           help="examples per step (generator; the flow takes twice as many)")
    alias(p, batch, "--batch")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="bf16 autocast or fp32; auto (default) measures which is faster on this CPU")
    p.add_argument("--no-bf16", action="store_true", help=argparse.SUPPRESS)  # old: --precision fp32
    p.add_argument("--seed", type=int, default=0)
    a = advanced(p)
    a.add_argument("--bootstrap", type=int, default=0,
                   help="synthesise this many piper/espeak utterances for the generator (no corpus needed)")
    a.add_argument("--no-corpus", action="store_true", help="generator: train on bootstrap audio only")
    a.add_argument("--flow-mels", action="store_true",
                   help="generator: fine-tune on the flow's mels of the NPC training utterances (their cached tokens "
                        "decoded in their own voice) against the recordings, the mels it hears when serving; needs a "
                        "trained flow (--init) and <corpus>/tokens")
    a.add_argument("--extend-mels", action="store_true",
                   help="mels: add the utterances of a larger --max-hours pick to the run's existing mel cache "
                        "(the cached ones, with their pitch-shifted copies, are kept as they are)")
    a.add_argument("--voice-swap", type=float, default=0.0,
                   help="mels: fraction of the utterances of derived voices (joe, joe_low, joe_high) that also get "
                        "a copy re-rendered as a sibling voice (parallel timbre data); added to an existing cache too")
    a.add_argument("--tokens-from-corpus", action="store_true",
                   help="take the semantic tokens from <corpus>/tokens/*.npz (the backbone's audio-token cache, same "
                        "tokenizer) instead of encoding the audio; rewrites the run's token cache")
    a.add_argument("--cond-transformer-layers", type=int, default=None,
                   help="flow: number of token-rate transformer blocks in the token encoder; blocks added to an "
                        "--init/--out model start as identity (warm start)")
    a.add_argument("--phone-judge", type=Path, default=REPO_ROOT / "runs" / "phone_judge",
                   help="the mel phone judge: written by --stage judge, read by --phone-weight")
    a.add_argument("--phone-weight", type=float, default=0.0,
                   help="flow: weight of the phone judge's KL on the flow's clean-mel estimate (0 = off)")
    a.add_argument("--pitch-reference", choices=("tokens", "voice"), default=None,
                   help="flow: what pitch 0 means (default: keep the --init/--out model's). tokens: the level the "
                        "tokens imply; voice: the voice's neutral F0 (measured on the data), so the voice sets the "
                        "pitch level and an answer lands at that F0 times 2^(persona pitch + emotion shift)/12")
    a.add_argument("--cond-dropout", type=float, default=None,
                   help="flow: fraction of examples trained without the tokens, for classifier-free guidance (default: "
                        "keep the --init/--out model's; 0.2 is common; sample with `eval vocoder --guidance W`, ship "
                        "with flow.guidance in config.json)")
    a.add_argument("--f0-weight", type=float, default=0.0,
                   help="flow: weight of the F0 error (semitones, the generator's F0 predictor) on that estimate")
    a.add_argument("--judge-heldout", type=int, default=200, help="judge: held-out NPC utterances to score it on")
    a.add_argument("--token-utts", type=int, default=0,
                   help="tokenize only the first N cached utterances (0 = all); encoding is the slow part")
    a.add_argument("--proxy-tokens", action="store_true",
                   help="warm up the flow decoder on stand-in mel-patch codes while the tokenizer is not trained yet")
    a.add_argument("--gen-segment", type=float, default=0.8, help="generator training segment, seconds")
    a.add_argument("--flow-segment-tokens", type=int, default=50)
    a.add_argument("--pitch-aug", type=float, default=0.5, help="fraction of utterances also seen pitch-shifted")
    args = p.parse_args(argv)
    if args.cond_dropout is not None:
        try:
            check_cond_dropout(args.cond_dropout)
        except ValueError as e:
            p.error(f"--cond-dropout: {e}")
    if not 0.0 <= args.voice_swap <= 1.0:
        p.error(f"--voice-swap is a fraction of utterances, 0..1; got {args.voice_swap}")
    if args.flow_mels and args.stage != "generator":
        p.error("--flow-mels goes with --stage generator (it decodes with an already trained flow)")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    from npc_server.training.precision import resolve

    bf16 = resolve("fp32" if args.no_bf16 else args.precision) == "bf16"
    print(f"precision: {'bf16 autocast' if bf16 else 'fp32'}")
    mel_cfg = MelConfig()
    if args.stage in ("mels", "judge"):  # data and the judge only: no vocoder to load
        vocoder = None
    else:
        vocoder = load_or_new_vocoder(args.out, args.init, FlowConfig(), GeneratorConfig())
        if args.cond_transformer_layers is not None:
            resize_cond_transformers(vocoder, args.cond_transformer_layers)
    minutes = {"all": args.minutes / 2, "generator": args.minutes, "flow": args.minutes, "mels": 0,
               "judge": args.minutes}[args.stage]

    if args.stage in ("all", "generator"):
        train_generator(args, vocoder, mel_cfg, minutes, rng, bf16)
    if args.stage in ("all", "flow", "mels", "judge"):
        mel_cache = run_mel_cache(args, mel_cfg)
        if args.stage == "mels":
            return 0
        if args.stage == "judge":
            return _train_phone_judge(args, mel_cache, minutes)
        train_flow(args, vocoder, mel_cache, minutes, rng, bf16)
    return 0
