"""Stateful streaming generator for the backbone: sampling, constrained text/audio blocks, per-session KV cache."""

from __future__ import annotations

import copy
import inspect
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaForCausalLM

from npc_server.backbone.fast import FastForward
from npc_server.backbone.template import (
    AssistantTurn,
    BlockGrammar,
    ChatTemplate,
    Mode,
    SystemPrompt,
    UserTurn,
)


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is picked. temperature 0 means greedy (top_k/top_p ignored)."""

    temperature: float = 0.7
    top_k: int = 50  # 0 = no top-k filter
    top_p: float = 0.95  # 1.0 = no nucleus filter
    max_new_tokens: int = 768
    seed: int | None = None  # None = nondeterministic
    audio_temperature: float | None = None  # temperature for audio tokens (None = same as text)

    def __post_init__(self) -> None:
        if self.temperature < 0 or (self.audio_temperature is not None and self.audio_temperature < 0):
            raise ValueError("temperature must be >= 0")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")


GREEDY = SamplingConfig(temperature=0.0)


@dataclass
class TextDelta:
    """New subtitle text since the previous delta."""

    text: str


@dataclass
class AudioChunk:
    """Semantic codes (0..4095) for the vocoder: one finished audio span of the answer, or, with `early_audio`, the
    first codes of the first span and then the rest of that span."""

    codes: torch.Tensor


def _unsent(span: list[int], sent: int) -> list[AudioChunk]:
    """The codes of a finished audio span not yet yielded (the first `sent` left early), as zero or one chunk."""
    return [AudioChunk(torch.tensor(span[sent:], dtype=torch.long))] if len(span) > sent else []


@dataclass
class DecodeStats:
    """Work done while decoding one answer (prefill excluded). Without a draft model only `target_forwards`
    moves; with speculative decoding `proposed`/`accepted` count the draft's audio tokens."""

    target_forwards: int = 0  # forward passes of the backbone while decoding
    draft_forwards: int = 0  # forward passes of the draft model (incl. catching up with the conversation)
    rounds: int = 0  # speculative rounds (one verifying backbone pass each)
    proposed: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens the backbone accepted

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else float("nan")

    def to_dict(self) -> dict:
        return {"target_forwards": self.target_forwards, "draft_forwards": self.draft_forwards,
                "rounds": self.rounds, "proposed": self.proposed, "accepted": self.accepted,
                "acceptance_rate": self.acceptance_rate}


@dataclass
class TurnEnd:
    text: str
    audio: torch.Tensor  # all semantic codes of the answer
    ids: list[int]  # generated body ids (after <|assistant|> <|mode|>)
    stop_reason: str  # "end" | "max_tokens" | "stopped"
    prefill_tokens: int
    generated_tokens: int
    prefill_s: float
    decode_s: float
    stats: DecodeStats = field(default_factory=DecodeStats)


Event = TextDelta | AudioChunk | TurnEnd

SPECULATIVE_FILE = "speculative.json"  # in a draft bundle: its tuned k and min_prob

# transformers >= 5.2x renamed the cache argument/output `past_key_values` -> `cache`.
_FORWARD_ARGS = inspect.signature(LlamaForCausalLM.forward).parameters
_CACHE_ARG = "cache" if "cache" in _FORWARD_ARGS else "past_key_values"
_KEEP_ARG = next((a for a in ("logits_to_keep", "num_logits_to_keep") if a in _FORWARD_ARGS), None)


@torch.inference_mode()
def forward_tokens(model: torch.nn.Module, cache: DynamicCache, ids: list[int], device: torch.device,
                   last_only: bool = False, fast: FastForward | None = None,
                   rows: list[tuple[int, int]] | None = None) -> tuple[torch.Tensor, DynamicCache]:
    """Feed `ids` through `model` on top of `cache`; returns (logits [len(ids), vocab] fp32, or [1, vocab] for the
    last position only when `last_only`, skipping the LM head for the rest), and the updated cache. With `fast`
    (a `FastForward` of `model`) the lean CPU path computes the same thing; there `rows` limits the LM head to
    those id ranges (the other logits are -inf; the transformers path ignores `rows`)."""
    if not ids:
        raise ValueError("nothing to prefill")
    if fast is not None:
        return fast.forward(cache, ids, last_only, rows), cache
    x = torch.tensor([ids], dtype=torch.long, device=device)
    kwargs = {_CACHE_ARG: cache}
    if last_only and _KEEP_ARG:
        kwargs[_KEEP_ARG] = 1
    out = model(input_ids=x, use_cache=True, **kwargs)
    logits = out.logits[0, -1:] if last_only else out.logits[0]
    return logits.float(), getattr(out, _CACHE_ARG)


