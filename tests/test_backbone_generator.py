"""Backbone model + generator: KV-cache sessions equal full recompute, constrained blocks, sampling, streaming."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from npc_server.backbone.generator import (
    AudioChunk,
    Generator,
    SamplingConfig,
    TextDelta,
    TurnEnd,
)
from npc_server.backbone.model import (
    build_model,
    count_parameters,
    load_backbone,
    preset,
    save_backbone,
)
from npc_server.backbone.template import (
    BLOCK_AUDIO,
    BlockGrammar,
    ChatTemplate,
    Mode,
    SystemPrompt,
    UserTurn,
)
from npc_server.backbone.text_tokenizer import TextTokenizer

TEXTS = [
    "Welcome to The Sleepy Otter, traveller! A room costs ten gold a night.",
    "The smithy is down by the river; the market square is in the middle of town.",
    "いらっしゃいませ。お茶はいかがですか。",
]


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    tok = TextTokenizer.train(TEXTS * 5, vocab_size=320)
    config = preset("tiny", n_text=512)
    model = build_model(config).eval()
    return model, config, ChatTemplate(config.layout, tok)


@pytest.fixture()
def gen(parts) -> Generator:
    model, _, template = parts
    return Generator(model, template)


SYSTEM = SystemPrompt("innkeeper", "You are Greta, the innkeeper of The Sleepy Otter.")
Q1 = UserTurn(audio=list(range(0, 1200, 37)), text="How much is a room?")
Q2 = UserTurn(audio=list(range(1024, 2000, 29)))


def _full_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def test_presets_and_save_load(parts, tmp_path):
    model, config, _ = parts
    assert count_parameters(build_model(preset("default", 2048))) < 10_000_000
    assert model.config.vocab_size == config.layout.size
    assert model.lm_head.weight is model.model.embed_tokens.weight
    save_backbone(model, config, tmp_path)
    again, cfg2 = load_backbone(tmp_path)
    assert cfg2 == config
    x = torch.randint(0, config.layout.size, (1, 17))
    with torch.no_grad():
        assert torch.equal(model(x).logits, again(x).logits)


def test_follow_up_turn_prefills_only_new_tokens_and_matches_full_recompute(gen, parts):
    model, _, template = parts
    session = gen.start_session(SYSTEM)
    end1 = gen.generate(session, Q1, sampling=SamplingConfig(temperature=1.0, seed=3, max_new_tokens=60))
    cached = session.cached_tokens
    new = template.user(Q2).ids + template.assistant_prefix(Mode.AUDIO_TEXT).ids
    pending = list(session.pending)
    logits = gen.prefill(session, new)
    # only the pending <|end|> (or closing token) and the new turn were fed
    assert logits.shape[0] == len(pending) + len(new)
    assert session.cached_tokens == cached + len(pending) + len(new) == len(session.ids)
    full = _full_logits(model, session.ids)[-logits.shape[0]:]
    torch.testing.assert_close(logits, full, atol=1e-4, rtol=1e-4)
    assert end1.prefill_tokens == len(template.user(Q1).ids) + 2


def test_greedy_generation_equals_uncached_greedy_decode(gen, parts):
    model, config, template = parts
    session = gen.start_session(SYSTEM)
    gen.generate(session, Q1, sampling=SamplingConfig(temperature=0.0, max_new_tokens=40))
    history = session.ids + session.pending
    end = gen.generate(session, Q2, sampling=SamplingConfig(temperature=0.0, max_new_tokens=50))
    # reference: recompute the whole conversation for every token, same grammar
    ids = history + template.user(Q2).ids + template.assistant_prefix(Mode.AUDIO_TEXT).ids
    grammar = BlockGrammar(config.layout, Mode.AUDIO_TEXT, text_vocab=template.text.vocab_size)
    ref = []
    for _ in range(len(end.ids)):
        logits = _full_logits(model, ids)[-1].masked_fill(~grammar.mask(), float("-inf"))
        tok = int(torch.argmax(logits))
        if end.stop_reason != "end" and len(ref) == 50:
            break
        ref.append(tok)
        ids.append(tok)
        grammar.advance(tok)
        if grammar.finished or len(ref) == 50:
            break
    assert end.ids[: len(ref)] == ref


@pytest.mark.parametrize("mode", list(Mode))
def test_constrained_output_follows_the_template(gen, mode):
    session = gen.start_session(SYSTEM)
    for seed in (1, 2):
        events = list(gen.respond(session, Q1, mode=mode,
                                  sampling=SamplingConfig(temperature=1.5, top_k=0, top_p=1.0, seed=seed,
                                                          max_new_tokens=120)))
        end = events[-1]
        assert isinstance(end, TurnEnd)
        g = BlockGrammar(gen.layout, mode, text_vocab=gen.template.text.vocab_size)
        for tok in end.ids:  # includes the closing tokens of a truncated answer
            g.advance(tok)
        assert g.finished
        dec = gen.template.decode_assistant(end.ids)
        text = "".join(e.text for e in events if isinstance(e, TextDelta))
        chunks = [e.codes for e in events if isinstance(e, AudioChunk)]
        assert text == end.text == dec.text
        assert all(len(c) <= BLOCK_AUDIO for c in chunks)
        audio = torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.long)
        assert torch.equal(audio, end.audio) and audio.tolist() == list(dec.audio)
        if mode is Mode.TEXT:
            assert len(end.audio) == 0
        if mode is Mode.AUDIO:
            assert end.text == "" and len(end.audio) > 0
        if mode is Mode.AUDIO_TEXT:
            assert end.text and len(end.audio) > 0
        assert all(0 <= c < 4096 for c in end.audio.tolist())


def test_early_audio_hands_over_the_first_codes_before_the_span_ends(gen):
    """`early_audio=8`: the first span's first 8 codes leave as their own chunk, right after the 8th audio token;
    the tokens and the concatenated codes are the same as without it."""
    sampling = SamplingConfig(temperature=1.0, seed=5, max_new_tokens=200)
    plain = list(gen.respond(gen.start_session(SYSTEM), Q1, sampling=sampling))
    early = list(gen.respond(gen.start_session(SYSTEM), Q1, sampling=sampling, early_audio=8))
    assert early[-1].ids == plain[-1].ids
    chunks = [e.codes for e in early if isinstance(e, AudioChunk)]
    first_span = [e.codes for e in plain if isinstance(e, AudioChunk)][0]
    assert len(first_span) > 8  # the random tiny model writes full spans at this seed
    assert len(chunks[0]) == 8 and len(chunks[1]) == len(first_span) - 8
    assert torch.equal(torch.cat(chunks), early[-1].audio)


def test_sampling_settings(gen):
    def run(sampling):
        session = gen.start_session(SYSTEM)
        return gen.generate(session, Q1, sampling=sampling).ids

    s = SamplingConfig(temperature=1.0, top_k=50, top_p=0.9, seed=7, max_new_tokens=40)
    assert run(s) == run(s)  # seeded: reproducible
    assert run(s) != run(SamplingConfig(temperature=1.0, top_k=50, top_p=0.9, seed=8, max_new_tokens=40))
    greedy = run(SamplingConfig(temperature=0.0, max_new_tokens=40))
    assert run(SamplingConfig(temperature=1.0, top_k=1, seed=1, max_new_tokens=40)) == greedy
    assert run(SamplingConfig(temperature=1.0, top_p=1e-6, seed=2, max_new_tokens=40)) == greedy
    short = gen.generate(gen.start_session(SYSTEM), Q1, sampling=SamplingConfig(seed=1, max_new_tokens=5))
    assert short.stop_reason == "max_tokens" and 5 <= len(short.ids) <= 5 + 4
    for bad in ({"temperature": -1}, {"top_p": 0.0}, {"top_k": -1}, {"max_new_tokens": 0}):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.temperature = 2.0  # frozen


def test_truncated_turn_stays_well_formed_and_stop_callback(gen, parts):
    model, _, _ = parts
    session = gen.start_session(SYSTEM)
    end = gen.generate(session, Q1, sampling=SamplingConfig(seed=1, max_new_tokens=7))
    assert end.stop_reason == "max_tokens"
    calls = iter(range(100))
    events = list(gen.respond(session, Q2, sampling=SamplingConfig(seed=2, max_new_tokens=200),
                              should_stop=lambda: next(calls) >= 3))
    assert events[-1].stop_reason == "stopped"
    # the cache still equals a full recompute of the conversation
    logits = gen.prefill(session, gen.template.user(Q1).ids)
    full = _full_logits(model, session.ids)[-logits.shape[0]:]
    torch.testing.assert_close(logits, full, atol=1e-4, rtol=1e-4)


def test_context_overflow_drops_oldest_turns(parts):
    model, _, template = parts
    gen = Generator(model, template, max_context=260)
    session = gen.start_session(SYSTEM)
    system_len = len(session.segments[0])
    for seed in range(6):
        gen.generate(session, Q1, sampling=SamplingConfig(seed=seed, max_new_tokens=60))
        assert session.cached_tokens + len(session.pending) <= 260
        assert session.segments[0] == template.system(SYSTEM).ids and len(session.segments[0]) == system_len
    assert session.turns < 6  # old turns were evicted
    with pytest.raises(ValueError):
        gen.generate(session, UserTurn(text="x " * 400), sampling=SamplingConfig(max_new_tokens=10))


def test_from_pretrained(parts, tmp_path):
    model, config, template = parts
    save_backbone(model, config, tmp_path)
    template.text.save(tmp_path)
    gen = Generator.from_pretrained(tmp_path)
    a = gen.generate(gen.start_session(SYSTEM), Q1, sampling=SamplingConfig(temperature=0.0, max_new_tokens=30))
    b = Generator(model, template).generate(Generator(model, template).start_session(SYSTEM), Q1,
                                            sampling=SamplingConfig(temperature=0.0, max_new_tokens=30))
    assert a.ids == b.ids


def test_add_turn_restores_history_like_a_full_prompt(gen, parts):
    from npc_server.backbone.template import AssistantTurn

    model, _, template = parts
    session = gen.start_session(SYSTEM)
    user, answer = UserTurn(text="Hello there."), AssistantTurn(text="Good day.", mode=Mode.TEXT)
    gen.add_turn(session, user, answer)
    logits = gen.prefill(session, template.user(Q2).ids + template.assistant_prefix(Mode.AUDIO_TEXT).ids)
    expected = template.conversation(SYSTEM, [(user, answer), (Q2, None)]).ids
    assert session.ids == expected
    torch.testing.assert_close(logits[-1], _full_logits(model, expected)[-1], atol=1e-4, rtol=1e-4)


def test_prefill_can_extend_the_current_turn_segment(gen, parts):
    model, _, template = parts
    session = gen.start_session(SYSTEM)
    gen.prefill(session, template.user(Q2).ids)
    n_segments = len(session.segments)
    logits = gen.prefill(session, template.assistant_prefix(Mode.TEXT).ids, new_segment=False)
    assert len(session.segments) == n_segments
    assert session.segments[-1] == template.user(Q2).ids + template.assistant_prefix(Mode.TEXT).ids
    torch.testing.assert_close(logits[-1], _full_logits(model, session.ids)[-1], atol=1e-4, rtol=1e-4)


def test_rewind_cuts_the_conversation_and_memory_follows(gen, parts):
    model, _, template = parts
    session = gen.start_session(SYSTEM)
    gen.generate(session, Q1, sampling=SamplingConfig(seed=3, max_new_tokens=40))
    before = session.memory_bytes()
    keep = len(session.segments[0]) + 5  # the system prompt and 5 tokens of the first turn
    session.rewind(keep)
    assert session.cached_tokens == len(session.ids) == keep and session.pending == []
    assert [len(seg) for seg in session.segments] == [keep - 5, 5]
    assert 0 < session.memory_bytes() < before
    with pytest.raises(ValueError):
        session.rewind(keep + 1)
    logits = gen.prefill(session, template.user(Q2).ids, new_segment=False)
    torch.testing.assert_close(logits, _full_logits(model, session.ids)[-logits.shape[0]:], atol=1e-4, rtol=1e-4)
