"""Speculative decoding of answer audio spans: a small draft backbone proposes, the backbone verifies in one pass.

Inside an audio span (up to 15 semantic tokens, `template.BLOCK_AUDIO`) the draft model proposes up to k tokens,
one cheap forward each; the backbone then runs ONE forward pass over [last token, proposals] on top of its KV
cache and accepts or rejects them with the speculative sampling rule (Leviathan et al. 2023; Chen et al. 2023):

- p_i, q_i: the distributions the plain generator would sample from at position i (backbone and draft logits
  through the same grammar mask, temperature / audio_temperature, top-k and top-p: `generator.token_probs`);
- proposal d_i ~ q_i is accepted with probability min(1, p_i(d_i) / q_i(d_i));
- at the first rejection the token is drawn from normalize(max(0, p_i - q_i)) and the round ends;
- when every proposal is accepted, one more token is drawn from the backbone's next distribution (the bonus).

Each emitted token is then distributed exactly as p_i given the tokens before it, so the answer has the plain
generator's distribution (greedy: the very same tokens). Rejected positions are cropped from the backbone cache.
Text parts are decoded one token at a time as before; the draft's own cache (`DraftState`, kept on the session)
catches up lazily with whatever the session holds, so eviction and interruption need no extra care.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from npc_server.backbone.generator import (
    DecodeStats,
    Generator,
    SamplingConfig,
    Session,
    forward_tokens,
    sampling_temperature,
    token_probs,
)
from npc_server.backbone.fast import FastForward
from npc_server.backbone.template import BlockGrammar


@dataclass
class DraftState:
    """The draft model's KV cache for one conversation and the token ids it holds."""

    cache: DynamicCache
    ids: list[int] = field(default_factory=list)