def sampling_temperature(grammar: BlockGrammar, sampling: SamplingConfig) -> float:
    """The temperature of the next token: `audio_temperature` where audio tokens are allowed, else `temperature`."""
    if sampling.audio_temperature is not None and "semantic" in grammar.allowed_groups():
        return sampling.audio_temperature
    return sampling.temperature


def _filtered_probs(logits: torch.Tensor, temperature: float, sampling: SamplingConfig, allowed: int) -> torch.Tensor:
    """Masked logits -> temperature, top-k, top-p -> probabilities (temperature > 0)."""
    logits = logits / temperature
    if sampling.top_k and sampling.top_k < allowed:
        kth = torch.topk(logits, sampling.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if sampling.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_p, dim=-1)
        drop = cum - sorted_p > sampling.top_p  # keep the smallest prefix reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
        probs = probs / probs.sum()
    return probs


def token_probs(logits: torch.Tensor, grammar: BlockGrammar, sampling: SamplingConfig) -> torch.Tensor:
    """The distribution the generator samples the next token from: grammar mask, temperature (audio_temperature in
    audio spans), top-k, top-p. Greedy (temperature 0) and single-choice states give a one-hot vector."""
    mask = grammar.mask().to(logits.device)
    logits = logits.masked_fill(~mask, float("-inf"))
    allowed = int(mask.sum())
    temperature = sampling_temperature(grammar, sampling)
    if allowed == 1 or temperature == 0.0:
        index = int(mask.nonzero()[0]) if allowed == 1 else int(torch.argmax(logits))
        return torch.zeros_like(logits).index_fill_(0, torch.tensor([index], device=logits.device), 1.0)
    return _filtered_probs(logits, temperature, sampling, allowed)


@dataclass
class Session:
    """One conversation: its KV cache and the token segments it holds (system, then one per turn).

    `pending` are tokens that belong to the conversation but are not yet in the cache (the last sampled
    token of an answer); they are prefilled together with the next turn. `draft` is the draft model's own state
    for speculative decoding (`speculative.DraftState`); it follows `ids` lazily, so anything that rewrites the
    cache (eviction, interruption) needs no extra care."""

    system: SystemPrompt
    cache: DynamicCache
    segments: list[list[int]] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)
    draft: object | None = None

    def fork(self) -> Session:
        """An independent copy of this conversation (own KV caches), e.g. of a prefilled system prompt."""
        return Session(system=self.system, cache=copy.deepcopy(self.cache),
                       segments=[list(seg) for seg in self.segments], pending=list(self.pending),
                       draft=copy.deepcopy(self.draft))

    @property
    def ids(self) -> list[int]:
        return [t for seg in self.segments for t in seg]

    @property
    def cached_tokens(self) -> int:
        return self.cache.get_seq_length()

    @property
    def turns(self) -> int:
        return max(0, len(self.segments) - 1)

    def rewind(self, keep: int) -> None:
        """Keep the first `keep` tokens of the conversation (e.g. cut an interrupted answer back to its prompt):
        the cache and the segments end there and pending tokens are dropped; the next prefill continues from there
        (with new_segment=False it stays in the cut turn). The draft follows lazily."""
        if not 0 < keep <= len(self.ids):
            raise ValueError(f"keep must be in 1..{len(self.ids)}, got {keep}")
        remove = self.cache.get_seq_length() - keep
        if remove > 0:
            self.cache.crop(-remove)  # transformers >= 5: a negative count of tokens to drop
        segments, held = [], 0
        for seg in self.segments:
            if held >= keep:
                break
            segments.append(seg[: keep - held])
            held += len(segments[-1])
        self.segments = segments
        self.pending = []

    def memory_bytes(self) -> int:
        """KV-cache bytes of the conversation (the backbone's and, with speculative decoding, the draft's)."""
        return cache_bytes(self.cache) + cache_bytes(getattr(self.draft, "cache", None))


def cache_bytes(cache) -> int:
    """Bytes of the key and value tensors of a KV cache (a transformers cache or one with the same `layers`)."""
    total = 0
    for layer in getattr(cache, "layers", ()) or ():
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


