"""Backbone vocabulary layout, text tokenizer and chat template: round trips, block structure, errors."""

from __future__ import annotations

import random

import pytest
import torch

from npc_server.backbone.template import (
    BLOCK_AUDIO,
    BLOCK_TEXT,
    KIND_AUDIO,
    KIND_TEXT,
    AssistantTurn,
    BlockGrammar,
    ChatTemplate,
    Controls,
    Mode,
    SystemPrompt,
    UserTurn,
)
from npc_server.backbone.text_tokenizer import TextTokenizer
from npc_server.backbone.vocab import (
    N_AUDIO,
    N_LINGUISTIC,
    SPECIAL_TOKENS,
    VocabLayout,
    pitch_token,
    speed_token,
)

TEXTS = [
    "Welcome to The Sleepy Otter, traveller! A room costs ten gold a night.",
    "The smithy is down by the river; the market square is in the middle of town.",
    "Find the lost silver ring in the old mill and I will pay you fifty gold.",
    "いらっしゃいませ。お茶はいかがですか。",
    "你好，欢迎光临。今天的茶很好喝。",
    "歡迎光臨，你想飲咩茶？",
    "What is three plus four? That makes seven.",
]


@pytest.fixture(scope="module")
def template() -> ChatTemplate:
    tok = TextTokenizer.train(TEXTS * 5, vocab_size=400)
    return ChatTemplate(VocabLayout(512), tok)


def test_layout_ranges_are_disjoint_and_documented():
    lay = VocabLayout(2048)
    assert lay.special_offset == 2048
    assert lay.audio_offset >= 2048 + len(SPECIAL_TOKENS) and lay.audio_offset % 64 == 0
    assert lay.size == lay.audio_offset + N_AUDIO
    assert lay.special("<|bos|>") == 2048
    assert lay.is_text(2047) and not lay.is_text(2048)
    assert lay.is_special(lay.special("<|voice:joe|>"))
    assert lay.is_audio(lay.audio_offset) and not lay.is_semantic(lay.audio_offset)
    assert lay.is_semantic(lay.audio_offset + N_LINGUISTIC) and lay.is_semantic(lay.size - 1)
    # interleaved tokenizer ids: linguistic k -> k, semantic k -> 1024 + k
    assert lay.audio_ids([0, 1023, 1024, 5119]) == [lay.audio_offset + k for k in (0, 1023, 1024, 5119)]
    assert lay.semantic_ids([0, 4095]) == [lay.audio_offset + 1024, lay.audio_offset + 1024 + 4095]
    assert lay.to_semantic_codes(lay.semantic_ids([7, 4000])) == [7, 4000]
    assert torch.equal(lay.to_interleaved(lay.audio_ids(torch.tensor([3, 2000]))), torch.tensor([3, 2000]))
    assert len(set(SPECIAL_TOKENS)) == len(SPECIAL_TOKENS)
    d = lay.describe()
    assert d["semantic"] == [lay.audio_offset + 1024, lay.size]
    with pytest.raises(ValueError):
        lay.audio_ids([5120])
    with pytest.raises(ValueError):
        lay.semantic_ids([-1])
    with pytest.raises(ValueError):
        lay.special("<|nope|>")


def test_control_quantisation():
    assert speed_token(1.0) == "<|speed:1.00|>"
    assert speed_token(1.23) == "<|speed:1.25|>"
    assert pitch_token(-2.2) == "<|pitch:-2.0|>"
    assert pitch_token(0.3) == "<|pitch:+0.5|>"
    with pytest.raises(ValueError):
        speed_token(3.0)
    with pytest.raises(ValueError):
        Controls(emotion="bored").token_names()
    with pytest.raises(ValueError):
        Controls(language="ja", accent="gb").token_names()
    with pytest.raises(ValueError):
        Controls(voice="nobody").token_names()


def test_text_tokenizer_round_trips_all_languages(template, tmp_path):
    tok = template.text
    for text in TEXTS + ["Unseen words: zyxquv 🐉 ÆØÅ"]:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    # BPE merges learned something: common text is much shorter than its bytes
    assert len(tok.encode(TEXTS[0])) < len(TEXTS[0].encode()) / 2
    tok.save(tmp_path)
    again = TextTokenizer.from_pretrained(tmp_path)
    assert again.encode(TEXTS[1]) == tok.encode(TEXTS[1])
    with pytest.raises(ValueError):
        tok.decode([tok.vocab_size])


