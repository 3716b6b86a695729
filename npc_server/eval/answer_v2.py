"""NPC answers of backbone v2, judged on their subtitles: `npc-server eval npc` for v2 backbones, and the figure
`npc-server train answer` logs after each run.

For every held-out dialogue (question texts and player voices never trained on) the model hears the question (the
question's wav through tokenizer v2, or the corpus token cache during training; `--question text`: typed) under
the persona's system turn and the history as text, and writes the answer greedily. Judged per answer:
- correct: every expected string is in the subtitle (numbers and punctuation normalised; CJK without spaces);
- language: the subtitle is written in the answer's language (script check: no CJK in English, kana/han in
  Japanese, han in Cantonese, toned pinyin in Mandarin);
- persona: the answer does not introduce itself as another persona;
- length: the answer ended (<|text_end|>) within the token bound of the persona's `max_answer_seconds`.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from npc_server.backbone.audio_lm import AudioLM
from npc_server.backbone.template_v2 import DialogueFormat
from npc_server.backbone.thinker import DecodeOptions, ThinkerSession, decode

TOKENS_PER_SECOND = 4.0  # answer text tokens per second of speech (an English speaker: ~2.5 words/s, ~1.3 tokens/word)

CJK = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]")  # kana and han
HAN = re.compile(r"[\u4e00-\u9fff]")
PINYIN = re.compile(r"\b[a-z]+[1-5]\b")


def in_language(text: str, language: str) -> bool:
    """A script check of the answer's language (the corpus writes Mandarin as toned pinyin)."""
    if language == "en":
        return not CJK.search(text) and not PINYIN.search(text.lower())
    if language == "ja":
        return bool(CJK.search(text))
    if language == "yue":
        return bool(HAN.search(text))
    if language == "cmn":
        return bool(PINYIN.search(text.lower()))
    return True


def max_answer_tokens(max_answer_seconds: float) -> int:
    return max(8, int(round(max_answer_seconds * TOKENS_PER_SECOND)))


def answer(model: AudioLM, fmt: DialogueFormat, prompt: list[int], max_new_tokens: int) -> tuple[str, bool]:
    """Greedy answer text for a prompt ending in <|assistant|> <|mode:text|>, and whether it ended in the bound."""
    session = ThinkerSession(model)
    session.prefill(prompt)
    text_rows = [int(i) for i in model.head_ids.tolist() if i < model.cfg.n_text]
    out = decode(session, text_rows + [fmt.text_end], {fmt.text_end}, DecodeOptions(max_new_tokens=max_new_tokens))
    ended = bool(out) and out[-1] == fmt.text_end
    return fmt.text.decode([i for i in out if i < model.cfg.n_text], skip_special_tokens=True).strip(), ended


def answer_rows(model: AudioLM, fmt: DialogueFormat, rows: list[dict], persona_texts: dict[str, str],
                question: str = "audio", max_answer_seconds: float = 12.0, progress: bool = True) -> list[dict]:
    """rows: corpus dialogues; spoken questions need `linguistic` (and `interleaved`) codes on the row."""
    from npc_server.eval.npc_eval import contains, persona_names, persona_violation

    names = persona_names()
    bound = max_answer_tokens(max_answer_seconds)
    results = []
    for row in tqdm(rows, desc="answer", unit="q", disable=not progress):
        prompt = fmt.row_prompt(row, persona_texts.get(row["persona"], ""), typed=question != "audio")
        text, ended = answer(model, fmt, prompt, bound)
        expected = row.get("expected", [])
        results.append({
            "id": row["id"], "category": row["category"], "persona": row["persona"], "language": row["language"],
            "question": row["question_text"], "answer": text, "reference": row["answer_text"], "expected": expected,
            "correct": all(contains(e, text, row["language"]) for e in expected) if expected else None,
            "in_language": in_language(text, row["language"]), "ended": ended,
            "other_persona": persona_violation(text, row["persona"], names),
        })
    return results


