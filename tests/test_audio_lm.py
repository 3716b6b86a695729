"""Backbone v2 on a tiny random Gemma 3: extended vocabulary, LoRA, cut head, checkpoints, thinker session,
the lean (int8) forward against the transformers forward, and the hearing stage's mechanics."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from npc_server.backbone.audio_lm import AudioLM, AudioLMConfig
from npc_server.backbone.lean import LeanLM
from npc_server.backbone.template_v2 import IGNORE, HearingFormat
from npc_server.backbone.thinker import DecodeOptions, ThinkerSession, decode
from npc_server.backbone.vocab import N_AUDIO

N_TEXT = 300


def tiny_body(seed: int = 0):
    from transformers import Gemma3TextConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextModel

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=N_TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=8,
                           layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                           max_position_embeddings=512, query_pre_attn_scalar=16)
    body = Gemma3TextModel(cfg).eval()
    with torch.no_grad():
        for name, p in body.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.1)
    return body


def tiny_model(seed: int = 0, lora: bool = True) -> AudioLM:
    cfg = AudioLMConfig(base="tiny", n_text=N_TEXT, hidden=32, lora_rank=4 if lora else 0)
    model = AudioLM(cfg, tiny_body(seed), head_text_ids=torch.arange(0, 120))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_b" in n:
                p.normal_(0, 0.05)  # non-zero adapters, as after training
    return model.eval()


class TinyTextTokenizer:
    """Characters -> ids 10..; enough of the transformers tokenizer interface for the templates."""

    bos_token_id, eos_token_id, pad_token_id = 2, 1, 0

    def encode(self, text, add_special_tokens=False):
        return [10 + (ord(c) % 100) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i - 10 + 32) for i in ids if i >= 10)


def test_vocabulary_layout_and_new_rows():
    model = tiny_model()
    layout = model.cfg.layout
    assert layout.n_text == N_TEXT and layout.size == layout.audio_offset + N_AUDIO
    assert model.new_embed.num_embeddings == layout.size - N_TEXT
    # the head covers the chosen text ids and every special/audio id, and maps back
    assert model.head_ids.numel() == 120 + layout.size - N_TEXT
    aid = layout.audio_offset + 1024 + 7
    assert int(model.head_ids[model.head_index[aid]]) == aid
    assert int(model.head_index[200]) == -1  # a text id the answers do not need
    ids = torch.tensor([[5, N_TEXT, aid]])
    e = model.embed(ids)
    torch.testing.assert_close(e[0, 0], model.body.embed_tokens(torch.tensor(5)))
    torch.testing.assert_close(e[0, 2], model.new_embed.weight[aid - N_TEXT] * model.embed_scale)


def test_zero_lora_keeps_the_base_model():
    model = tiny_model(lora=False)
    base = tiny_body()
    ids = torch.randint(0, N_TEXT, (2, 12))
    with torch.no_grad():
        ours, _ = model(ids)
        ref = base(input_ids=ids).last_hidden_state
    torch.testing.assert_close(ours, ref)


def test_checkpoint_round_trip(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "bb", dtype=torch.float32)
    again = AudioLM.from_pretrained(tmp_path / "bb", body=tiny_body())
    ids = torch.tensor([[2, 7, N_TEXT + 3, model.cfg.layout.audio_offset + 5]])
    with torch.no_grad():
        torch.testing.assert_close(again.logits(again(ids)[0]), model.logits(model(ids)[0]))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "bb" / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert "head_ids" in names and all(n.startswith("new_embed") or "lora_" in n or n == "head_ids" for n in names)


def _sequence(model, n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    layout = model.cfg.layout
    return [rng.choice([rng.randrange(N_TEXT), rng.randrange(layout.audio_offset, layout.size)]) for _ in range(n)]


def test_lean_forward_equals_transformers():
    """fp32 lean forward == transformers forward (LoRA merged), past the sliding window, prefilled in pieces."""
    model = tiny_model()
    lean = LeanLM.from_audio_lm(model, quantize=False)
    ids = _sequence(model, 21)
    with torch.no_grad():
        ref = model.logits(model(torch.tensor([ids]))[0])[0]
    cache = lean.new_cache(batch=2, max_len=32)
    lean.prefill(cache, 1, ids[:9])
    hidden = lean.forward(torch.tensor([ids[9:]]), cache, [1])
    torch.testing.assert_close(lean.logits(hidden)[0], ref[9:], atol=1e-4, rtol=1e-4)
    assert int(cache.lengths[1]) == 21 and int(cache.lengths[0]) == 0


def test_lean_batched_decode_equals_one_by_one():
    model = tiny_model()
    lean = LeanLM.from_audio_lm(model, quantize=False)
    a, b = _sequence(model, 11, 1), _sequence(model, 5, 2)
    cache = lean.new_cache(batch=2, max_len=24)
    lean.prefill(cache, 0, a)
    lean.prefill(cache, 1, b)
    batched = lean.decode(cache, [0, 1], [17, 40])
    single = lean.prefill(lean.new_cache(batch=1, max_len=24), 0, b + [40])
    torch.testing.assert_close(batched[1], single, atol=1e-5, rtol=1e-5)
    cache.rewind(0, 11)  # drop the decoded token; the next decode rewrites that position
    again = lean.decode(cache, [0], [17])
    torch.testing.assert_close(again[0], batched[0], atol=1e-5, rtol=1e-5)


def test_int8_lean_forward_within_tolerance():
    """int8 weights (per output channel, weight-only): every position's hidden state within cosine 0.98 of the
    fp32 forward and the same top token at >= 80% of positions (a random model; real weights: docs/backbone_v2.md)."""
    from transformers import Gemma3TextConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextModel

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=N_TEXT, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=8,
                           layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                           max_position_embeddings=512, query_pre_attn_scalar=32)
    model = AudioLM(AudioLMConfig(base="tiny", n_text=N_TEXT, hidden=128, lora_rank=4), Gemma3TextModel(cfg).eval(),
                    torch.arange(120)).eval()
    fp32, int8 = LeanLM.from_audio_lm(model, quantize=False), LeanLM.from_audio_lm(model, quantize=True)
    ids = _sequence(model, 30, 3)
    a = fp32.forward(torch.tensor([ids]), fp32.new_cache(1, 32), [0])
    b = int8.forward(torch.tensor([ids]), int8.new_cache(1, 32), [0])
    assert torch.nn.functional.cosine_similarity(a[0], b[0], dim=-1).min() >= 0.98
    assert (fp32.logits(a)[0].argmax(-1) == int8.logits(b)[0].argmax(-1)).float().mean() >= 0.8
    cache = int8.new_cache(2, 40)  # the serving verbs on the int8 model; activations are quantised per call, so
    last = int8.prefill(cache, 1, ids)  # the last position alone differs slightly from it among 30 positions
    ref = int8.logits(b)[0, -1]
    assert torch.nn.functional.cosine_similarity(last, ref, dim=0) >= 0.99 and last.argmax() == ref.argmax()
    assert int8.decode(cache, [1], [ids[0]]).shape == (1, model.head_ids.numel())


def test_thinker_session_rewind_and_decode():
    model = tiny_model()
    ids = _sequence(model, 10)
    s = ThinkerSession(model)
    s.prefill(ids)
    first = s.next_logits()
    pieces = ThinkerSession(model)  # past the sliding window (8), in pieces == at once
    for k in range(0, 20, 3):
        pieces.prefill(ids[k : k + 3] if k < 10 else [7, 8, 9])
    whole = ThinkerSession(model)
    whole.prefill(pieces.ids)
    torch.testing.assert_close(pieces.next_logits(), whole.next_logits(), atol=1e-5, rtol=1e-5)
    s.prefill([3, 4, 5])
    s.rewind(10)
    torch.testing.assert_close(s.next_logits(), first, atol=1e-5, rtol=1e-5)
    allowed = [int(i) for i in model.head_ids[:50]]
    out = decode(s, allowed, {allowed[0]}, DecodeOptions(max_new_tokens=6))
    assert 1 <= len(out) <= 6 and all(t in allowed for t in out) and len(s) == 10 + len(out)
    with pytest.raises(ValueError):
        decode(s, [200], set())  # not an output row


def test_lean_session_has_the_thinker_session_verbs():
    """The serving session on the lean forward: prefill past its first capacity (it grows), rewind, fork; logits
    equal the transformers session's (fp32 lean)."""
    from npc_server.backbone.lean import LeanLM
    from npc_server.backbone.thinker import LeanSession

    model = tiny_model()
    ids = _sequence(model, 12)
    ref = ThinkerSession(model)
    ref.prefill(ids)
    lean = LeanSession(LeanLM.from_audio_lm(model, quantize=False), capacity=4)
    for k in range(0, 12, 5):
        lean.prefill(ids[k : k + 5])
    assert len(lean) == 12 and lean.cache.max_len >= 12
    torch.testing.assert_close(lean.next_logits(), ref.next_logits(), atol=1e-4, rtol=1e-4)
    twin = lean.fork()
    lean.prefill([3, 4])
    lean.rewind(12)
    torch.testing.assert_close(lean.next_logits(), twin.next_logits(), atol=1e-5, rtol=1e-5)
    twin.prefill([5])
    assert len(twin) == 13 and len(lean) == 12  # the fork has its own cache
    out = decode(lean, [int(i) for i in model.head_ids[:50]], set(), DecodeOptions(max_new_tokens=3))
    assert len(out) == 3 and len(lean) == 15


