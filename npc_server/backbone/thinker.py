"""The stateful side of backbone v2: one conversation's KV cache and tokens, with named verbs.

`ThinkerSession` owns its cache; `prefill` appends tokens (a persona turn, the player's audio as it arrives),
`next_logits` reads the distribution after the last token, `rewind` drops tokens from the end. `decode_text`
is greedy / temperature sampling restricted to a set of output rows (e.g. text + <|text_end|>). The model
(`AudioLM`) stays stateless.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from npc_server.backbone.audio_lm import AudioLM


@dataclass(frozen=True)
class DecodeOptions:
    max_new_tokens: int = 48
    temperature: float = 0.0  # 0 = greedy
    seed: int = 0


class ThinkerSession:
    def __init__(self, model: AudioLM):
        from transformers import DynamicCache

        self.model = model
        self.cache = DynamicCache()  # full-length layers (sliding layers masked, not truncated): `rewind` can crop
        self.ids: list[int] = []
        self._last_hidden: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> None:
        if not ids:
            return
        hidden, self.cache = self.model(torch.tensor([ids], dtype=torch.long), cache=self.cache)
        self._last_hidden = hidden[0, -1]
        self.ids.extend(int(i) for i in ids)

    @torch.inference_mode()
    def next_logits(self) -> torch.Tensor:
        """Logits over the model's output rows (`model.head_ids`) for the token after the last one."""
        if self._last_hidden is None:
            raise RuntimeError("prefill the session before asking for logits")
        return self.model.logits(self._last_hidden.float()[None])[0]

    def fork(self) -> ThinkerSession:
        """An independent copy (e.g. of a cached persona prefix): its own cache, the same model."""
        import copy

        other = ThinkerSession(self.model)
        other.cache = copy.deepcopy(self.cache)
        other.ids = list(self.ids)
        other._last_hidden = self._last_hidden
        return other

    def rewind(self, keep: int) -> None:
        """Keep the first `keep` tokens (e.g. drop an interrupted answer); the next prefill continues from there."""
        if not 0 < keep <= len(self.ids):
            raise ValueError(f"keep must be in 1..{len(self.ids)}, got {keep}")
        if keep == len(self.ids):
            return
        self.cache.crop(-(len(self.ids) - (keep - 1)))  # remove that many tokens from the end
        last = self.ids[keep - 1]
        self.ids = self.ids[: keep - 1]
        self.prefill([last])

    def memory_bytes(self) -> int:
        total = 0
        for layer in getattr(self.cache, "layers", []):
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total


class LeanSession:
    """`ThinkerSession`'s verbs on the lean int8 forward (`backbone/lean.py`) for serving: one conversation in its
    own preallocated cache row, grown by doubling when the conversation outgrows it."""

    def __init__(self, lean, capacity: int = 512):
        self.lean = lean
        self.cache = lean.new_cache(1, capacity)
        self.ids: list[int] = []
        self._logits: torch.Tensor | None = None

    @property
    def model(self):
        """The forward (it has the output rows `head_ids` / `head_index` that `decode` needs)."""
        return self.lean

    def __len__(self) -> int:
        return len(self.ids)

    def prefill(self, ids: list[int]) -> None:
        if not ids:
            return
        need = len(self.ids) + len(ids)
        if need > self.cache.max_len:
            self._grow(max(2 * self.cache.max_len, need))
        self._logits = self.lean.prefill(self.cache, 0, [int(i) for i in ids])
        self.ids.extend(int(i) for i in ids)

    def next_logits(self) -> torch.Tensor:
        if self._logits is None:
            raise RuntimeError("prefill the session before asking for logits")
        return self._logits

    def rewind(self, keep: int) -> None:
        if not 0 < keep <= len(self.ids):
            raise ValueError(f"keep must be in 1..{len(self.ids)}, got {keep}")
        if keep == len(self.ids):
            return
        self.cache.rewind(0, keep - 1)
        last = self.ids[keep - 1]
        self.ids = self.ids[: keep - 1]
        self.prefill([last])

    def fork(self) -> LeanSession:
        other = LeanSession.__new__(LeanSession)
        other.lean, other.ids, other._logits = self.lean, list(self.ids), self._logits
        other.cache = self.lean.new_cache(1, self.cache.max_len)
        n = len(self.ids)
        for src, dst in zip(self.cache.keys + self.cache.values, other.cache.keys + other.cache.values):
            dst[:, :, :n] = src[:, :, :n]
        other.cache.lengths[0] = n
        return other

    def _grow(self, capacity: int) -> None:
        bigger = self.lean.new_cache(1, capacity)
        n = len(self.ids)
        for src, dst in zip(self.cache.keys + self.cache.values, bigger.keys + bigger.values):
            dst[:, :, :n] = src[:, :, :n]
        bigger.lengths[0] = n
        self.cache = bigger

    def memory_bytes(self) -> int:
        return self.cache.memory_bytes()


def step_sessions(sessions: list[LeanSession], tokens: list[int]) -> list[torch.Tensor]:
    """Append one token to each of several conversations in one batched pass of the lean forward (the weights are
    read once for all): each session then holds its token and the logits after it, as `prefill([token])` would.
    Returns those logits, one tensor per session."""
    if len(sessions) == 1:
        sessions[0].prefill([tokens[0]])
        return [sessions[0].next_logits()]
    lean = sessions[0].lean
    for s in sessions:
        if s.lean is not lean:
            raise ValueError("sessions of different models cannot share a step")
        if len(s.ids) + 1 > s.cache.max_len:
            s._grow(2 * s.cache.max_len)
    logits = lean.decode_slots([(s.cache, 0) for s in sessions], [int(t) for t in tokens])
    for i, (s, t) in enumerate(zip(sessions, tokens)):
        s._logits = logits[i]
        s.ids.append(int(t))
    return [s._logits for s in sessions]


def decode(session: ThinkerSession, allowed_ids: list[int], stop_ids: set[int], options: DecodeOptions = DecodeOptions()
           ) -> list[int]:
    """Sample up to `max_new_tokens` ids among `allowed_ids`, stopping after one of `stop_ids` (included)."""
    model = session.model
    rows = model.head_index[torch.as_tensor(allowed_ids, dtype=torch.long)]
    if (rows < 0).any():
        raise ValueError("some allowed ids are not output rows of this model")
    gen = torch.Generator().manual_seed(options.seed)
    out: list[int] = []
    for _ in range(options.max_new_tokens):
        logits = session.next_logits()[rows]
        if options.temperature <= 0:
            k = int(logits.argmax())
        else:
            k = int(torch.multinomial(torch.softmax(logits / options.temperature, -1), 1, generator=gen))
        token = int(allowed_ids[k])
        out.append(token)
        session.prefill([token])
        if token in stop_ids:
            break
    return out
