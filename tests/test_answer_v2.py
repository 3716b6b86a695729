"""Backbone v2's answer stage (SFT) on a tiny random Gemma 3: the dialogue layout, the training mechanics, and
the subtitle judge that `eval npc` and `train answer` report."""

from __future__ import annotations

import random

import numpy as np

from npc_server.backbone.template_v2 import IGNORE, DialogueFormat
from npc_server.backbone.vocab import language_token
from npc_server.eval.answer_v2 import answer_rows, in_language, max_answer_tokens, summarise, to_markdown
from npc_server.training.answer import answer_examples
from tests.test_audio_lm import N_TEXT, tiny_body, tiny_model

ALPHABET = " abcdefghijklmnopqrstuvwxyz.?'"


class CharTokenizer:
    """Characters -> ids 10.. (inside the tiny model's 120 output rows), invertible."""

    bos_token_id, eos_token_id, pad_token_id = 2, 1, 0

    def encode(self, text, add_special_tokens=False):
        return [10 + ALPHABET.index(c) for c in text.lower() if c in ALPHABET]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(ALPHABET[i - 10] for i in ids if 10 <= i < 10 + len(ALPHABET))


def _learnable_model():
    """The tiny model with embeddings as large as a real model's: with the default 0.02 the tied head cannot
    express a confident next character and nothing is learnt in a test's budget."""
    import torch

    from npc_server.backbone.audio_lm import AudioLM, AudioLMConfig

    body = tiny_body()
    with torch.no_grad():
        body.embed_tokens.weight.normal_(0, 0.5)
    cfg = AudioLMConfig(base="tiny", n_text=N_TEXT, hidden=32, lora_rank=8)
    return AudioLM(cfg, body, head_text_ids=torch.arange(0, 120)).eval()


def _row(i: int, persona: str, question: str, answer: str, expected: list[str], codes=None) -> dict:
    return {"id": f"d{i}", "category": "price", "persona": persona, "language": "en", "persona_language": "en",
            "question_text": question, "answer_text": answer, "expected": expected, "history": [],
            "linguistic": np.asarray(codes if codes is not None else [5, 6, 7]), "interleaved": None}


def test_dialogue_layout_takes_the_loss_on_the_answer_only():
    model = tiny_model()
    fmt = DialogueFormat(model.cfg.layout, CharTokenizer())
    history = [{"question": "hi", "answer": "hello"}]
    spoken = fmt.answer_prompt("you are greta", "en", history, audio=fmt.audio(np.array([1, 2, 3])))
    typed = fmt.answer_prompt("you are greta", "en", history, text="room?")
    assert spoken[:2] == [fmt.bos, fmt.system]
    assert model.cfg.layout.special(language_token("en")) in spoken
    assert spoken[-2:] == typed[-2:] == [fmt.assistant, fmt.mode_text]
    assert fmt.audio_start in spoken and fmt.audio_start not in typed
    ex = fmt.answer_example(typed, "five gold")
    assert len(ex.ids) == len(ex.targets)
    learned = [t for t in ex.targets if t != IGNORE]
    assert learned == fmt.text_ids("five gold") + [fmt.text_end, fmt.end]  # the history's answer carries no loss
    assert all(t == ex.ids[i + 1] for i, t in enumerate(ex.targets) if t != IGNORE)


def test_a_few_steps_teach_the_persona_facts_and_the_judge_sees_it():
    from npc_server.training.lm_v2 import train_loop

    model = _learnable_model()
    fmt = DialogueFormat(model.cfg.layout, CharTokenizer())
    texts = {"innkeeper": "you are greta", "guard": "you are angus"}
    rows = [_row(0, "innkeeper", "price?", "five gold.", ["five gold"], [5, 6, 7]),
            _row(1, "guard", "price?", "two gold.", ["two gold"], [5, 6, 7])]
    before = summarise(answer_rows(model, fmt, rows, texts, "audio", progress=False))
    examples = answer_examples(fmt, rows * 4, texts, typed_share=0.5, rng=random.Random(0))
    assert len(examples) == 8
    train_loop(model, examples, minutes=5, batch_tokens=256, lr=3e-3, precision="fp32", pad_id=0, max_steps=60,
               progress=False)
    results = answer_rows(model, fmt, rows, texts, "audio", progress=False)
    after = summarise(results)
    assert before["correct"] < 1.0 and after["correct"] == 1.0, results
    assert results[0]["answer"] == "five gold." and results[1]["answer"] == "two gold."
    assert after["ended_in_bound"] == 1.0 and after["other_persona"] == 0
    assert "| price | 2 | 100.0% |" in to_markdown("tiny", after, "audio")


def test_judges():
    assert in_language("A room is five gold.", "en") and not in_language("いらっしゃいませ", "en")
    assert in_language("いらっしゃいませ", "ja") and not in_language("Welcome!", "ja")
    assert in_language("歡迎光臨", "yue") and in_language("huan1 ying2 guang1 lin2", "cmn")
    assert not in_language("huan1 ying2", "en") and not in_language("Welcome", "cmn")
    assert max_answer_tokens(12) == 48 and max_answer_tokens(0.5) == 8


def test_stage_plumbing_token_cache_run_log_and_record(tmp_path):
    import json

    import pytest

    from npc_server.training.lm_v2 import RunResult, append_run_log, continue_run_log, run_record, token_cache

    with pytest.raises(SystemExit, match="no v2 token cache at .*train tokenizer-v2"):
        token_cache(tmp_path / "corpus", None, "train answer")
    (tmp_path / "corpus" / "tokens_v2").mkdir(parents=True)
    assert token_cache(tmp_path / "corpus", None, "train answer")[1] == tmp_path / "corpus" / "tokens_v2"
    record = run_record("answer (SFT)", "base", RunResult(10, 5000, 50.0, [2.0] * 20 + [1.0] * 20), "bf16", 2, "cmd",
                        pairs=3)
    assert (record["tokens_per_s"], record["loss_first"], record["loss_last"], record["pairs"]) == (100, 2.0, 1.0, 3)
    (tmp_path / "a").mkdir()  # a run folder (the stage saves its weights there first)
    append_run_log(tmp_path / "a", record)
    continue_run_log(tmp_path / "a", tmp_path / "b")  # a run continuing a starts from a's curve
    append_run_log(tmp_path / "b", dict(record, stage="prefer (DPO)"))
    runs = json.loads((tmp_path / "b" / "training.json").read_text())["runs"]
    assert [r["stage"] for r in runs] == ["answer (SFT)", "prefer (DPO)"]