def test_conversations_step_together_as_they_would_alone():
    """`step_sessions`: one batched pass for several conversations (own caches, different lengths, one grows past
    its capacity) gives each the logits of its own `prefill([token])`; and through a StepBatcher, answers on two
    threads decode the same tokens as one after the other."""
    import threading

    from npc_server.backbone.batching import StepBatcher
    from npc_server.backbone.thinker import LeanSession, step_sessions

    model = tiny_model()
    lean = LeanLM.from_audio_lm(model, quantize=False)
    histories = [_sequence(model, 11, 1), _sequence(model, 4, 2), _sequence(model, 7, 3)]
    together = [LeanSession(lean, capacity=n) for n in (16, 4, 8)]  # the second is full: it grows
    alone = [LeanSession(lean, capacity=16) for _ in histories]
    for a, b, h in zip(together, alone, histories):
        a.prefill(h)
        b.prefill(h)
    for step in range(3):
        tokens = [17 + step, 40, 5 * step]
        assert len(step_sessions(together, tokens)) == 3
        for b, t in zip(alone, tokens):
            b.prefill([t])
        for a, b in zip(together, alone):
            torch.testing.assert_close(a.next_logits(), b.next_logits(), atol=1e-5, rtol=1e-5)
            assert a.ids == b.ids

    def greedy(session, batcher, n=6, start=None):
        out = []
        for k in range(n):
            if start is not None and k == 0:
                start.wait()  # inside next(): both answers count as running before either steps
            token = int(model.head_ids[int(session.next_logits().argmax())])
            out.append(token)
            if batcher is None:
                session.prefill([token])
            else:
                batcher.step(session, token)
            yield token

    def fresh(h):
        s = LeanSession(lean)
        s.prefill(h)
        return s

    expected = [list(greedy(fresh(h), None)) for h in histories[:2]]
    # a long window: the first to step waits for the other (it is running, see `start`), whatever the machine's load
    batcher = StepBatcher(None, window_s=2.0, forward_many=step_sessions)
    got = [None, None]
    sessions = [fresh(h) for h in histories[:2]]
    start = threading.Barrier(2)

    def run(i):
        got[i] = list(batcher.track(greedy(sessions[i], batcher, start=start)))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected
    assert batcher.stats.max_batch == 2  # the two answers did share steps