@pytest.mark.parametrize("mode", list(Mode))
def test_assistant_round_trip_and_block_structure(template, mode):
    rng = random.Random(0)
    lay = template.layout
    for text in ["", "Hi.", TEXTS[0], TEXTS[2] + " " + TEXTS[1], TEXTS[3]]:
        for n_audio in [0, 1, 14, 15, 16, 30, 45, 200]:
            audio = [rng.randrange(4096) for _ in range(n_audio)]
            enc = template.assistant(AssistantTurn(text=text, audio=audio, mode=mode))
            dec = template.decode_assistant(enc.ids)
            assert dec.mode == mode
            assert dec.text == (text if mode != Mode.AUDIO else "")
            assert list(dec.audio) == (audio if mode != Mode.TEXT else [])
            # the grammar accepts exactly this body
            g = BlockGrammar(lay, mode)
            for tok in enc.ids[2:]:
                g.advance(tok)
            assert g.finished and enc.ids[-1] == lay.special("<|end|>")
            # structure: text parts <= 10 while audio runs, audio spans <= 15, only the last span short
            spans, part, parts, cur, in_audio = [], 0, [], None, False
            for tok in enc.ids[2:]:
                if tok == lay.special("<|audio_start|>"):
                    parts.append(part)
                    part, cur, in_audio = 0, 0, True
                elif tok == lay.special("<|audio_end|>"):
                    spans.append(cur)
                    in_audio = False
                elif in_audio:
                    cur += 1
                elif lay.is_text(tok) or tok == lay.special("<|text_end|>"):
                    part += 1
            assert all(s <= BLOCK_AUDIO for s in spans)
            assert all(s == BLOCK_AUDIO for s in spans[:-1])
            assert all(p <= BLOCK_TEXT for p in parts)
            if mode is Mode.AUDIO_TEXT and n_audio >= 2 * BLOCK_AUDIO and len(template.text.encode(text)) >= 2 * BLOCK_TEXT:
                assert parts[0] == BLOCK_TEXT and parts[1] == BLOCK_TEXT  # AQAA: 10 text then 15 audio
            kinds = dict(zip(enc.ids, enc.kinds))
            assert all(kinds[t] == KIND_AUDIO for t in enc.ids if lay.is_audio(t))
            assert all(kinds[t] == KIND_TEXT for t in enc.ids if lay.is_text(t))


def test_grammar_rejects_out_of_template_tokens(template):
    lay = template.layout
    g = BlockGrammar(lay, Mode.AUDIO_TEXT)
    with pytest.raises(ValueError):
        g.advance(lay.semantic_ids([5])[0])  # audio before any <|audio_start|>
    for _ in range(BLOCK_TEXT):
        g.advance(5)
    assert g.allowed_groups() == ("<|audio_start|>",)
    with pytest.raises(ValueError):
        g.advance(6)  # an 11th text token
    g.advance(lay.special("<|audio_start|>"))
    with pytest.raises(ValueError):
        g.advance(lay.audio_ids([3])[0])  # linguistic ids are not answer audio
    for _ in range(BLOCK_AUDIO):
        g.advance(lay.semantic_ids([1])[0])
    assert g.allowed_groups() == ("<|audio_end|>",)
    g.advance(lay.special("<|audio_end|>"))
    g.advance(lay.special("<|text_end|>"))
    assert set(g.allowed_groups()) == {"<|audio_start|>", "<|end|>"}
    g.advance(lay.special("<|end|>"))
    assert g.finished
    text_only = BlockGrammar(lay, Mode.TEXT)
    assert text_only.allows(5) and not text_only.allows(lay.special("<|audio_start|>"))
    audio_only = BlockGrammar(lay, Mode.AUDIO)
    assert audio_only.allowed_groups() == ("<|audio_start|>",)


def test_conversation_layout_and_targets(template):
    lay = template.layout
    system = SystemPrompt("innkeeper", "You are Greta.", Controls(voice="gb_female", accent="gb", emotion="happy",
                                                                  speed=1.2, pitch_st=-1.0))
    user1 = UserTurn(text="Hello there.")
    ans1 = AssistantTurn(text="Good day.", mode=Mode.TEXT)
    user2 = UserTurn(audio=[1, 2, 1030, 1031, 1032], text="How much is a room?")
    ans2 = AssistantTurn(text="Ten gold.", audio=list(range(20)))
    enc = template.conversation(system, [(user1, ans1), (user2, ans2)])
    rendered = template.render(enc.ids)
    assert rendered.startswith("<|bos|><|system|><|persona:innkeeper|><|voice:gb_female|><|lang:en|><|accent:gb|>"
                               "<|emotion:happy|><|speed:1.20|><|pitch:-1.0|>You are Greta.<|end|>")
    assert "<|user|>Hello there.<|end|><|assistant|><|mode:text|>Good day.<|text_end|><|end|>" in rendered
    assert "<|user|><|audio_start|><a:1><a:2><a:1030><a:1031><a:1032><|audio_end|>How much is a room?<|end|>" in rendered
    # only the last answer body is a training target
    target_ids = [t for t, m in zip(enc.ids, enc.targets) if m]
    assert target_ids == template.assistant_body(ans2).ids
    assert len(enc.ids) == len(enc.kinds) == len(enc.targets)
    # generation prompt
    prompt = template.conversation(system, [(user2, None)])
    assert prompt.ids[-2:] == [lay.special("<|assistant|>"), lay.special("<|mode:audio_text|>")]
    with pytest.raises(ValueError):
        UserTurn()
    with pytest.raises(ValueError):
        template.user(UserTurn(audio=[6000]))