def answer_figure(model: AudioLM, fmt: DialogueFormat, corpus: Path, tokens: Path, n: int,
                  persona_texts: dict[str, str]) -> dict:
    """The figure a v2 training stage logs per run: n held-out spoken questions (token cache), fact in the answer."""
    summary = summarise(answer_rows(model, fmt, dialogue_rows(corpus, "heldout", n, 0, tokens), persona_texts, "audio"))
    print(f"held-out spoken questions: expected fact in the answer {summary['correct']:.1%} of "
          f"{summary['n_with_facts']}, in language {summary['in_language']:.1%}")
    return {"answer_correct_heldout_spoken": summary["correct"], "answer_eval_n": summary["n_with_facts"],
            "answer_in_language": summary["in_language"]}


def summarise(results: list[dict]) -> dict:
    def rate(items, key):
        vals = [r[key] for r in items if r[key] is not None]
        return (sum(bool(v) for v in vals) / len(vals), len(vals)) if vals else (None, 0)

    out = {"n": len(results)}
    out["correct"], out["n_with_facts"] = rate(results, "correct")
    out["in_language"], _ = rate(results, "in_language")
    out["ended_in_bound"], _ = rate(results, "ended")
    out["other_persona"] = sum(r["other_persona"] is not None for r in results)
    by_cat = defaultdict(list)
    for r in results:
        by_cat[r["category"]].append(r)
    out["by_category"] = {c: {"n": len(items), "correct": rate(items, "correct")[0],
                              "in_language": rate(items, "in_language")[0]} for c, items in sorted(by_cat.items())}
    return out


def to_markdown(name: str, summary: dict, question: str) -> str:
    pct = lambda v: "-" if v is None else f"{v:.1%}"
    lines = [f"### {name}: {question} questions, {summary['n']} held-out dialogues", "",
             f"expected fact in the subtitle: **{pct(summary['correct'])}** ({summary['n_with_facts']} with facts); "
             f"in the answer's language {pct(summary['in_language'])}; ended within the length bound "
             f"{pct(summary['ended_in_bound'])}; answers as another persona: {summary['other_persona']}", "",
             "| category | n | correct | in language |", "|---|---|---|---|"]
    for c, s in summary["by_category"].items():
        lines.append(f"| {c} | {s['n']} | {pct(s['correct'])} | {pct(s['in_language'])} |")
    return "\n".join(lines)


def answer_speaker(args):
    """With `--judge audio` and a talker at `--talker`: a function that speaks a model's answers in each dialogue's
    NPC voice and controls and scores them with the listener (else None: the subtitles alone are judged)."""
    if args.judge != "audio":
        return None
    from npc_server.talker import Sampling, Talker

    if not (Path(args.talker) / "config.json").is_file():
        print(f"no talker at {args.talker}: the answers are judged on their subtitles only")
        return None
    from npc_server.eval.metrics import Listener
    from npc_server.eval.tts_eval import spoken_answers
    from npc_server.vocoder import Vocoder

    talker, vocoder, listener = Talker.from_pretrained(args.talker), Vocoder.from_pretrained(args.vocoder), Listener()

    def speak(results: list[dict], rows: list[dict]) -> dict:
        by_id = {r["id"]: r for r in rows}
        answers = [{"id": r["id"], "text": r["answer"], "voice": by_id[r["id"]]["npc_voice"],
                    "language": by_id[r["id"]]["language"], "accent": by_id[r["id"]].get("accent"),
                    "controls": by_id[r["id"]].get("controls")} for r in results]
        return spoken_answers(talker, vocoder, listener, answers, Sampling(seed=args.seed))

    return speak


def spoken_markdown(spoken: dict) -> str:
    lines = [f"spoken answers (talker + vocoder), Whisper tiny.en WER against the subtitle, {spoken['answers']} "
             "English answers:", "", "| voice | words | WER |", "|---|---|---|"]
    lines += [f"| {v} | {d['words']} | {100 * d['talker']:.1f}% |" for v, d in spoken["wer"].items()]
    return "\n".join(lines)