def test_hearing_examples_and_a_few_training_steps():
    from npc_server.training.lm_v2 import collate, lm_loss, train_loop

    model = tiny_model()
    fmt = HearingFormat(model.cfg.layout, TinyTextTokenizer())
    rng = np.random.default_rng(0)
    examples = []
    for k in range(12):
        codes = rng.integers(0, 1024, 20)
        ex = fmt.asr_example(fmt.audio(codes), "ab" * (k % 3 + 1))
        assert len(ex.ids) == len(ex.targets)
        assert ex.targets[-1] == IGNORE and ex.targets[-2] == fmt.end  # learns to stop
        examples.append(ex)
        examples.append(fmt.continue_example(fmt.audio(codes), 8))
    for ex in examples:  # every target is the next token, where there is one
        assert all(t == ex.ids[i + 1] for i, t in enumerate(ex.targets) if t != IGNORE)
    assert examples[1].targets.count(IGNORE) == 6 + 8 - 1 + 1  # prompt and the given audio carry no loss
    ids, tgt = collate(examples, list(range(4)), 64, 0)
    before, _ = lm_loss(model, ids, tgt)
    result = train_loop(model, examples, minutes=5, batch_tokens=256, lr=3e-3, precision="fp32", pad_id=0,
                        max_steps=12, progress=False)
    after, _ = lm_loss(model, ids, tgt)
    assert result.steps == 12 and float(after.detach()) < float(before.detach())
    assert not any(p.requires_grad for p in model.parameters())


