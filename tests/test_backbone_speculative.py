"""Speculative audio decoding: greedy equals plain decoding, sampled tokens keep the backbone's distribution
(chi-square against the exact distribution; wrong acceptance rules are caught), acceptance statistics, sessions."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import re
import shutil
from collections import Counter

import pytest
import torch

from npc_server.backbone.generator import (
    AudioChunk,
    Generator,
    SamplingConfig,
    TextDelta,
    TurnEnd,
    token_probs,
)
from npc_server.backbone.model import build_model, load_backbone, preset, save_backbone
from npc_server.backbone.speculative import DraftState, SpeculativeDecoder
from npc_server.backbone.template import BlockGrammar, ChatTemplate, Mode, SystemPrompt, UserTurn
from npc_server.backbone.text_tokenizer import TextTokenizer

TEXTS = [
    "Welcome to The Sleepy Otter, traveller! A room costs ten gold a night.",
    "The smithy is down by the river; the market square is in the middle of town.",
]
SYSTEM = SystemPrompt("innkeeper", "You are Greta, the innkeeper of The Sleepy Otter.")
TURNS = [
    (UserTurn(audio=list(range(0, 1200, 37)), text="How much is a room?"), Mode.AUDIO_TEXT),
    (UserTurn(audio=list(range(1024, 2000, 29))), Mode.AUDIO),
    (UserTurn(text="And where is the smithy?"), Mode.AUDIO_TEXT),
]
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=120)


@pytest.fixture(scope="module")
def template() -> ChatTemplate:
    tok = TextTokenizer.train(TEXTS * 5, vocab_size=320)
    return ChatTemplate(preset("tiny", n_text=512).layout, tok)


def random_backbone(seed: int, std: float = 0.1, norm_scale: float = 1.0, config=None):
    """A tiny backbone whose output depends on its weights (the default 0.02 init mostly echoes its input)."""
    torch.manual_seed(seed)
    model = build_model(config or preset("tiny", n_text=512)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and std is not None:
                p.normal_(0, std)
        model.model.norm.weight.mul_(norm_scale)  # larger logits: a peaked distribution
    return model


def perturbed(model, noise: float, seed: int = 5):
    """A draft that mostly agrees with `model`: the same weights plus noise."""
    draft = copy.deepcopy(model)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            if p.dim() >= 2:
                p.add_(torch.randn_like(p) * noise)
    return draft


@pytest.fixture(scope="module")
def target():
    return random_backbone(0)


def _run(gen: Generator, session, user, mode, sampling=GREEDY, should_stop=None, speculative=True):
    events = list(gen.respond(session, user, mode, sampling, should_stop=should_stop, speculative=speculative))
    stream = [(type(e).__name__, e.text if isinstance(e, TextDelta) else e.codes.tolist()) for e in events
              if isinstance(e, (TextDelta, AudioChunk))]
    end = events[-1]
    assert isinstance(end, TurnEnd)
    return end, stream


def _stop_after(n: int):
    calls = itertools.count(1)
    return lambda: next(calls) >= n


# --- greedy: the very same tokens -------------------------------------------------------------------------------
@pytest.mark.parametrize("max_context", [None, 260])  # 260: older turns are evicted and the caches rebuilt
def test_greedy_speculative_equals_plain_over_a_session(template, target, max_context):
    plain = Generator(target, template, max_context=max_context)
    # with eviction also the early stop of proposals on low draft confidence
    spec = Generator(target, template, max_context=max_context, draft=perturbed(target, 0.01), draft_k=4,
                     draft_min_prob=0.0 if max_context is None else 0.5)
    s_plain, s_spec = plain.start_session(SYSTEM), spec.start_session(SYSTEM)
    proposed = accepted = 0
    passes = []
    evicted = False
    for round_ in range(2):
        for n, (user, mode) in enumerate(TURNS):
            # the second turn of each pass is stopped by the caller mid-answer (inside a speculative round)
            stop = (lambda: _stop_after(37)) if n == 1 else (lambda: None)
            a, stream_a = _run(plain, s_plain, user, mode, should_stop=stop())
            b, stream_b = _run(spec, s_spec, user, mode, should_stop=stop())
            assert b.ids == a.ids and b.text == a.text and torch.equal(b.audio, a.audio)
            assert b.stop_reason == a.stop_reason and stream_b == stream_a
            assert s_spec.ids == s_plain.ids and s_spec.pending == s_plain.pending
            assert s_spec.cached_tokens == s_plain.cached_tokens == len(s_plain.ids)
            assert b.stats.target_forwards <= a.stats.target_forwards
            passes += [a.stats.target_forwards, b.stats.target_forwards]
            # plain decoding: one pass per sampled token after the first (sampled from the prefill)
            assert a.stats.proposed == 0 and a.stats.target_forwards == sampled(a, GREEDY, 37) - 1
            # speculative: each pass emits the accepted proposals + 1 (fewer if the caller stopped mid-round)
            assert sampled(b, GREEDY, 37) <= 1 + b.stats.target_forwards + b.stats.accepted
            if b.stop_reason != "stopped":
                assert sampled(b, GREEDY, 37) == 1 + b.stats.target_forwards + b.stats.accepted
            proposed += b.stats.proposed
            accepted += b.stats.accepted
            evicted |= len(s_plain.segments) < 1 + round_ * len(TURNS) + n + 1
    assert max_context is None or evicted
    assert 0.2 < accepted / proposed < 0.95  # both the accepting and the rejecting paths ran
    assert sum(passes[1::2]) < 0.8 * sum(passes[::2])


def sampled(end: TurnEnd, sampling: SamplingConfig, stop_after: int | None = None) -> int:
    """Sampled tokens of an answer (a truncated answer also has its closing tokens in `ids`)."""
    return {"end": len(end.ids), "max_tokens": sampling.max_new_tokens, "stopped": stop_after}[end.stop_reason]


@pytest.mark.parametrize("max_context", [None, 300])
def test_greedy_identical_draft_accepts_everything_and_counts_right(template, target, max_context):
    """draft == backbone: every proposal is accepted, also after older turns were evicted (the draft re-syncs);
    each round emits its accepted tokens plus one."""
    spec = Generator(target, template, draft=copy.deepcopy(target), draft_k=3, max_context=max_context)
    session = spec.start_session(SYSTEM)
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=120)
    for user, mode in TURNS + TURNS:
        end, _ = _run(spec, session, user, mode, sampling=sampling)
        st = end.stats
        assert st.rounds > 0 and st.proposed == st.accepted and st.acceptance_rate == 1.0
        assert st.proposed <= 3 * st.rounds
        # 1 token sampled after the prefill, then each pass: 1 + the accepted proposals
        assert sampled(end, sampling) == 1 + st.target_forwards + st.accepted
        assert st.draft_forwards == st.proposed  # one pass per proposal (the first one also catches up)
    assert max_context is None or len(session.segments) < 1 + 2 * len(TURNS)
    # sampled (temperature 1) with an identical draft: p == q up to float rounding, so (practically) all accepted
    end, _ = _run(spec, spec.start_session(SYSTEM), *TURNS[1], sampling=SamplingConfig(temperature=1.0, seed=3, max_new_tokens=120))
    assert end.stats.proposed > 10 and end.stats.accepted == end.stats.proposed


def test_low_draft_confidence_ends_the_round(template, target):
    """min_prob: after a proposal the draft gave less than min_prob, the round goes to verification at once."""
    spec = Generator(target, template, draft=copy.deepcopy(target), draft_k=4, draft_min_prob=0.99)
    plain = Generator(target, template)
    user, mode = TURNS[1]
    a, _ = _run(plain, plain.start_session(SYSTEM), user, mode)
    b, _ = _run(spec, spec.start_session(SYSTEM), user, mode)
    assert b.ids == a.ids
    assert b.stats.rounds > 5 and b.stats.proposed == b.stats.rounds == b.stats.draft_forwards


def test_draft_follows_interruption_crop_and_prefix_forks(template, target):
    """The draft's cache follows what the session does to the backbone cache (lazy re-sync): with an identical
    draft acceptance stays 100% after a crop like `Engine.interrupted`, and a fork carries its own draft cache."""
    spec = Generator(target, template, draft=copy.deepcopy(target), draft_k=4)
    plain = Generator(target, template)
    base = spec.start_session(SYSTEM)
    assert isinstance(base.draft, DraftState) and base.draft.ids == base.ids
    s_spec, s_plain = base.fork(), plain.start_session(SYSTEM)
    assert s_spec.draft is not base.draft and s_spec.draft.cache is not base.draft.cache
    for session, gen in ((s_spec, spec), (s_plain, plain)):
        user, mode = TURNS[0]
        _run(gen, session, user, mode)
        # interruption: cut the answer back to its prompt plus a few body tokens, the way the engine does
        prompt_len = len(template.user(user).ids) + len(template.assistant_prefix(mode).ids)
        keep = len(session.ids) - len(session.segments[-1]) + prompt_len + 5
        session.rewind(keep)
        gen.prefill(session, [template.sp("<|text_end|>"), template.sp("<|end|>")], new_segment=False)
    for user, mode in TURNS[1:]:
        a, _ = _run(plain, s_plain, user, mode)
        b, _ = _run(spec, s_spec, user, mode)
        assert b.ids == a.ids and b.stats.acceptance_rate == 1.0
    assert base.draft.ids == base.ids  # the forked-from prompt session was not touched


def test_engine_uses_the_draft_bundle_and_answers_like_without_it(tiny_model_dir, question_wav, tmp_path):
    from npc_server.audio import load_audio
    from npc_server.engine import Engine, EngineAudio, EngineDone
    from npc_server.paths import DEFAULT_PERSONAS_DIR
    from npc_server.personas import parse_persona

    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "m")
    shutil.copytree(model_dir / "backbone", model_dir / "draft")  # an identical draft: acceptance must be 100%
    (model_dir / "draft" / "speculative.json").write_text('{"k": 3, "min_prob": 0.25}')
    with_draft = Engine.from_pretrained(model_dir)
    without = Engine.from_pretrained(model_dir, draft=False)
    assert without.generator.speculative is None
    assert (with_draft.generator.speculative.k, with_draft.generator.speculative.min_prob) == (3, 0.25)
    path = DEFAULT_PERSONAS_DIR / "innkeeper.yaml"
    persona = parse_persona(re.sub(r"max_answer_seconds: \d+", "max_answer_seconds: 2", path.read_text()), str(path))
    wav, _ = load_audio(question_wav, target_sr=16000)
    controls = with_draft.system_prompt(persona).controls
    answers = []
    for engine in (with_draft, without):
        state = engine.new_state(persona)
        out = []
        # first answer interrupted after its first audio chunk, then a follow-up in the same conversation
        events = engine.answer(state, persona, controls, audio=wav)
        for ev in events:
            if isinstance(ev, EngineAudio):
                break
        events.close()
        engine.interrupted(state, spoken_seconds=0.1)
        out.append(state.turns[-1])
        done = [e for e in engine.answer(state, persona, controls, audio=wav) if isinstance(e, EngineDone)][-1]
        out.append(done.spoken_text)
        out.append(list(state.session.ids))
        answers.append(out)
        if engine is with_draft:
            assert state.memory_bytes() > 0 and state.session.draft.cache.get_seq_length() > 0
    assert answers[0] == answers[1]


# --- sampling: the backbone's distribution, exactly ---------------------------------------------------------------
class AlwaysAccept(SpeculativeDecoder):
    """Wrong: accepts every proposal (samples from the draft)."""

    @staticmethod
    def accept(p: float, q: float, u: float) -> bool:
        return True


class ResampleFromTarget(SpeculativeDecoder):
    """Wrong (a classic slip): after a rejection, draws from p instead of normalize(max(0, p - q))."""

    @staticmethod
    def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return p


@pytest.fixture(scope="module")
def peaked():
    """A backbone with peaked next-token distributions and a draft that overlaps it partly (acceptance ~60%):
    where p and q are disjoint or equal, some wrong rules give the right answer by luck."""
    model = random_backbone(0, std=0.1, norm_scale=8.0)
    return model, perturbed(model, 0.005)


USER = UserTurn(text="How much is a room?")


def exact_pairs(gen: Generator, sampling: SamplingConfig, cover: float = 0.98) -> dict[tuple[int, int], float]:
    """P(first two audio tokens of an audio-mode answer), computed from the backbone's logits."""
    t = gen.template
    session = gen.start_session(SYSTEM)
    start = t.sp("<|audio_start|>")
    logits = gen.prefill(session, t.user(USER).ids + t.assistant_prefix(Mode.AUDIO).ids + [start])[-1]
    grammar = BlockGrammar(t.layout, Mode.AUDIO, text_vocab=t.text.vocab_size)
    grammar.advance(start)
    p1 = token_probs(logits, grammar, sampling)
    out = {}
    mass = 0.0
    for a in torch.argsort(p1, descending=True).tolist():
        if mass >= cover or p1[a] == 0:
            break
        mass += float(p1[a])
        g = copy.copy(grammar)
        g.advance(a)
        p2 = token_probs(gen._forward(session.fork(), [a])[-1], g, sampling)
        for b in torch.nonzero(p2).flatten().tolist():
            out[(a, b)] = float(p1[a] * p2[b])
    return out


