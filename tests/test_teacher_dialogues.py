"""The teacher-data step's checks, prompt and file format (`npc-server train dialogues`); the teacher model itself
is not loaded here (its packages are installed only for that step)."""

from __future__ import annotations

import json

from npc_server.training.dialogues import check, load_teacher_answers, teacher_messages


def _row(**kw) -> dict:
    row = {"id": "d000001", "persona": "innkeeper", "category": "price", "language": "en",
           "question_text": "How much is a room?", "answer_text": "A room for the night is five gold.",
           "expected": ["five gold"], "history": []}
    return {**row, **kw}


def test_the_prompt_carries_persona_facts_history_and_question():
    row = _row(history=[{"question": "Hello!", "answer": "Welcome, traveller!"}])
    chat = teacher_messages(row, "You are Greta, the innkeeper.")
    assert chat[0]["role"] == "system" and "Greta" in chat[0]["content"] and "five gold" in chat[0]["content"]
    assert "English" in chat[0]["content"]
    assert [m["role"] for m in chat[1:]] == ["user", "assistant", "user"]
    assert chat[-1]["content"] == "How much is a room?"


def test_checks_keep_good_answers_and_say_why_others_are_rejected():
    row = _row()
    assert check(row, "Five gold a night, dear, and the stew is extra.", 30) is None
    assert check(row, "A room costs six gold.", 30).startswith("fact missing")
    assert check(row, "部屋は five gold です", 30) == "language"
    assert check(row, "It is five gold " + "and so on " * 20, 30) == "too long"
    assert check(row, "As an AI language model, I think five gold.", 30) == "out of character"
    assert check(row, "I'm not an AI, so five gold it is.", 30) == "out of character"
    assert check(row, "I'm Angus, and it is five gold.", 30) == "claims to be guard"
    assert check(row, "", 30) == "empty"
    assert check(row, "Five gold, or twenty for a week.", 30) == "number not in the facts: twenty"
    sums = _row(question_text="What is forty-eight minus fourteen?", answer_text="That's thirty-four.",
                expected=["thirty-four"])
    assert check(sums, "Forty-eight minus fourteen is thirty-four.", 30) is None
    assert check(sums, "Thirty-four minus fourteen is twenty-four.", 30).startswith("number not in the facts")
    ja = _row(language="ja", expected=["よんゴールド"], persona="tea_seller")
    assert check(ja, "おちゃは よんゴールド です。", 30) is None


def test_kept_answers_are_read_back_only_for_the_same_question(tmp_path):
    path = tmp_path / "t.jsonl"
    lines = [{"id": "d000001", "question_text": "How much is a room?", "answer": "Five gold.", "rejected": None},
             {"id": "d000002", "question_text": "Where is the smithy?", "answer": "No idea.", "rejected": "fact missing"},
             {"id": "d000003", "question_text": "An old question", "answer": "Old.", "rejected": None}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    dialogues = [_row(), _row(id="d000002", question_text="Where is the smithy?"),
                 _row(id="d000003", question_text="A new question")]
    assert load_teacher_answers(path, dialogues) == {"d000001": "Five gold."}
    lines[0]["answer"] = "Six gold."  # written under older checks: checked again on reading
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert load_teacher_answers(path, dialogues) == {}
    assert set(load_teacher_answers(path)) == {"d000001", "d000003"}


def test_off_script_rows_are_checked_against_the_persona_text_and_read_back(tmp_path):
    from npc_server.personas import load_folder
    from npc_server.paths import DEFAULT_PERSONAS_DIR
    from npc_server.training.dialogues import load_off_script, off_script_messages, off_script_rows

    personas = [p for p in load_folder(DEFAULT_PERSONAS_DIR)[0].values() if p.id == "innkeeper"]
    (row,) = off_script_rows(["Can you fly?"], personas)
    assert row["persona"] == "innkeeper" and row["category"] == "off_script" and row["expected"] == []
    assert "do not know" in off_script_messages(row["answer_text"], "en", "Can you fly?")[0]["content"]
    assert check(row, "Fly? Not me, love. I keep my feet by the fire.", 30) is None
    assert check(row, "A room is five gold.", 30) is None  # the persona's own facts are fine
    assert check(row, "Yes, for ninety gold.", 30).startswith("number not in the facts")
    path = tmp_path / "os.jsonl"
    path.write_text(json.dumps({"id": row["id"], "persona": "innkeeper", "category": "off_script", "language": "en",
                                "question_text": "Can you fly?", "answer": "Not me, love.", "rejected": None}) + "\n")
    (back,) = load_off_script(path)
    assert back["answer_text"] == "Not me, love." and back["persona_language"] == "en" and back["history"] == []
    texts = {"innkeeper": row["answer_text"]}
    assert len(load_off_script(path, texts)) == 1
    path.write_text(path.read_text().replace("Not me, love.", "Not me, I am an AI."))
    assert load_off_script(path, texts) == []  # checked again under the current checks
