"""Speaking with a talker: the stateful stream that turns arriving phones (or text) into audio tokens.

`TalkerStream` owns everything that changes while an answer is spoken: the phones so far, the durations of the
phones already spoken, the decoder's key/value cache, the sampler's random state and the alignment of phones to
frames (which is what lip-sync events are made of). Its verbs: `push` phones, `push_text` text, `finish`.
A phone is spoken once `lookahead` phones after it are known (or the answer is finished), so the first tokens
come after the first few phones, not after the whole answer. `synthesize` is the offline form: the same stream
fed everything at once, so streamed and offline tokens are equal by construction (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from npc_server.talker.frontend import BOS, EOS, Phones, TextPhonemizer
from npc_server.talker.model import DurationRounder, Talker, tempo

@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.7  # 0 = greedy
    top_k: int = 20
    seed: int = 0


@dataclass(frozen=True)
class Span:
    """One spoken phone: its unit, whether it starts a word, its frames [start, start + frames), and the text of the
    word it starts where the text is known ("" otherwise)."""

    unit: str
    word_start: bool
    start: int
    frames: int
    word: str = ""


class FrameDecoder:
    """The frame decoder one frame at a time: the maths of `Talker.decode_frames` with a KV cache, in far fewer
    torch calls (preallocated key/value buffers that grow by doubling, a rotary table, functional ops): at one
    frame per call the per-op overhead, not arithmetic, is the cost on a CPU. Tested equal to `decode_frames`."""

    def __init__(self, talker: Talker, capacity: int = 256):
        cfg = talker.cfg
        self.talker, self.heads, self.head_dim = talker, cfg.heads, cfg.dim // cfg.heads
        self.layers = len(talker.decoder)
        self.n = 0
        self._alloc(capacity)

    def _alloc(self, capacity: int) -> None:
        k = torch.zeros(self.layers, self.heads, capacity, self.head_dim)
        v = torch.zeros_like(k)
        if self.n:
            k[:, :, : self.n], v[:, :, : self.n] = self.k[:, :, : self.n], self.v[:, :, : self.n]
        self.k, self.v = k, v
        half = self.head_dim // 2
        freqs = self.talker.cfg.rope_theta ** (-torch.arange(half, dtype=torch.float32) / half)
        angles = torch.arange(capacity, dtype=torch.float32)[:, None] * freqs[None, :]
        self.cos, self.sin = angles.cos(), angles.sin()

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:  # x [H, hd] at position self.n
        half = self.head_dim // 2
        cos, sin = self.cos[self.n], self.sin[self.n]
        x1, x2 = x[:, :half], x[:, half:]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)

    @torch.inference_mode()
    def step(self, x: torch.Tensor) -> torch.Tensor:
        """One frame's decoder input [dim] -> its token logits [n_codes]."""
        if self.n == self.k.shape[2]:
            self._alloc(2 * self.n)
        t, n, dim = self.talker, self.n, x.shape[-1]
        x = x.reshape(1, dim)
        for i, b in enumerate(t.decoder):
            h = F.layer_norm(x, (dim,), b.norm1.weight, b.norm1.bias)
            q, k, v = F.linear(h, b.qkv.weight, b.qkv.bias).view(3, self.heads, self.head_dim)
            self.k[i, :, n], self.v[i, :, n] = self._rotate(k), v
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
                y = F.scaled_dot_product_attention(self._rotate(q)[None, :, None], self.k[i : i + 1, :, : n + 1],
                                                   self.v[i : i + 1, :, : n + 1])
            x = x + F.linear(y.reshape(1, dim), b.proj.weight, b.proj.bias)
            h = F.layer_norm(x, (dim,), b.norm2.weight, b.norm2.bias)
            up, down = b.ff[0], b.ff[2]
            x = x + F.linear(F.gelu(F.linear(h, up.weight, up.bias)), down.weight, down.bias)
        self.n += 1
        x = F.layer_norm(x, (dim,), t.decoder_norm.weight, t.decoder_norm.bias)
        return F.linear(x, t.head.weight, t.head.bias)[0]


