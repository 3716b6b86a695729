"""`npc-server train hearing`: backbone v2's first stage: read the audio tokens (transcribe them, continue them).

Examples come from the corpus manifest and its v2 token cache (`npc-server train tokenizer-v2` writes
<corpus>/tokens_v2): every train utterance as an ASR example, and a share of them as audio continuation. The run
continues `--init` (default: the shipped v2 backbone, so training goes on across runs), or with `--init none`
starts from the base model with new rows and zero LoRA; it ends with the listening WER on held-out questions by
unseen voices, logged per run in <out>/training.json.

  npc-server train hearing --corpus ~/.cache/npc-voice/corpus/v2 --minutes 120 --out runs/backbone_v2b
  torchrun --nproc_per_node 8 -m npc_server.cli train hearing ...   (DDP: the same command on more processes)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

from npc_server.argtools import advanced
from npc_server.backbone.audio_lm import AudioLMConfig, load_text_tokenizer
from npc_server.backbone.template_v2 import HearingFormat
from npc_server.paths import DEFAULT_MODEL_DIR, REPO_ROOT, data_dir
from npc_server.training.lm_v2 import (
    append_run_log,
    bucket_length,
    continue_run_log,
    is_v2_backbone,
    run_record,
    start_model,
    token_cache,
    train_loop,
)
from npc_server.training.loop import setup_distributed, teardown_distributed
from npc_server.training.precision import PRECISIONS, resolve


def load_rows(corpus: Path, tokens: Path, split: str) -> list[dict]:
    from npc_server.training.corpus.manifest import read_manifest

    rows = []
    for r in read_manifest(corpus):
        path = tokens / f"{r['id']}.npz"
        if r["split"] == split and path.is_file():
            with np.load(path) as z:
                rows.append({**r, "linguistic": z["linguistic"].astype(np.int64), "interleaved": z["interleaved"].astype(np.int64)})
    return rows


def build_examples(fmt: HearingFormat, rows: list[dict], continue_share: float, rng: random.Random) -> list:
    out = []
    for r in rows:
        audio = fmt.audio(r["linguistic"], r["interleaved"])
        ex = fmt.asr_example(audio, r["text"])
        if len(ex.ids) <= 384:
            out.append(ex)
        if rng.random() < continue_share and len(audio) >= 20:
            cut = rng.randint(len(audio) // 3, 2 * len(audio) // 3)
            ex = fmt.continue_example(audio[: cut + 48], cut)
            if len(ex.ids) <= 384:
                out.append(ex)
    return out


def main(argv: list[str] | None = None) -> int:
    from npc_server.eval.listen_v2 import listen_wer

    p = argparse.ArgumentParser(prog="npc-server train hearing", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, default=data_dir() / "corpus" / "default")
    p.add_argument("--tokens", type=Path, default=None, help="v2 token cache (default <corpus>/tokens_v2)")
    p.add_argument("--init", type=Path, default=DEFAULT_MODEL_DIR / "backbone_v2",
                   help="v2 backbone to continue (default: the shipped one); `none` starts from the base model")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "backbone_v2")
    p.add_argument("--base", default="gemma3-270m", help="base model of a fresh backbone")
    p.add_argument("--minutes", type=float, default=30.0, help="training budget (the LR schedule follows it)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-tokens", type=int, default=1536, help="padded tokens per step")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--precision", choices=PRECISIONS, default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-n", type=int, default=100, help="held-out questions for the listening WER (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    a = advanced(p)
    a.add_argument("--lora-rank", type=int, default=16)
    a.add_argument("--continue-share", type=float, default=0.2, help="share of utterances also used for continuation")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    corpus, tokens = token_cache(args.corpus, args.tokens, "train hearing")
    rank, _ = setup_distributed()  # under torchrun: one process per rank, rank 0 writes
    precision = resolve(args.precision)
    text_tok = load_text_tokenizer(args.base)
    train_rows = load_rows(corpus, tokens, "train")
    if not train_rows:
        raise SystemExit(f"npc-server train hearing: no train utterances with tokens in {tokens}")
    valid_texts = [r["text"] for r in load_rows(corpus, tokens, "valid")]
    init = None if str(args.init) == "none" else args.init
    if init is not None and not is_v2_backbone(init):
        raise SystemExit(f"npc-server train hearing: {init} holds no v2 backbone (pass --init none to start from "
                         f"{args.base})")
    model = start_model(init, AudioLMConfig(base=args.base, lora_rank=args.lora_rank),
                        [r["text"] for r in train_rows] + valid_texts, text_tok)
    fmt = HearingFormat(model.cfg.layout, text_tok, model.cfg.audio_input)
    rng = random.Random(args.seed)
    examples = build_examples(fmt, train_rows, args.continue_share, rng)
    n_train = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n or n.startswith("new_embed"))
    print(f"hearing: {len(examples)} examples from {len(train_rows)} utterances, {n_train / 1e6:.1f}M trained "
          f"parameters, {model.head_ids.numel()} output rows, precision {precision}, buckets "
          f"{sorted({bucket_length(len(e.ids)) for e in examples})}", flush=True)
    if rank == 0:
        continue_run_log(init, args.out)

    def save():
        model.save_pretrained(args.out)

    result = train_loop(model, examples, args.minutes, args.batch_tokens, args.lr, precision, text_tok.pad_token_id,
                        args.seed, args.max_steps, save, progress=not args.no_progress)
    if rank != 0:
        teardown_distributed()
        return 0
    record = run_record("hearing", str(init) if init else f"base {args.base}", result, precision, args.threads,
                        "npc-server train hearing " + " ".join(sys.argv[3:] if argv is None else argv))
    if args.eval_n > 0:
        rows = [r for r in load_rows(corpus, tokens, "heldout") if r["role"] == "player" and r["language"] == "en"]
        rows = random.Random(0).sample(rows, min(args.eval_n, len(rows)))
        res = listen_wer(model, fmt, rows)
        record["listen_wer_heldout_players"] = round(res["wer"], 4)
        record["listen_n"] = res["n"]
        print(f"listening WER on {res['n']} held-out questions by unseen voices: {res['wer']:.1%}")
    append_run_log(args.out, record)
    print(json.dumps(record, indent=2))
    teardown_distributed()
    return 0
