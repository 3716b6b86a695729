"""Fast CPU inference path and cross-conversation batching: same logits and answers as the transformers forward."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import DynamicCache

from npc_server.backbone.batching import StepBatcher
from npc_server.backbone.fast import FastForward
from npc_server.backbone.generator import Generator, SamplingConfig, forward_tokens
from npc_server.backbone.model import build_model, preset
from npc_server.backbone.template import BlockGrammar, ChatTemplate, Mode, SystemPrompt, UserTurn
from npc_server.backbone.text_tokenizer import TextTokenizer
from npc_server.paths import DEFAULT_MODEL_DIR

CPU = torch.device("cpu")
SYSTEM = SystemPrompt("innkeeper", "You are Greta, the innkeeper of The Sleepy Otter.")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tok = TextTokenizer.train(["A room costs ten gold a night.", "The smithy is by the river."] * 5, vocab_size=300)
    config = preset("tiny", n_text=512)
    model = build_model(config).eval()
    return model, ChatTemplate(config.layout, tok)


@pytest.fixture(scope="module")
def default_generator():
    return Generator.from_pretrained(DEFAULT_MODEL_DIR / "backbone")


def _cache(model):
    return DynamicCache(config=model.config)


def test_forward_equals_transformers(tiny):
    model, _ = tiny
    fast = FastForward(model)
    ref, new = _cache(model), _cache(model)
    ids = list(range(10, 300, 7))
    for feed in (ids, [5, 6, 7], [3300], [8]):  # prefill from empty, a chunk on top of a past, single tokens
        want, ref = forward_tokens(model, ref, feed, CPU)
        got = fast.forward(new, feed)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert new.get_seq_length() == ref.get_seq_length()
    for a, b in zip(new.layers, ref.layers):
        torch.testing.assert_close(a.keys, b.keys)
        torch.testing.assert_close(a.values, b.values)


def test_rows_only_compute_allowed_logits(tiny):
    model, template = tiny
    fast = FastForward(model)
    grammar = BlockGrammar(template.layout, Mode.AUDIO_TEXT, text_vocab=template.text.vocab_size)
    full = fast.forward(_cache(model), [1, 2, 3], last_only=True)
    part = fast.forward(_cache(model), [1, 2, 3], last_only=True, rows=grammar.rows())
    mask = grammar.mask()
    torch.testing.assert_close(part[0, mask], full[0, mask])
    assert torch.isneginf(part[0, ~mask]).all()


def test_forward_batch_equals_one_by_one(tiny):
    model, _ = tiny
    fast = FastForward(model)
    prompts = [list(range(20, 20 + n)) for n in (5, 17, 40)]
    caches = [_cache(model) for _ in prompts]
    singles = [_cache(model) for _ in prompts]
    for p, c, s in zip(prompts, caches, singles):
        fast.forward(c, p)
        fast.forward(s, p)
    tokens = [3300, 7, 4000]
    batched = fast.forward_batch(caches, tokens)
    for i, (s, t) in enumerate(zip(singles, tokens)):
        torch.testing.assert_close(batched[i:i + 1], fast.forward(s, [t]), rtol=1e-4, atol=1e-4)
        assert caches[i].get_seq_length() == s.get_seq_length()


def test_generator_fast_path_gives_the_same_answers(tiny):
    model, template = tiny
    plain, fast = Generator(model, template, fast=False), Generator(model, template)
    assert plain.fast is None and fast.fast is not None
    q = UserTurn(audio=list(range(0, 1200, 37)), text="How much is a room?")
    for sampling in (SamplingConfig(temperature=0.0, max_new_tokens=160),
                     SamplingConfig(temperature=0.9, seed=3, max_new_tokens=160)):
        sessions = plain.start_session(SYSTEM), fast.start_session(SYSTEM)
        for turn in range(2):  # the follow-up reuses each generator's KV cache
            a = plain.generate(sessions[0], q, Mode.AUDIO_TEXT, sampling)
            b = fast.generate(sessions[1], q, Mode.AUDIO_TEXT, sampling)
            assert a.ids == b.ids, f"turn {turn} differs with {sampling}"


def test_fast_path_matches_the_shipped_model(default_generator):
    model = default_generator.model
    fast = FastForward(model)
    ids = list(range(100, 400))
    want, _ = forward_tokens(model, _cache(model), ids, CPU)
    torch.testing.assert_close(fast.forward(_cache(model), ids), want, rtol=1e-4, atol=1e-4)


def _answer_all(generator, questions, threads: bool):
    results = [None] * len(questions)

    def run(i):
        session = generator.start_session(SYSTEM)
        end = generator.generate(session, questions[i], Mode.AUDIO_TEXT, SamplingConfig(temperature=0.0,
                                                                                          max_new_tokens=120))
        results[i] = end.ids

    if not threads:
        for i in range(len(questions)):
            run(i)
        return results
    workers = [threading.Thread(target=run, args=(i,)) for i in range(len(questions))]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    return results


@pytest.mark.parametrize("lanes", [1, 2])
def test_concurrent_answers_share_steps_and_stay_the_same(default_generator, lanes):
    """Four answers on four threads with batching on (one lane, or two batches at once): same greedy tokens as one
    at a time, and the steps were actually shared (mean batch size > 1)."""
    questions = [UserTurn(audio=list(range(k, 5000, 97 + k))) for k in (1, 2, 3, 4)]
    gen = Generator(default_generator.model, default_generator.template)
    alone = _answer_all(gen, questions, threads=False)
    assert gen.enable_batching(window_s=0.05, lanes=lanes)
    together = _answer_all(gen, questions, threads=True)
    assert together == alone
    stats = gen.batcher.stats
    assert stats.max_batch >= 2 and stats.requests > stats.steps


@pytest.mark.parametrize("lanes", [1, 2])
def test_batcher_passes_errors_to_every_waiting_answer(tiny, monkeypatch, lanes):
    model, _ = tiny
    fast = FastForward(model)
    batcher = StepBatcher(fast, window_s=0.5, lanes=lanes)
    caches = [_cache(model) for _ in range(3)]
    for c in caches:
        fast.forward(c, [1, 2, 3])

    def boom(*args, **kwargs):
        raise RuntimeError("kaput")

    monkeypatch.setattr(fast, "forward_batch", boom)
    monkeypatch.setattr(fast, "forward", boom)
    errors = []

    def one(cache):
        def events():
            try:
                batcher.step(cache, 5)
            except RuntimeError as exc:
                errors.append(str(exc))
            yield None

        list(batcher.track(events()))

    threads = [threading.Thread(target=one, args=(c,)) for c in caches]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads)
    assert errors == ["kaput"] * 3
    assert batcher._running == 0 and not batcher._pending and batcher._busy == 0 and batcher._in_flight == 0


def test_attention_kernel_choice(monkeypatch):
    """SDPA on the CPU; flash-attn 2 only on a CUDA device with the flash_attn package (the `gpu` extra)."""
    import importlib.util

    from npc_server.backbone import model as model_module

    assert model_module.attention_implementation("cpu") == "sdpa"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else real(name, *a))
    assert model_module.attention_implementation("cuda") == "flash_attention_2"
    assert model_module.attention_implementation("cpu") == "sdpa"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))
    assert model_module.attention_implementation("cuda") == "sdpa"
    built = model_module.build_model(preset("tiny", n_text=512))
    assert built.config._attn_implementation == "sdpa"