def sample_pairs(gen: Generator, sampling: SamplingConfig, n: int, speculative: bool = True) -> Counter:
    base = gen.start_session(SYSTEM)
    counts: Counter = Counter()
    for i in range(n):
        end, _ = _run(gen, base.fork(), USER, Mode.AUDIO, dataclasses.replace(sampling, seed=i),
                      should_stop=_stop_after(3), speculative=speculative)  # stops inside the first round
        counts[(end.ids[1], end.ids[2])] += 1
    return counts


def chi_square_pvalue(counts: Counter, probs: dict[tuple[int, int], float]) -> float:
    """Goodness of fit of observed pairs to `probs`; cells with an expected count < 5 are pooled."""
    n = sum(counts.values())
    cells = [k for k, p in probs.items() if p * n >= 5]
    expected = [probs[k] * n for k in cells]
    observed = [counts.get(k, 0) for k in cells]
    expected.append(n - sum(expected))
    observed.append(n - sum(observed))
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected) if e > 0)
    dof = len(cells)
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


SAMPLINGS = {
    "temperature 1": SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=6),
    "top-k, top-p, audio temperature": SamplingConfig(temperature=0.5, audio_temperature=1.3, top_k=12, top_p=0.9,
                                                      max_new_tokens=6),
}


@pytest.mark.parametrize("name", list(SAMPLINGS))
def test_sampled_audio_tokens_follow_the_backbone_distribution(template, peaked, name):
    sampling = SAMPLINGS[name]
    model, draft = peaked
    # the second case also stops proposing after an unlikely draft token (must not change the distribution)
    spec = Generator(model, template, draft=draft, draft_k=4, draft_min_prob=0.0 if name == "temperature 1" else 0.4)
    probs = exact_pairs(spec, sampling)
    counts = sample_pairs(spec, sampling, n=400)
    assert chi_square_pvalue(counts, probs) > 1e-3
    if name == "temperature 1":  # the reference itself: the plain generator passes the same check
        assert chi_square_pvalue(sample_pairs(spec, sampling, n=300, speculative=False), probs) > 1e-3