class TalkerStream:
    def __init__(self, talker: Talker, voice: str, language: str = "en", emotion: str = "neutral",
                 speed: float = 1.0, accent: str | None = None, sampling: Sampling = Sampling()):
        if not 0.25 <= speed <= 4.0:
            raise ValueError(f"speed {speed} is outside 0.25..4")
        self.talker, self.sampling = talker, sampling
        self.text = TextPhonemizer(language, accent)
        v, lang, emo = talker.condition_ids(voice, language, emotion)
        with torch.inference_mode():
            self.cond = talker.condition(torch.tensor([v]), torch.tensor([lang]), torch.tensor([emo]),
                                         torch.tensor([speed]))
        self.tempo = tempo(speed, emotion) if talker.cfg.tempo_law else 1.0
        self.rounder = DurationRounder(talker.cfg.max_frames_per_phone)
        self.phones = Phones([BOS], [False])
        self.spans: list[Span] = []
        self.finished = False
        self.decoder = FrameDecoder(talker)
        self.prev = talker.cfg.n_codes  # <bos> token
        self.frames = 0
        self.rng = torch.Generator().manual_seed(sampling.seed)

    # ------------------------------------------------------------------ verbs
    def push(self, phones: Phones) -> np.ndarray:
        """More phones of the answer (no <s> / </s>) -> the tokens that can be spoken now."""
        if self.finished:
            raise RuntimeError("push after finish")
        phones = self.talker.known_phones(phones)
        self.phones.extend(phones)
        return self._speak()

    def push_text(self, delta: str) -> np.ndarray:
        """More answer text (a subtitle delta) -> tokens. Words are phonemized once settled (see TextPhonemizer)."""
        return self.push(self.text.push(delta))

    def finish(self) -> np.ndarray:
        """The answer is complete: speak the rest (text still buffered included) and the closing silence."""
        if self.finished:
            return np.zeros(0, dtype=np.int64)
        self.phones.extend(self.talker.known_phones(self.text.finish()))
        self.phones.units.append(EOS)
        self.phones.word_starts.append(False)
        self.finished = True
        return self._speak()

    @torch.inference_mode()
    def _speak(self) -> np.ndarray:
        talker, cfg = self.talker, self.talker.cfg
        n = len(self.phones)
        ready = n if self.finished else n - cfg.lookahead
        first = len(self.spans)
        if ready <= first:
            return np.zeros(0, dtype=np.int64)
        ids = torch.tensor([talker.phone_ids(self.phones)])
        starts = torch.tensor([self.phones.word_starts])
        states = talker.encode_phones(ids, starts, self.cond)[:, :ready]
        frames = self.rounder((torch.exp(talker.log_durations(states[0, first:])) / self.tempo).tolist())
        out: list[int] = []
        for j, d in zip(range(first, ready), frames):
            self.spans.append(Span(self.phones.units[j], self.phones.word_starts[j], self.frames, d,
                                   self.phones.word(j)))
            k = torch.arange(d)[None]
            context = talker.frame_context(states, torch.full_like(k, j), k, d - 1 - k, self.cond)[0]
            for x in context:
                logits = self.decoder.step(x + talker.token.weight[self.prev])
                self.prev = self._sample(logits)
                out.append(self.prev)
                self.frames += 1
        return np.asarray(out, dtype=np.int64)

    def _sample(self, logits: torch.Tensor) -> int:
        s = self.sampling
        if s.temperature <= 0:
            return int(logits.argmax())
        top = torch.topk(logits.float() / s.temperature, min(s.top_k, logits.shape[-1]))
        pick = torch.multinomial(torch.softmax(top.values, -1), 1, generator=self.rng)
        return int(top.indices[pick])


def synthesize(talker: Talker, text: str, voice: str, language: str = "en", emotion: str = "neutral",
               speed: float = 1.0, accent: str | None = None, sampling: Sampling = Sampling()) -> tuple[np.ndarray, list[Span]]:
    """Offline: the whole answer text -> (tokens, phone spans). The phones are those of `text_phones(text)` (the
    text phonemizer's equal them, tested), with the words' text on their spans."""
    stream = TalkerStream(talker, voice, language, emotion, speed, accent, sampling)
    tokens = np.concatenate([stream.push_text(text), stream.finish()])
    return tokens, stream.spans
