"""The answer pipeline on a tiny model: prefix-cached personas equal a fresh prefill, states are independent."""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from npc_server.audio import load_audio
from npc_server.backbone.generator import AudioChunk, TextDelta
from npc_server.backbone.template import UserTurn
from npc_server.engine import TEXT_FLUSH_TOKENS, Engine, EngineAudio, EngineDone, EngineText
from npc_server.personas import parse_persona
from npc_server.paths import DEFAULT_PERSONAS_DIR


def _answer(engine, state, persona, wav):
    controls = engine.system_prompt(persona).controls
    events = list(engine.answer(state, persona, controls, audio=wav))
    return events, events[-1]


def test_prefix_cache_equals_fresh_prefill(tiny_model_dir, question_wav):
    engine = Engine.from_pretrained(tiny_model_dir)
    path = DEFAULT_PERSONAS_DIR / "blacksmith.yaml"
    persona = parse_persona(path.read_text().replace("max_answer_seconds: 10", "max_answer_seconds: 1"), str(path))
    wav, _ = load_audio(question_wav, target_sr=16000)

    first = engine.new_state(persona)  # computes and caches the system prompt
    second = engine.new_state(persona)  # copies the cached prefix
    assert len(engine._prefix_cache) == 1
    assert second.session.cache is not first.session.cache
    fresh = engine.generator.start_session(engine.system_prompt(persona))
    for a, b in zip(second.session.cache.layers, fresh.cache.layers):
        assert torch.allclose(a.keys, b.keys) and torch.allclose(a.values, b.values)

    ev1, end1 = _answer(engine, first, persona, wav)
    ev2, end2 = _answer(engine, second, persona, wav)
    assert isinstance(end1, EngineDone) and end1.spoken_text == end2.spoken_text  # greedy: identical answers
    # answering in one conversation did not touch the other's cache
    assert first.session.cache.get_seq_length() == second.session.cache.get_seq_length()
    assert any(isinstance(e, EngineText) for e in ev1) and any(isinstance(e, EngineAudio) for e in ev1)
    n_audio = sum(len(e.wav) for e in ev1 if isinstance(e, EngineAudio))
    assert n_audio > 0 and all(e.sample_rate == engine.sample_rate for e in ev1 if isinstance(e, EngineAudio))


def test_listener_equals_offline_encoding(tiny_model_dir, question_wav):
    """Tokenizing while the question arrives (odd chunk sizes, 22.05 kHz) gives the ids of offline encoding."""
    engine = Engine.from_pretrained(tiny_model_dir)
    wav, sr = load_audio(question_wav)
    listener = engine.listen(sr)
    for i in range(0, len(wav), 3001):
        listener.push(wav[i:i + 3001])
    streamed = listener.finish()
    offline = engine.tokenizer.encode(wav, sr).interleaved
    assert torch.equal(streamed, offline)


def test_subtitles_leave_in_block_pieces_before_their_audio(tiny_model_dir, question_wav):
    """Text goes out in pieces of at most TEXT_FLUSH_TOKENS tokens, always before the audio that follows it; the
    pieces add up to the spoken text."""
    engine = Engine.from_pretrained(tiny_model_dir)
    path = DEFAULT_PERSONAS_DIR / "blacksmith.yaml"
    persona = parse_persona(path.read_text().replace("max_answer_seconds: 10", "max_answer_seconds: 2"), str(path))
    wav, _ = load_audio(question_wav, target_sr=16000)
    events, end = _answer(engine, engine.new_state(persona), persona, wav)
    pieces = [e.text for e in events if isinstance(e, EngineText)]
    assert "".join(pieces) == end.spoken_text
    # the same greedy answer straight from the generator: one TextDelta per text token
    state = engine.new_state(persona)
    user = UserTurn(audio=engine.tokenizer.encode(wav, 16000).interleaved)
    sampling = replace(engine.sampling, max_new_tokens=int(persona.max_answer_seconds * 45) + 16)
    raw = list(engine.generator.respond(state.session, user, sampling=sampling))
    n_text = sum(isinstance(e, TextDelta) for e in raw)
    n_audio = sum(isinstance(e, AudioChunk) for e in raw)
    assert raw[-1].text == end.spoken_text
    assert len(pieces) <= math.ceil(n_text / TEXT_FLUSH_TOKENS) + n_audio + 1
    if n_text > 3:
        assert len(pieces) < n_text


def test_a_busy_server_sends_a_longer_first_chunk(tiny_model_dir, question_wav):
    """With n answers in flight the first chunk is n times longer (capped at one regular chunk), so each client
    starts with a buffer that covers the slower progress; alone, the first chunk stays short."""
    engine = Engine.from_pretrained(tiny_model_dir)
    path = DEFAULT_PERSONAS_DIR / "blacksmith.yaml"
    persona = parse_persona(path.read_text().replace("max_answer_seconds: 10", "max_answer_seconds: 3"), str(path))
    wav, _ = load_audio(question_wav, target_sr=16000)
    cfg, spt = engine.vocoder.stream_config, engine.vocoder.samples_per_token
    controls = engine.system_prompt(persona).controls
    firsts = {}
    for busy in (1, 3):
        events = list(engine.answer(engine.new_state(persona), persona, controls, audio=wav, load=lambda: busy))
        firsts[busy] = next(len(e.wav) for e in events if isinstance(e, EngineAudio))
    assert firsts[1] == cfg.first_chunk_tokens * spt
    assert firsts[3] == min(cfg.chunk_tokens, 3 * cfg.first_chunk_tokens) * spt


def test_buffered_lookahead_override(tiny_model_dir):
    """`serve --buffered-lookahead N` (Engine.from_pretrained) sets the vocoder stream's buffered lookahead; without
    it the model's config.json holds; a negative value is refused by the command line."""
    import subprocess
    import sys

    assert Engine.from_pretrained(tiny_model_dir).vocoder.stream_config.buffered_lookahead_tokens == 0
    engine = Engine.from_pretrained(tiny_model_dir, buffered_lookahead=6)
    assert engine.vocoder.stream_config.buffered_lookahead_tokens == 6
    r = subprocess.run([sys.executable, "-m", "npc_server.cli", "serve", "--model-dir", str(tiny_model_dir),
                        "--insecure-loopback", "--buffered-lookahead", "-1"], capture_output=True, text=True)
    assert r.returncode == 2 and "--buffered-lookahead" in r.stderr

