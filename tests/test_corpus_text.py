"""Corpus text generator: determinism, contract fields, split disjointness, answers that carry their facts."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from npc_server.controls import EMOTIONS, LANGUAGES
from npc_server.training.corpus.players import pick_player, player_pool
from npc_server.training.corpus.text import CATEGORIES, generate_dialogues, normalize_question
from npc_server.training.corpus.world import ITEMS, PERSONAS, gold, number_cmn, number_en, number_ja, number_yue
from npc_server.voices import VOICE_BANK, voice_supports


def _has(text: str, phrase: str) -> bool:
    """phrase occurs as whole words ("thirty" is not in "thirty-one"); kana / hanzi have no word breaks."""
    if not phrase.isascii():
        return phrase in text
    return re.search(r"(?<![\w-])" + re.escape(phrase.lower()) + r"(?![\w-])", text.lower()) is not None


@pytest.fixture(scope="module")
def dialogues():
    return generate_dialogues(3000, seed=0)


def test_same_seed_same_text_other_seed_differs():
    a = [d.to_json() for d in generate_dialogues(200, seed=3)]
    b = [d.to_json() for d in generate_dialogues(200, seed=3)]
    c = [d.to_json() for d in generate_dialogues(200, seed=4)]
    assert a == b
    assert a != c


def test_all_categories_languages_personas_present(dialogues):
    cats = Counter(d.category for d in dialogues)
    assert set(cats) == set(CATEGORIES)
    assert {d.language for d in dialogues} == set(LANGUAGES)  # en + ja + yue + cmn
    assert {d.persona for d in dialogues} == set(PERSONAS)
    assert {d.accent for d in dialogues if d.language == "en"} >= {"us", "gb", "scotland"}


def test_dialogue_fields_follow_contract(dialogues):
    for d in dialogues:
        j = d.to_json()
        assert j["split"] in ("train", "valid", "heldout")
        assert j["category"] in CATEGORIES
        assert j["npc_voice"] in VOICE_BANK and voice_supports(j["npc_voice"], j["language"], j["accent"]), j
        assert set(j["controls"]) == {"emotion", "speed", "pitch_st"}
        assert j["controls"]["emotion"] in EMOTIONS
        assert 0.5 <= j["controls"]["speed"] <= 2.0 and -12 <= j["controls"]["pitch_st"] <= 12
        assert j["question_text"].strip() and j["answer_text"].strip()
        assert j["rejected_text"] != j["answer_text"]
        for h in j["history"]:
            assert set(h) == {"question", "answer"}
        for e in j["expected"]:
            assert _has(j["answer_text"], e), (e, j["answer_text"])
        if j["expected"] and j["category"] not in ("control", "language"):
            assert not all(_has(j["rejected_text"], e) for e in j["expected"]), j


def test_multiturn_needs_history_and_controls_follow_instructions(dialogues):
    multi = [d for d in dialogues if d.category == "multiturn"]
    assert multi and all(d.history for d in multi)
    ctrl = [d for d in dialogues if d.category == "control"]
    slow = [d for d in ctrl if "slowly" in d.question_text]
    high = [d for d in ctrl if "higher voice" in d.question_text]
    sad = [d for d in ctrl if "sadly" in d.question_text]
    assert slow and all(d.controls["speed"] < 1 for d in slow)
    assert high and all(d.controls["pitch_st"] > 0 for d in high)
    assert sad and all(d.controls["emotion"] == "sad" for d in sad)
    scot = [d for d in ctrl if "Scottish" in d.question_text]
    assert scot and all(d.accent == "scotland" for d in scot)
    lang = [d for d in dialogues if d.category == "language" and "Japanese" in d.question_text]
    assert lang and all(d.language == "ja" and d.npc_voice == "ja_female" for d in lang)


def test_heldout_question_texts_never_in_train(dialogues):
    train = {normalize_question(d.question_text) for d in dialogues if d.split == "train"}
    held = {normalize_question(d.question_text) for d in dialogues if d.split == "heldout"}
    assert held and not (train & held)
    assert Counter(d.split for d in dialogues)["heldout"] >= 0.05 * len(dialogues)


def test_heldout_player_voices_disjoint():
    pool = player_pool()
    assert len(pool) >= 100 and len({v.id for v in pool}) == len(pool)
    rng = random.Random(0)
    for lang in LANGUAGES:
        held = {pick_player(rng, lang, "heldout").id for _ in range(200)}
        train = {pick_player(rng, lang, s).id for s in ("train", "valid") for _ in range(200)}
        assert held and train and not (held & train)


def test_prices_and_numbers():
    assert number_en(42) == "forty-two" and number_en(105) == "one hundred and five"
    assert number_ja(25) == "にじゅうご" and number_yue(12) == "十二" and number_cmn(2) == "liang3"
    assert gold(ITEMS["sword"].price) == "twenty-five gold"
    with pytest.raises(ValueError):
        gold(3, "fr")


def test_larger_corpus_extends_smaller_one():
    """From PREFIX_STABLE_FROM turns on, a smaller corpus is a prefix of a larger one (so a run can be shrunk)."""
    from npc_server.training.corpus.generate import build
    from npc_server.training.corpus.text import PREFIX_STABLE_FROM

    small_d, small_j = build(PREFIX_STABLE_FROM, seed=1)
    big_d, big_j = build(PREFIX_STABLE_FROM + 50, seed=1)
    assert [d.to_json() for d in small_d] == [d.to_json() for d in big_d[:PREFIX_STABLE_FROM]]
    assert small_j == big_j[: len(small_j)]


def test_manifest_reader_skips_only_a_torn_last_line(tmp_path):
    from npc_server.training.corpus.manifest import read_manifest

    with pytest.raises(FileNotFoundError, match="train corpus"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.jsonl").write_text('{"id": "a"}\n\n{"id": "b"}\n{"id": "c", "te')
    assert [r["id"] for r in read_manifest(tmp_path)] == ["a", "b"]
    (tmp_path / "manifest.jsonl").write_text('{"id": "a"}\n{"id": \n{"id": "c"}\n')
    with pytest.raises(ValueError, match="manifest.jsonl:2"):
        read_manifest(tmp_path)