@pytest.mark.parametrize("wrong", [AlwaysAccept, ResampleFromTarget])
def test_wrong_acceptance_rules_are_detected(template, peaked, wrong):
    sampling = SAMPLINGS["temperature 1"]
    model, draft = peaked
    gen = Generator(model, template, draft=wrong(draft, k=4))
    assert chi_square_pvalue(sample_pairs(gen, sampling, n=400), exact_pairs(gen, sampling)) < 1e-3


def test_draft_must_share_the_vocabulary(template, target, tmp_path):
    other = build_model(preset("tiny", n_text=1024))
    with pytest.raises(ValueError, match="vocabulary"):
        Generator(target, template, draft=other)
    cfg = preset("draft", n_text=512)
    save_backbone(build_model(cfg), cfg, tmp_path / "d")
    model, loaded = load_backbone(tmp_path / "d")
    assert loaded.preset == "draft" and model.config.vocab_size == target.config.vocab_size


# --- training the draft -------------------------------------------------------------------------------------------
def test_train_draft_command_distills_and_exports_a_usable_draft(tmp_path):
    import json

    from npc_server.backbone.text_tokenizer import corpus_texts
    from npc_server.cli import main as cli
    from npc_server.training.lm_common import save_bundle
    from npc_server.training.lm_synthetic import synthetic_corpus

    corpus = synthetic_corpus(tmp_path / "corpus", n_dialogues=20, seed=2)
    tok = TextTokenizer.train(corpus_texts(corpus), vocab_size=400)
    cfg = preset("tiny", n_text=512)
    save_bundle(random_backbone(0), cfg, tok, tmp_path / "backbone")
    args = ["train", "draft", "--corpus", str(corpus), "--synthetic-tokens", "--init-target", str(tmp_path / "backbone"),
            "--preset", "tiny", "--out", str(tmp_path / "run"), "--export", str(tmp_path / "models" / "draft"),
            "--steps", "3", "--batch-size", "2", "--threads", "1", "--log-every", "1", "--precision", "fp32",
            "--max-len", "400"]
    assert cli(args) == 0
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(r["kl_audio"] >= 0 and r["audio_loss"] > 0 for r in log)
    gen = Generator.from_pretrained(tmp_path / "backbone", draft=tmp_path / "models" / "draft")
    end = gen.generate(gen.start_session(SYSTEM), USER, mode=Mode.AUDIO,
                       sampling=SamplingConfig(temperature=1.0, seed=0, max_new_tokens=40))
    assert end.stats.rounds > 0 and end.stats.proposed > 0


def test_bench_reports_the_draft(tiny_model_dir, tmp_path, capsys):
    import json

    from npc_server.bench import main
    from npc_server.tiny import capped_personas

    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "m")
    shutil.copytree(model_dir / "backbone", model_dir / "draft")
    out = tmp_path / "bench.json"
    assert main(["--model-dir", str(model_dir), "--personas", str(capped_personas(tmp_path / "personas")),
                 "--repeats", "1", "--concurrency", "1", "--no-cascade", "--json", str(out)]) == 0
    sp = json.loads(out.read_text())["speculative"]
    assert sp["acceptance_rate"] == 1.0 and sp["greedy_identical"] and sp["answers"] == 6
    assert sp["backbone_passes_speculative"] < sp["backbone_passes_plain"] and sp["speedup"] > 0
    assert "decode tokens/s without / with draft" in capsys.readouterr().out
