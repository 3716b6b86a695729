"""`npc-server train prefer`: backbone v2's DPO stage: prefer the correct, in-character, short answer.

Each pair shares one prompt (persona system turn, history, the spoken or typed question) and differs in the
answer: chosen = the dialogue's answer (the teacher's where `--teacher` gives a kept one), rejected = one of
- the corpus's rejected answer of that dialogue (a wrong fact, a deflection, the other language),
- another persona's answer in the same category (claims its identity and facts),
- the answer run on with another of the persona's answers (too long).
The loss (Rafailov et al. 2023, `losses.dpo_loss`) is on the answer's text tokens; the reference is the `--init`
model itself, whose log-probs are computed once before training (no second model in memory). An LM loss on the
chosen answer (`--sft-weight`) keeps the answers fluent. Resumable like every v2 stage: it continues `--init`.

  npc-server train prefer --corpus ~/.cache/npc-voice/corpus/v2 --init runs/answer_v2 --out runs/prefer_v2 --minutes 20
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from npc_server.argtools import advanced
from npc_server.backbone.audio_lm import AudioLM, load_text_tokenizer
from npc_server.backbone.template_v2 import DialogueFormat, Example
from npc_server.paths import DEFAULT_PERSONAS_DIR, REPO_ROOT, data_dir
from npc_server.training.answer import MAX_LENGTH
from npc_server.training.lm_v2 import (
    append_run_log,
    bucket_length,
    collate,
    continue_run_log,
    is_v2_backbone,
    run_record,
    sequence_logps,
    token_cache,
    train_loop,
)
from npc_server.training.losses import dpo_loss
from npc_server.training.precision import PRECISIONS, resolve


@dataclass
class Pair:
    chosen: Example
    rejected: Example
    kind: str  # why the rejected answer is worse
    ref: tuple[float, float] = (0.0, 0.0)  # reference log-probs of chosen and rejected

    @property
    def ids(self) -> list[int]:  # the longer of the two decides the length bucket
        return self.chosen.ids if len(self.chosen.ids) >= len(self.rejected.ids) else self.rejected.ids


def rejected_answer(row: dict, rows_by: dict, rng: random.Random) -> tuple[str, str] | None:
    """(rejected answer, kind) for a dialogue row, or None when no candidate differs from the chosen answer."""
    options = []
    if row.get("rejected_text") and row["rejected_text"] != row["answer_text"]:
        options.append((row["rejected_text"], "corpus rejected"))
    others = [r for r in rows_by.get(row["category"], []) if r["persona"] != row["persona"]
              and r["answer_text"] != row["answer_text"]]
    if others:
        options.append((rng.choice(others)["answer_text"], "other persona"))
    same = [r for r in rows_by.get(("persona", row["persona"]), []) if r["answer_text"] != row["answer_text"]]
    if same:
        options.append((f"{row['answer_text']} {rng.choice(same)['answer_text']}", "too long"))
    return rng.choice(options) if options else None


def build_pairs(fmt: DialogueFormat, rows: list[dict], persona_texts: dict[str, str], typed_share: float,
                rng: random.Random) -> list[Pair]:
    rows_by: dict = {}
    for r in rows:
        rows_by.setdefault(r["category"], []).append(r)
        rows_by.setdefault(("persona", r["persona"]), []).append(r)
    pairs = []
    for r in rows:
        rej = rejected_answer(r, rows_by, rng)
        if rej is None:
            continue
        prompt = fmt.row_prompt(r, persona_texts.get(r["persona"], ""), typed=rng.random() < typed_share)
        pair = Pair(fmt.answer_example(prompt, r["answer_text"]), fmt.answer_example(prompt, rej[0]), rej[1])
        if len(pair.ids) <= MAX_LENGTH:
            pairs.append(pair)
    return pairs


def collate_pairs(pairs: list[Pair], idx: list[int], length: int, pad_id: int) -> tuple[torch.Tensor, ...]:
    """ids and targets of the chosen answers then the rejected ones (2B rows), and the (B, 2) reference log-probs."""
    examples = [pairs[i].chosen for i in idx] + [pairs[i].rejected for i in idx]
    ids, tgt = collate(examples, list(range(len(examples))), length, pad_id)
    return ids, tgt, torch.tensor([pairs[i].ref for i in idx], dtype=torch.float32)


@torch.inference_mode()
def reference_logps(model: AudioLM, pairs: list[Pair], pad_id: int, precision: str, batch: int = 4,
                    progress: bool = True) -> None:
    """Fill each pair's `ref` with the (frozen) model's log-probs of its two answers."""
    model.eval()
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i].ids))
    for k in tqdm(range(0, len(order), batch), desc="reference", unit="batch", disable=not progress):
        idx = order[k : k + batch]
        length = bucket_length(max(len(pairs[i].ids) for i in idx))
        ids, tgt, _ = collate_pairs(pairs, idx, length, pad_id)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logps, _ = sequence_logps(model, ids, tgt)
        for j, i in enumerate(idx):
            pairs[i].ref = (float(logps[j]), float(logps[len(idx) + j]))


def make_loss(beta: float, sft_weight: float):
    def loss(model: AudioLM, ids: torch.Tensor, tgt: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        logps, counts = sequence_logps(model, ids, tgt)
        b = ref.shape[0]
        value, _ = dpo_loss(logps[:b], logps[b:], ref[:, 0], ref[:, 1], beta)
        if sft_weight > 0:
            value = value - sft_weight * (logps[:b] / counts[:b].clamp_min(1)).mean()
        return value

    return loss


@torch.inference_mode()
def preference_accuracy(model: AudioLM, pairs: list[Pair], pad_id: int) -> float:
    """Share of pairs whose chosen answer the model finds more likely than the rejected one (per token)."""
    wins = 0
    for i in range(len(pairs)):
        ids, tgt, _ = collate_pairs(pairs, [i], bucket_length(len(pairs[i].ids)), pad_id)
        logps, counts = sequence_logps(model, ids, tgt)
        wins += bool(logps[0] / counts[0] > logps[1] / counts[1])
    return wins / max(1, len(pairs))


def main(argv: list[str] | None = None) -> int:
    from npc_server.eval.answer_v2 import answer_figure, dialogue_rows
    from npc_server.training.lm_data import persona_texts as load_persona_texts

    p = argparse.ArgumentParser(prog="npc-server train prefer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, default=data_dir() / "corpus" / "default")
    p.add_argument("--tokens", type=Path, default=None, help="v2 token cache (default <corpus>/tokens_v2)")
    p.add_argument("--init", type=Path, required=True, help="the v2 backbone to continue (an SFT run); also the reference")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "prefer_v2")
    p.add_argument("--personas", type=Path, default=DEFAULT_PERSONAS_DIR)
    p.add_argument("--teacher", type=Path, default=None, help="teacher answers: the kept ones are the chosen answers")
    p.add_argument("--pairs", type=int, default=600, help="preference pairs (a seeded sample of the train dialogues)")
    p.add_argument("--minutes", type=float, default=20.0)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-tokens", type=int, default=1536, help="padded tokens per step (both answers of a pair)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--precision", choices=PRECISIONS, default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-n", type=int, default=120, help="held-out spoken questions for the answer figure (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    a = advanced(p)
    a.add_argument("--beta", type=float, default=0.1, help="DPO temperature")
    a.add_argument("--sft-weight", type=float, default=0.2, help="LM loss on the chosen answer (per token) times this")
    a.add_argument("--typed-share", type=float, default=0.25)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    corpus, tokens = token_cache(args.corpus, args.tokens, "train prefer")
    if not is_v2_backbone(args.init):
        raise SystemExit(f"npc-server train prefer: {args.init} holds no v2 backbone")
    precision = resolve(args.precision)
    model = AudioLM.from_pretrained(args.init)
    text_tok = load_text_tokenizer(model.cfg.base)
    fmt = DialogueFormat(model.cfg.layout, text_tok, model.cfg.audio_input)
    texts = load_persona_texts(args.personas)
    rows = dialogue_rows(corpus, "train", 10**9, args.seed, tokens)
    if args.teacher is not None:
        from npc_server.training.dialogues import load_teacher_answers

        taught = load_teacher_answers(args.teacher, rows)
        rows = [dict(r, answer_text=taught.get(r["id"], r["answer_text"])) for r in rows]
    rng = random.Random(args.seed)
    pairs = build_pairs(fmt, rows, texts, args.typed_share, rng)
    unknown = {t for pr in pairs for t in pr.rejected.ids if t < model.cfg.n_text} - set(model.head_ids.tolist())
    if unknown:  # rejected answers may use ids outside the head: add them (tied rows, no new parameters)
        model.set_head(torch.cat([model.head_text_ids(), torch.tensor(sorted(unknown), dtype=torch.long)]))
    rng.shuffle(pairs)
    valid, pairs = pairs[:60], pairs[60 : 60 + args.pairs]
    kinds = {k: sum(pr.kind == k for pr in pairs) for k in sorted({pr.kind for pr in pairs})}
    print(f"prefer: {len(pairs)} pairs ({kinds}), {len(valid)} held back for the preference accuracy", flush=True)
    pad = text_tok.pad_token_id
    acc_before = preference_accuracy(model, valid, pad)
    reference_logps(model, pairs, pad, precision, progress=not args.no_progress)
    continue_run_log(args.init, args.out)
    result = train_loop(model, pairs, args.minutes, args.batch_tokens, args.lr, precision, pad, args.seed,
                        args.max_steps, lambda: model.save_pretrained(args.out), progress=not args.no_progress,
                        batch_loss=make_loss(args.beta, args.sft_weight), make_batch=collate_pairs)
    acc_after = preference_accuracy(model, valid, pad)
    record = run_record("prefer (DPO)", str(args.init), result, precision, args.threads,
                        "npc-server train prefer " + " ".join(sys.argv[3:] if argv is None else argv),
                        pairs=len(pairs), pair_kinds=kinds, preference_accuracy_before=round(acc_before, 4),
                        preference_accuracy_after=round(acc_after, 4), beta=args.beta, sft_weight=args.sft_weight)
    print(f"preference accuracy on {len(valid)} held-back pairs: {acc_before:.1%} -> {acc_after:.1%}")
    if args.eval_n > 0:
        record.update(answer_figure(model, fmt, corpus, tokens, args.eval_n, texts))
    append_run_log(args.out, record)
    print(json.dumps(record, indent=2))
    return 0
