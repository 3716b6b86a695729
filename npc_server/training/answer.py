"""`npc-server train answer`: backbone v2's SFT stage: answer the player in character.

Each train dialogue of the corpus becomes one example: the persona's system turn (its YAML text, as the engine
builds it, + its language), earlier turns as text, the player's question (spoken: its v2 audio tokens; a share
typed), and the answer text as the target. The hearing stage's ASR examples are mixed in (`--hearing-mix`) so that
hearing is not forgotten. The run continues `--init` (default: the shipped v2 backbone) and ends with the answer
figure on held-out spoken questions by unseen voices, logged per run in <out>/training.json.

  npc-server train answer --corpus ~/.cache/npc-voice/corpus/v2 --minutes 60 --out runs/answer_v2
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

from npc_server.argtools import advanced
from npc_server.backbone.audio_lm import AudioLMConfig, load_text_tokenizer
from npc_server.backbone.template_v2 import DialogueFormat
from npc_server.paths import DEFAULT_MODEL_DIR, DEFAULT_PERSONAS_DIR, REPO_ROOT, data_dir
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

MAX_LENGTH = 384


def answer_examples(fmt: DialogueFormat, rows: list[dict], persona_texts: dict[str, str], typed_share: float,
                    rng: random.Random) -> list:
    """One example per dialogue row (rows carry `linguistic` codes and `persona_language`); too long ones dropped."""
    out = []
    for r in rows:
        prompt = fmt.row_prompt(r, persona_texts.get(r["persona"], ""), typed=rng.random() < typed_share)
        ex = fmt.answer_example(prompt, r["answer_text"])
        if len(ex.ids) <= MAX_LENGTH:
            out.append(ex)
    return out


def main(argv: list[str] | None = None) -> int:
    from npc_server.eval.answer_v2 import answer_figure, dialogue_rows
    from npc_server.training.hearing import build_examples, load_rows
    from npc_server.training.lm_data import persona_texts as load_persona_texts

    p = argparse.ArgumentParser(prog="npc-server train answer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, default=data_dir() / "corpus" / "default")
    p.add_argument("--tokens", type=Path, default=None, help="v2 token cache (default <corpus>/tokens_v2)")
    p.add_argument("--init", type=Path, default=DEFAULT_MODEL_DIR / "backbone_v2",
                   help="v2 backbone to continue (default: the shipped one); `none` starts from the base model")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "answer_v2")
    p.add_argument("--personas", type=Path, default=DEFAULT_PERSONAS_DIR)
    p.add_argument("--teacher", type=Path, nargs="+", default=[],
                   help="teacher files (`npc-server train dialogues` output): kept answers replace the templated answers "
                        "of their dialogues; kept off-script answers are added as typed dialogues")
    p.add_argument("--minutes", type=float, default=30.0, help="training budget (the LR schedule follows it)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-tokens", type=int, default=1536, help="padded tokens per step")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--precision", choices=PRECISIONS, default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-n", type=int, default=120, help="held-out spoken questions for the answer figure (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    a = advanced(p)
    a.add_argument("--base", default="gemma3-270m", help="base model of a fresh backbone (--init none)")
    a.add_argument("--lora-rank", type=int, default=16)
    a.add_argument("--typed-share", type=float, default=0.25, help="share of questions given typed, not spoken")
    a.add_argument("--off-script-repeat", type=int, default=1,
                   help="how many times each kept off-script teacher answer is used per epoch (they are few)")
    a.add_argument("--hearing-mix", type=float, default=0.3,
                   help="ASR examples of train utterances, as a share of the answer examples (against forgetting)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    corpus, tokens = token_cache(args.corpus, args.tokens, "train answer")
    init = None if str(args.init) == "none" else args.init
    if init is not None and not is_v2_backbone(init):
        raise SystemExit(f"npc-server train answer: {init} holds no v2 backbone (pass --init none to start from "
                         f"{args.base})")
    rank, _ = setup_distributed()
    precision = resolve(args.precision)
    text_tok = load_text_tokenizer(args.base)
    texts = load_persona_texts(args.personas)
    rows = dialogue_rows(corpus, "train", 10**9, args.seed, tokens)
    if not rows:
        raise SystemExit(f"npc-server train answer: no train dialogues with question tokens in {tokens}")
    off_script: list[dict] = []
    for path in args.teacher:
        from npc_server.training.dialogues import load_off_script, load_teacher_answers

        taught = load_teacher_answers(path, rows)
        rows = [dict(r, answer_text=taught.get(r["id"], r["answer_text"])) for r in rows]
        off_script += load_off_script(path, texts)
        print(f"{path}: teacher answers for {len(taught)} of {len(rows)} dialogues, {len(off_script)} off-script")
    utterances = load_rows(corpus, tokens, "train")
    valid_texts = [r["answer_text"] for r in dialogue_rows(corpus, "valid", 10**9, 0)]
    model = start_model(init, AudioLMConfig(base=args.base, lora_rank=args.lora_rank),
                        [r["answer_text"] for r in rows + off_script] + [r["text"] for r in utterances] + valid_texts
                        + [t for r in rows for turn in r.get("history", []) for t in (turn["answer"],)],
                        text_tok)
    fmt = DialogueFormat(model.cfg.layout, text_tok, model.cfg.audio_input)
    rng = random.Random(args.seed)
    examples = answer_examples(fmt, rows, texts, args.typed_share, rng)
    examples += answer_examples(fmt, off_script * args.off_script_repeat, texts, 1.0, rng)  # typed: no recorded audio
    n_answer = len(examples)
    hearing = build_examples(fmt, utterances, 0.0, rng)
    rng.shuffle(hearing)
    examples += hearing[: int(args.hearing_mix * n_answer)]
    print(f"answer: {n_answer} answer examples from {len(rows)} dialogues + {len(examples) - n_answer} hearing "
          f"examples, {model.head_ids.numel()} output rows, precision {precision}, buckets "
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
    record = run_record("answer (SFT)", str(init) if init else f"base {args.base}", result, precision, args.threads,
                        "npc-server train answer " + " ".join(sys.argv[3:] if argv is None else argv),
                        examples=len(examples), answer_examples=n_answer)
    if args.eval_n > 0:
        record.update(answer_figure(model, fmt, corpus, tokens, args.eval_n, texts))
    append_run_log(args.out, record)
    print(json.dumps(record, indent=2))
    teardown_distributed()
    return 0