def _tiny_examples(model: AudioLM) -> list:
    fmt = HearingFormat(model.cfg.layout, TinyTextTokenizer())
    rng = np.random.default_rng(0)
    return [fmt.asr_example(fmt.audio(rng.integers(0, 1024, 20)), "ab" * (k % 3 + 1)) for k in range(16)]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    from npc_server.training.lm_v2 import train_loop
    from npc_server.training.loop import teardown_distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    model = tiny_model()
    result = train_loop(model, _tiny_examples(model), minutes=5, batch_tokens=256, lr=3e-3, precision="fp32",
                        pad_id=0, max_steps=3, progress=False)
    torch.save({"steps": result.steps, **model.trained_state()}, f"{out}/rank{rank}.pt")
    teardown_distributed()


def test_training_under_ddp_keeps_ranks_in_sync(tmp_path):
    """Two processes (gloo), as under torchrun: the same steps, the same trained weights on both, and they moved."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert a.pop("steps") == b.pop("steps") == 3
    start = tiny_model().trained_state()
    for k in a:  # equal up to the summation order of the gradient all-reduce
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(a[k], start[k]) for k in a if "lora_" in k)


def test_head_grows_without_new_parameters():
    """Adding text rows (open vocabulary) keeps every existing row's logit; new rows are the tied embeddings."""
    model = tiny_model()
    with torch.no_grad():
        h = model(torch.tensor([[2, 7, N_TEXT + 3]]))[0][0]
        old_index = model.head_index.clone()
        before = model.logits(h)
        n_params = sum(p.numel() for p in model.parameters())
        model.set_head(torch.cat([model.head_text_ids(), torch.tensor([200, 250])]))
        after = model.logits(h)
    assert model.head_ids.numel() == before.shape[-1] + 2 and sum(p.numel() for p in model.parameters()) == n_params
    for tid in (5, 119, N_TEXT + 1, model.cfg.layout.audio_offset + 9):
        torch.testing.assert_close(after[:, model.head_index[tid]], before[:, old_index[tid]])
    torch.testing.assert_close(after[:, model.head_index[250]], h @ model.body.embed_tokens.weight[250])
    with pytest.raises(ValueError):
        model.set_head(torch.tensor([N_TEXT + 5]))


def test_continuing_a_backbone_adds_the_new_texts_ids_to_its_head(tmp_path):
    from npc_server.training.lm_v2 import start_model

    cfg = AudioLMConfig(base="tiny", n_text=N_TEXT, hidden=32, lora_rank=4)
    AudioLM(cfg, tiny_body(), head_text_ids=torch.arange(0, 20)).save_pretrained(tmp_path / "bb", dtype=torch.float32)
    tok = TinyTextTokenizer()
    again = start_model(tmp_path / "bb", cfg, ["ab"], tok, body=tiny_body())
    new_ids = tok.encode("ab")
    assert min(new_ids) >= 20 and all(int(again.head_index[i]) >= 0 for i in new_ids)
    assert set(range(20)) <= set(again.head_text_ids().tolist())