class SpeculativeDecoder:
    """Proposes audio tokens with a draft backbone and verifies them with the generator's backbone."""

    def __init__(self, draft: torch.nn.Module, k: int = 2, min_prob: float = 0.0, fast: bool = True):
        """`k`: most proposals per round. `min_prob`: stop proposing after a token the draft itself gave less than
        this probability (a likely rejection; saves draft passes). Neither changes the sampled distribution.
        `fast`: run the draft through `FastForward` where it supports the model."""
        if k < 1:
            raise ValueError("draft_k must be >= 1")
        if not 0.0 <= min_prob < 1.0:
            raise ValueError("min_prob must be in [0, 1)")
        self.model = draft.eval()
        self.fast = FastForward(draft) if fast and FastForward.supports(draft) else None
        self.k = k
        self.min_prob = min_prob
        self.device = next(draft.parameters()).device

    def check_compatible(self, generator: Generator) -> None:
        """A draft must share the backbone's vocabulary and cover its context."""
        target, draft = generator.model.config, self.model.config
        if draft.vocab_size != target.vocab_size:
            raise ValueError(f"draft vocabulary {draft.vocab_size} != backbone vocabulary {target.vocab_size}")
        if getattr(draft, "max_position_embeddings", 0) < generator.max_context:
            raise ValueError(f"draft context {draft.max_position_embeddings} < backbone context {generator.max_context}")

    # --- the draft's cache -------------------------------------------------------------------------------------
    def sync(self, session: Session, extra: list[int] = ()) -> torch.Tensor:
        """Bring the draft cache to `session.ids + extra` (reusing the longest common prefix it already holds) and
        return the draft's logits for the next position [vocab]. Returns after at least one forward."""
        want = session.ids + list(extra)
        state = session.draft
        if not isinstance(state, DraftState):
            state = session.draft = DraftState(DynamicCache(config=self.model.config))
        have = state.ids
        n = len(have)
        if n > len(want) or want[:n] != have:  # the conversation was rewritten: find where it changed
            n = 0
            for a, b in zip(have, want):
                if a != b:
                    break
                n += 1
        n = min(n, len(want) - 1)  # re-feed at least the last token to get its logits
        if n < len(have):
            state.cache.crop(n - len(have))
        logits, state.cache = forward_tokens(self.model, state.cache, want[n:], self.device, last_only=True,
                                             fast=self.fast)
        state.ids = want
        return logits[-1]

    # --- one round -----------------------------------------------------------------------------------------------
    def wants(self, grammar: BlockGrammar) -> bool:
        """Speculate only where an audio token may come next (inside a span that is not full)."""
        return "semantic" in grammar.allowed_groups()

    @staticmethod
    def accept(p: float, q: float, u: float) -> bool:
        """The acceptance test of a proposal with target probability p and draft probability q, u ~ U[0, 1)."""
        return u * q < p

    @staticmethod
    def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """What a rejected position is drawn from (unnormalised): the part of p that q under-covers."""
        return (p - q).clamp_(min=0.0)

    @staticmethod
    def _confidence(logits: torch.Tensor, q: torch.Tensor, d: int, grammar: BlockGrammar, greedy: bool) -> float:
        """The draft's probability of its proposal (greedy: of the softmax over the allowed tokens)."""
        if not greedy:
            return float(q[d])
        masked = logits.masked_fill(~grammar.mask().to(logits.device), float("-inf"))
        return float(torch.softmax(masked, dim=-1)[d])

    def round(self, gen: Generator, session: Session, token: int, grammar: BlockGrammar, sampling: SamplingConfig,
              rng: torch.Generator, budget: int, stats: DecodeStats) -> list[int]:
        """Decode from `token` (sampled, already applied to `grammar`, not yet in the backbone cache).

        Returns the newly sampled tokens: the accepted proposals and one more token (the corrected or bonus one).
        On return the backbone cache and `session.segments` hold `token` and the accepted proposals; the last
        returned token is not fed yet, exactly like a token sampled by the plain loop. `budget` (>= 2) caps the
        number of returned tokens. `grammar` is not advanced."""
        limit = min(self.k, budget - 1)
        state_grammar = copy.copy(grammar)  # shares the mask cache; the counters are plain values
        q_logits = self.sync(session, [token])
        stats.draft_forwards += 1
        proposals: list[int] = []
        q_probs: list[torch.Tensor] = []
        while len(proposals) < limit and self.wants(state_grammar):
            greedy = sampling_temperature(state_grammar, sampling) == 0.0
            q = token_probs(q_logits, state_grammar, sampling)
            d = int(q.argmax()) if greedy else int(torch.multinomial(q, 1, generator=rng))
            confident = self.min_prob == 0.0 or self._confidence(q_logits, q, d, state_grammar, greedy) >= self.min_prob
            proposals.append(d)
            q_probs.append(q)
            state_grammar.advance(d)
            if not confident or len(proposals) >= limit or not self.wants(state_grammar):
                break
            draft = session.draft
            q_logits, draft.cache = forward_tokens(self.model, draft.cache, [d], self.device, last_only=True,
                                                         fast=self.fast)
            q_logits = q_logits[-1]
            draft.ids.append(d)
            stats.draft_forwards += 1

        logits = gen._forward(session, [token] + proposals)  # one verifying pass: [1 + len(proposals), vocab]
        session.segments[-1] += [token] + proposals
        stats.target_forwards += 1
        stats.rounds += 1
        stats.proposed += len(proposals)
        check = copy.copy(grammar)
        for i, d in enumerate(proposals):
            p = token_probs(logits[i], check, sampling)
            greedy = sampling_temperature(check, sampling) == 0.0  # p and q one-hot: accept iff p(d) = 1
            u = 0.0 if greedy else float(torch.rand((), generator=rng))
            if self.accept(float(p[d]), float(q_probs[i][d]), u):
                check.advance(d)
                continue
            residual = self.residual(p, q_probs[i])
            total = float(residual.sum())
            # total > 0 whenever a rejection is possible; p is the exact fallback for rounding leftovers
            if greedy:
                corrected = int(p.argmax())
            else:
                corrected = int(torch.multinomial(residual / total if total > 0 else p, 1, generator=rng))
            gen._drop_last(session, len(proposals) - i)
            stats.accepted += i
            return proposals[:i] + [corrected]
        stats.accepted += len(proposals)
        return proposals + [gen._sample(logits[len(proposals)], check, sampling, rng)]