class Generator:
    """Drives a backbone model (a `transformers` causal LM) with the chat template. Not thread-safe per session.

    With a `draft` (a small backbone with the same vocabulary, or a `speculative.SpeculativeDecoder`), audio spans
    are decoded speculatively: the draft proposes up to `draft_k` audio tokens, the backbone checks them in one
    pass, and the sampled tokens keep exactly the backbone's distribution (see backbone/speculative.py)."""

    def __init__(self, model: torch.nn.Module, template: ChatTemplate, max_context: int | None = None,
                 draft=None, draft_k: int = 2, draft_min_prob: float = 0.0, fast: bool = True):
        """`fast`: run inference through `FastForward` (same results, far less overhead on the CPU) when the model
        supports it; False keeps the plain transformers forward (the reference)."""
        self.model = model.eval()
        self.fast = FastForward(model) if fast and FastForward.supports(model) else None
        self.batcher = None  # a StepBatcher once `enable_batching()` is called
        self.template = template
        self.layout = template.layout
        cfg_max = getattr(model.config, "max_position_embeddings", 2048)
        self.max_context = min(max_context or cfg_max, cfg_max)
        self.device = next(model.parameters()).device
        self.speculative = None
        if draft is not None:
            from npc_server.backbone.speculative import SpeculativeDecoder

            self.speculative = draft if isinstance(draft, SpeculativeDecoder) else \
                SpeculativeDecoder(draft, draft_k, draft_min_prob, fast=fast)
            self.speculative.check_compatible(self)

    @classmethod
    def from_pretrained(cls, directory, dtype: torch.dtype = torch.float32, max_context: int | None = None,
                        draft=None, draft_k: int | None = None, draft_min_prob: float | None = None,
                        fast: bool = True, device: str | torch.device = "cpu") -> Generator:
        """Load a backbone bundle (model.safetensors + config.json + tokenizer.json), e.g. models/default/backbone,
        and optionally a draft bundle (same layout, e.g. models/default/draft) for speculative decoding. The draft's
        settings default to its `speculative.json` ({"k": .., "min_prob": ..}, written by benchmarks/speculative.py
        --save-best), else k=2, min_prob=0."""
        from npc_server.backbone.model import load_backbone
        from npc_server.backbone.text_tokenizer import TextTokenizer

        model, config = load_backbone(directory, dtype=dtype, device=device)
        draft_model = None
        if draft is not None:
            draft_model, draft_config = load_backbone(draft, dtype=dtype, device=device)
            if draft_config.n_text != config.n_text:
                raise ValueError(f"draft {draft} has {draft_config.n_text} text ids, the backbone {config.n_text}: "
                                 "a draft must share the backbone's vocabulary")
            settings_file = Path(draft) / SPECULATIVE_FILE
            settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
            draft_k = int(settings.get("k", 2)) if draft_k is None else draft_k
            draft_min_prob = float(settings.get("min_prob", 0.0)) if draft_min_prob is None else draft_min_prob
        template = ChatTemplate(config.layout, TextTokenizer.from_pretrained(directory))
        return cls(model, template, max_context, draft=draft_model, draft_k=draft_k or 2,
                   draft_min_prob=draft_min_prob or 0.0, fast=fast)

    def enable_batching(self, window_s: float = 0.003, lanes: int = 1) -> bool:
        """Let answers that run concurrently on different threads share one forward pass per decode step
        (backbone/batching.py), with up to `lanes` batches at once. Needs the fast path; returns whether
        batching is on."""
        from npc_server.backbone.batching import StepBatcher

        if self.fast is not None and self.batcher is None:
            self.batcher = StepBatcher(self.fast, window_s, lanes=lanes)
        return self.batcher is not None

    # --- sessions ---------------------------------------------------------------------------------------
    def start_session(self, system: SystemPrompt) -> Session:
        ids = self.template.system(system).ids
        session = Session(system=system, cache=DynamicCache(config=self.model.config))
        self._forward(session, ids, last_only=True)
        session.segments.append(list(ids))
        if self.speculative is not None:  # the draft's copy of the prompt travels with forks of this session
            self.speculative.sync(session)
        return session

    def _forward(self, session: Session, ids: list[int], last_only: bool = False,
                 rows: list[tuple[int, int]] | None = None) -> torch.Tensor:
        """Feed `ids` through the model on top of the session cache; returns logits [len(ids), vocab] (fp32), or
        [1, vocab] for the last position only when `last_only` (skips the LM head for the rest of a prefill).
        `rows` (`BlockGrammar.rows()`): on the fast path only these LM-head rows are computed, the rest are -inf."""
        logits, session.cache = forward_tokens(self.model, session.cache, ids, self.device, last_only, self.fast,
                                               rows)
        return logits

    @staticmethod
    def _drop_last(session: Session, n: int) -> None:
        """Remove the last `n` tokens of the current turn from the cache and the segments."""
        if n > 0:
            session.cache.crop(-n)  # transformers >= 5: a negative count of tokens to drop
            del session.segments[-1][-n:]

    def prefill(self, session: Session, ids: list[int], new_segment: bool = True,
                last_only: bool = False) -> torch.Tensor:
        """Add tokens to the conversation (after any pending ones); returns the logits of all fed positions.
        `new_segment` starts a new turn segment (the unit of context eviction); False extends the current turn,
        e.g. when an interrupted answer's remaining body is written back into its own turn."""
        feed = session.pending + list(ids)
        logits = self._forward(session, feed, last_only)
        if session.segments and session.pending:
            session.segments[-1].extend(session.pending)
        session.pending = []
        if new_segment or not session.segments:
            session.segments.append(list(ids))
        else:
            session.segments[-1].extend(ids)
        return logits

    def add_turn(self, session: Session, user: UserTurn, answer: AssistantTurn) -> None:
        """Add a finished turn (e.g. restored history) to the session without generating."""
        ids = self.template.user(user).ids + self.template.assistant(answer, target=False).ids
        self._ensure_room(session, len(ids), 0)
        body = ids[:-1]
        self.prefill(session, body, last_only=True)
        session.pending = ids[-1:]  # the closing <|end|>, fed with the next turn like a generated one

    def _ensure_room(self, session: Session, new_tokens: int, budget: int) -> None:
        """Drop the oldest turns (keeping the system prompt) and re-prefill when the context would overflow."""
        needed = session.cached_tokens + len(session.pending) + new_tokens + budget
        if needed <= self.max_context:
            return
        if len(session.segments[0]) + new_tokens + budget > self.max_context:
            raise ValueError(
                f"turn of {new_tokens} tokens + {budget} answer tokens does not fit the context of {self.max_context}"
            )
        if session.segments and session.pending:
            session.segments[-1].extend(session.pending)
            session.pending = []
        keep = session.segments[1:]
        while keep and len(session.segments[0]) + sum(map(len, keep)) + new_tokens + budget > self.max_context:
            keep = keep[1:]
        session.cache = DynamicCache(config=self.model.config)
        segments = [session.segments[0]] + keep
        self._forward(session, [t for seg in segments for t in seg], last_only=True)
        session.segments = segments

    # --- generation -------------------------------------------------------------------------------------
    def respond(
        self,
        session: Session,
        user: UserTurn,
        mode: Mode = Mode.AUDIO_TEXT,
        sampling: SamplingConfig = SamplingConfig(),
        should_stop: Callable[[], bool] | None = None,
        speculative: bool = True,
        early_audio: int = 0,
    ) -> Iterator[Event]:
        """Answer one user turn, streaming TextDelta / AudioChunk events and a final TurnEnd. Only the new turn
        is prefilled; the history comes from the session's KV cache. Audio spans are decoded speculatively when
        the generator has a draft model, unless `speculative` is False (same distribution either way). With
        batching enabled, the plain decode steps of answers running on other threads share forward passes.
        `early_audio` > 0: the first span's first `early_audio` codes leave as their own AudioChunk as soon as they
        exist (the vocoder can start the first audio before the span is complete); the tokens are unchanged."""
        events = self._respond(session, user, mode, sampling, should_stop, speculative, early_audio)
        return self.batcher.track(events) if self.batcher is not None else events

    def _respond(self, session: Session, user: UserTurn, mode: Mode, sampling: SamplingConfig,
                 should_stop: Callable[[], bool] | None, speculative: bool, early_audio: int) -> Iterator[Event]:
        mode = Mode(mode)
        t0 = time.perf_counter()
        prompt = self.template.user(user).ids + self.template.assistant_prefix(mode).ids
        self._ensure_room(session, len(prompt), sampling.max_new_tokens + 4)
        n_prefill = len(session.pending) + len(prompt)
        logits = self.prefill(session, prompt, last_only=True)[-1]
        t1 = time.perf_counter()

        rng = torch.Generator(device="cpu")
        rng.manual_seed(sampling.seed if sampling.seed is not None else torch.seed())
        grammar = BlockGrammar(self.layout, mode, text_vocab=self.template.text.vocab_size)
        drafter = self.speculative if speculative else None
        stats = DecodeStats()
        body: list[int] = []
        text_ids: list[int] = []
        text_sent = ""
        span: list[int] = []
        sent = 0  # codes of `span` already yielded (the early part of the first span)
        audio: list[int] = []
        stop_reason = "end"
        # `new`: tokens sampled in one step; all but the last are already in the cache (accepted draft tokens)
        new = [self._sample(logits, grammar, sampling, rng)]
        while True:
            stop = False
            for i, token in enumerate(new):
                grammar.advance(token)
                body.append(token)
                if self.layout.is_text(token):
                    text_ids.append(token)
                    text = self.template.text.decode(text_ids)
                    if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next bytes
                        text = text.rstrip("\ufffd")
                    if len(text) > len(text_sent) and text.startswith(text_sent):
                        yield TextDelta(text[len(text_sent):])
                        text_sent = text
                elif self.layout.is_semantic(token):
                    span.append(self.layout.to_semantic_codes([token])[0])
                    if early_audio and not audio and len(span) == early_audio:
                        yield AudioChunk(torch.tensor(span, dtype=torch.long))
                        sent = len(span)
                elif token == self.layout.special("<|audio_end|>") and span:
                    audio += span
                    yield from _unsent(span, sent)
                    span, sent = [], 0
                if grammar.finished or len(body) >= sampling.max_new_tokens or (
                        should_stop is not None and should_stop()):
                    # the cache must end right before `token`: drop it and any accepted tokens after it
                    self._drop_last(session, len(new) - 1 - i)
                    stop = True
                    break
            if stop:
                break
            budget = sampling.max_new_tokens - len(body)  # tokens this answer may still produce
            if drafter is not None and budget >= 2 and drafter.wants(grammar):
                new = drafter.round(self, session, token, grammar, sampling, rng, budget, stats)
            else:
                if self.batcher is not None:
                    logits = self.batcher.step(session.cache, token, grammar.rows())[-1]
                else:
                    logits = self._forward(session, [token], last_only=True, rows=grammar.rows())[-1]
                session.segments[-1].append(token)
                stats.target_forwards += 1
                new = [self._sample(logits, grammar, sampling, rng)]
        if grammar.finished:
            session.pending = [token]
        else:
            stop_reason = "max_tokens" if len(body) >= sampling.max_new_tokens else "stopped"
            # close the answer so the conversation stays well-formed for the next turn
            closing = self._closing_tokens(grammar)
            body += closing
            if span:
                audio += span
                yield from _unsent(span, sent)
            self._forward(session, [token] + closing[:-1], last_only=True)
            session.segments[-1] += [token] + closing[:-1]
            session.pending = closing[-1:]
        t2 = time.perf_counter()
        final_text = self.template.text.decode(text_ids)
        if len(final_text) > len(text_sent) and final_text.startswith(text_sent):
            yield TextDelta(final_text[len(text_sent):])
        yield TurnEnd(
            text=final_text,
            audio=torch.tensor(audio, dtype=torch.long),
            ids=body,
            stop_reason=stop_reason,
            prefill_tokens=n_prefill,
            generated_tokens=len(body),
            prefill_s=t1 - t0,
            decode_s=t2 - t1,
            stats=stats,
        )

    def generate(self, session: Session, user: UserTurn, mode: Mode = Mode.AUDIO_TEXT,
                 sampling: SamplingConfig = SamplingConfig(), speculative: bool = True) -> TurnEnd:
        """Non-streaming convenience wrapper around `respond`."""
        end = None
        for event in self.respond(session, user, mode, sampling, speculative=speculative):
            if isinstance(event, TurnEnd):
                end = event
        assert end is not None
        return end

    def _closing_tokens(self, grammar: BlockGrammar) -> list[int]:
        """Shortest well-formed ending of a truncated answer (closes an open span, ends text, ends the turn)."""
        sp = self.layout.special
        order = [sp("<|audio_end|>"), sp("<|text_end|>"), sp("<|end|>"), sp("<|audio_start|>")]
        out = []
        while not grammar.finished:
            token = next(t for t in order if grammar.allows(t))
            grammar.advance(token)
            out.append(token)
        return out

    def _sample(self, logits: torch.Tensor, grammar: BlockGrammar, sampling: SamplingConfig,
                rng: torch.Generator) -> int:
        """Draw the next token from `token_probs(logits, grammar, sampling)` (shortcuts for one-hot cases)."""
        mask = grammar.mask().to(logits.device)
        logits = logits.masked_fill(~mask, float("-inf"))
        allowed = int(mask.sum())
        if allowed == 1:
            return int(mask.nonzero()[0])
        temperature = sampling_temperature(grammar, sampling)
        if temperature == 0.0:
            return int(torch.argmax(logits))
        probs = _filtered_probs(logits, temperature, sampling, allowed)
        return int(torch.multinomial(probs.cpu(), 1, generator=rng))