def dialogue_rows(corpus: Path, split: str, limit: int, seed: int, token_dir: Path | None = None) -> list[dict]:
    """A seeded sample of a split's dialogues with the persona's own language on each row; with `token_dir`,
    only those whose question has tokens there (loaded onto the row)."""
    from npc_server.training.corpus.world import PERSONAS
    from npc_server.training.lm_data import load_dialogues

    rows = load_dialogues(corpus, split)
    out = []
    for r in rows:
        r = dict(r, persona_language=PERSONAS[r["persona"]].language if r["persona"] in PERSONAS else r["language"])
        if token_dir is not None:
            path = token_dir / f"{r['question_audio_id']}.npz"
            if not path.is_file():
                continue
            with np.load(path) as z:
                r.update(linguistic=z["linguistic"].astype(np.int64), interleaved=z["interleaved"].astype(np.int64))
        out.append(r)
    random.Random(seed).shuffle(out)
    return out[:limit]


def run(args, models: dict[str, str]) -> int:
    """`npc-server eval npc` for v2 backbones: the subtitle judge, and with `--judge audio` and a talker the answers
    spoken and heard (`answer_speaker`)."""
    import json

    from npc_server.audio.io import load_audio
    from npc_server.backbone.audio_lm import load_text_tokenizer
    from npc_server.paths import data_dir, require_corpus
    from npc_server.tokenizer.tokenizer_v2 import load_tokenizer
    from npc_server.training.corpus.manifest import read_manifest
    from npc_server.training.lm_data import persona_texts

    from npc_server.eval.eval_set import SHIPPED_SET

    corpus = args.corpus
    if corpus is None:  # the generated corpus when there is one, else the eval set shipped with the repo
        default = data_dir() / "corpus" / "default"
        corpus = default if (default / "dialogues.jsonl").is_file() else SHIPPED_SET
    corpus = require_corpus(corpus, "eval npc", needs=("manifest.jsonl", "dialogues.jsonl"))
    rows = dialogue_rows(corpus, args.split, args.limit, args.seed)
    if args.question == "audio":
        tokenizer = load_tokenizer(args.audio_tokenizer)
        if getattr(tokenizer, "version", 1) != 2:
            raise SystemExit(f"{args.audio_tokenizer} is not a v2 tokenizer; pass --audio-tokenizer "
                             f"models/default/tokenizer_v2")
        audio_of = {r["id"]: r["audio"] for r in read_manifest(corpus)}
        rows = [r for r in rows if r["question_audio_id"] in audio_of]
        for r in tqdm(rows, desc="tokenize", unit="q"):
            toks = tokenizer.encode(*load_audio(corpus / audio_of[r["question_audio_id"]]))
            r.update(linguistic=toks.linguistic.numpy(), interleaved=toks.interleaved.numpy())
    texts = persona_texts(args.personas)
    speaker = answer_speaker(args)
    report = {"corpus": str(corpus), "split": args.split, "question": args.question, "judge": "text", "models": {}}
    for name, path in models.items():
        model = AudioLM.from_pretrained(path)
        fmt = DialogueFormat(model.cfg.layout, load_text_tokenizer(model.cfg.base), model.cfg.audio_input)
        results = answer_rows(model, fmt, rows, texts, args.question)
        summary = summarise(results)
        report["models"][name] = {"summary": summary, "results": results}
        print(to_markdown(name, summary, args.question))
        if speaker is not None:
            spoken = speaker(results, rows)
            report["models"][name]["spoken"] = spoken
            print(spoken_markdown(spoken))
        for r in results[:3]:
            print(f"  Q: {r['question']!r}\n  A: {r['answer']!r}  (expected {r['expected']})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    return 0
