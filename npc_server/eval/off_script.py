"""`npc-server eval off-script`: questions outside every persona's knowledge, asked of every persona (typed).

The questions are hand-written (data/eval/off_script.json; none is in the corpus). Each persona of the persona
folder answers each question with its system turn as the engine builds it. Judged per answer:
- in the persona's language (script check), claims no other persona's identity, ends within the length bound of
  the persona's `max_answer_seconds`;
- with `--judge teacher`: in character and a sensible reply (a polite refusal counts), as judged by the teacher
  model (Qwen2.5-Coder-0.5B-Instruct; its packages are installed for `train dialogues`). The answers are written
  out (`--out`) for a hand check of the judge.

  npc-server eval off-script --backbone models/default/backbone_v2 --judge teacher --out runs/off_script.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

from npc_server.paths import DEFAULT_MODEL_DIR, DEFAULT_PERSONAS_DIR, REPO_ROOT

QUESTIONS = REPO_ROOT / "data" / "eval" / "off_script.json"


def judge_messages(persona_text: str, question: str, answer: str) -> list[dict]:
    return [
        {"role": "system", "content": "You judge the answers of characters in a fantasy role-playing game."},
        {"role": "user", "content": (
            f"The character: {persona_text}\n\nA traveller asked: \"{question}\"\nThe character answered: \"{answer}\"\n\n"
            "Is this answer in character for this person and a sensible reply to the question? A polite refusal or "
            "\"I don't know\" counts as sensible; unrelated facts, nonsense or words of another character do not. "
            "Reply with only yes or no.")},
    ]


def main(argv: list[str] | None = None) -> int:
    from npc_server.backbone.audio_lm import AudioLM, load_text_tokenizer
    from npc_server.backbone.template_v2 import DialogueFormat
    from npc_server.eval.answer_v2 import answer, in_language, max_answer_tokens
    from npc_server.eval.npc_eval import persona_names, persona_violation
    from npc_server.personas import load_folder

    p = argparse.ArgumentParser(prog="npc-server eval off-script", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", type=Path, default=DEFAULT_MODEL_DIR / "backbone_v2", help="a v2 backbone")
    p.add_argument("--personas", type=Path, default=DEFAULT_PERSONAS_DIR)
    p.add_argument("--questions", type=Path, default=QUESTIONS)
    p.add_argument("--judge", choices=("rules", "teacher"), default="rules",
                   help="rules: language / persona / length only; teacher: also the teacher model's verdict")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="write every answer and verdict here (JSON)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    questions = json.loads(args.questions.read_text(encoding="utf-8"))["questions"]
    personas, errors = load_folder(args.personas)
    for err in errors:
        print(f"persona skipped: {err}")
    personas = list(personas.values())
    model = AudioLM.from_pretrained(args.backbone)
    fmt = DialogueFormat(model.cfg.layout, load_text_tokenizer(model.cfg.base), model.cfg.audio_input)
    names = persona_names()
    results = []
    with tqdm(total=len(personas) * len(questions), desc="off-script", unit="q") as bar:
        for persona in personas:
            prompt_of = lambda q: fmt.answer_prompt(persona.prompt_text(), persona.language, [], text=q)
            for q in questions:
                text, ended = answer(model, fmt, prompt_of(q), max_answer_tokens(persona.max_answer_seconds))
                results.append({"persona": persona.id, "role": persona.role, "question": q, "answer": text,
                                "in_language": in_language(text, persona.language), "ended": ended,
                                "other_persona": persona_violation(text, persona.role, names),
                                "persona_text": persona.prompt_text()})
                bar.update()
    if args.judge == "teacher":
        from npc_server.training.dialogues import Teacher

        teacher = Teacher(threads=args.threads)
        for k in tqdm(range(0, len(results), 8), desc="judge", unit="batch"):
            chunk = results[k : k + 8]
            verdicts = teacher.answer([judge_messages(r["persona_text"], r["question"], r["answer"]) for r in chunk],
                                      max_new_tokens=3)
            for r, v in zip(chunk, verdicts):
                r["judge"] = v.strip().lower().startswith("yes")
    n = len(results)
    summary = {"answers": n, "personas": len(personas), "questions": len(questions),
               "in_language": sum(r["in_language"] for r in results) / n,
               "other_persona": sum(r["other_persona"] is not None for r in results),
               "ended_in_bound": sum(r["ended"] for r in results) / n}
    if args.judge == "teacher":
        summary["judged_in_character"] = sum(r["judge"] for r in results) / n
    print(f"off-script: {n} answers ({len(personas)} personas x {len(questions)} questions): in the persona's "
          f"language {summary['in_language']:.1%}, answers as another persona {summary['other_persona']}, ended within "
          f"the bound {summary['ended_in_bound']:.1%}"
          + (f", in character by the teacher judge {summary['judged_in_character']:.1%}" if args.judge == "teacher" else ""))
    for r in results[:: max(1, n // 6)]:
        print(f"  [{r['persona']}] {r['question']!r} -> {r['answer']!r}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"backbone": str(args.backbone), "summary": summary, "results": results},
                                       indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0
