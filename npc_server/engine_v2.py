"""The model v2 answer pipeline: question audio -> tokenizer v2 -> thinker (backbone v2) writes the answer text ->
talker turns the text into semantic tokens as it arrives -> vocoder -> PCM chunks; subtitles stream as text deltas.

The same contract as `engine.Engine` (new_state / listen / answer / interrupted), so the service, its sessions,
limits, the bridge and the SDK carry it unchanged. Each `next()` of an answer does one text token's worth of work
(a thinker step, the talker frames that became ready, the vocoder chunks that completed), so the service's
scheduler interleaves answers as before.

A conversation keeps its thinker cache across turns: the persona's system turn is prefilled once per persona
version (prefix cache) and copied into each new conversation; each question is appended as it was asked (audio
ids or typed text) and each answer as text.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from npc_server.controls import Controls
from npc_server.engine import EngineAudio, EngineDone, EngineLipSync, EngineText

COMPONENTS = ("tokenizer_v2", "backbone_v2", "talker", "vocoder")  # the parts of a model v2 folder


def pick_model(choice: str, model_dir: str | Path) -> str:
    """`serve` / `bench --model`: "auto" is v2 when the folder has every v2 part (the shipped default does), else
    v1 (a v1-only folder, such as the tests' tiny model)."""
    if choice != "auto":
        return choice
    return "v2" if all((Path(model_dir) / c / "config.json").is_file() for c in COMPONENTS) else "v1"


def release_freed_memory() -> None:
    """Hand the heap memory freed after loading back to the OS. Loading makes the fp32 AudioLM (~1.2 GB) only to
    build the int8 lean forward from it; glibc keeps such freed memory mapped, so without this the server's resident
    memory stays ~0.4 GB above what it uses. A no-op where glibc's malloc_trim is missing."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# the subtitle's text tokens per second of speech: the thinker's answer budget is this x max_answer_seconds
TEXT_TOKENS_PER_SECOND = 4.0


@dataclass
class _Spoken:
    audio_end_s: float  # answer time at the end of a chunk that left
    text: str  # subtitle text produced before it


@dataclass
class EngineStateV2:
    """One conversation: the thinker session (KV cache) and the progress of the answer in flight.

    `version` counts the changes to the session (each answer, each interruption): a question prefilled ahead on a
    fork of the session is adopted only if the session is still the version it was forked from."""

    session: object  # backbone.thinker.ThinkerSession
    lock: threading.Lock = field(default_factory=threading.Lock)  # guards `answering` and `version`
    answering: bool = False  # an answer generator is running on the session (no fork may be taken)
    version: int = 0
    in_flight: bool = False  # the answer's question is in the session and its text is being written
    answer_start: int = 0  # session length where the answer in flight begins
    progress: list[_Spoken] = field(default_factory=list)
    turns: list[tuple[str, str]] = field(default_factory=list)

    def memory_bytes(self) -> int:
        return self.session.memory_bytes()


class QuestionStreamV2:
    """Tokenizes a question with tokenizer v2 while it arrives; `finish()` returns its AudioTokens.

    With a conversation `state` (and a format whose audio input is the linguistic stream) it also prefills the
    question into a fork of the conversation's thinker session as the codes come, so that after the end of speech
    only the last codes and the turn's closing ids are left to prefill. The fork is taken only while no answer is
    in flight; `answer` adopts it if the conversation has not changed since (else it prefills as usual)."""

    def __init__(self, tokenizer, sample_rate: int, fmt=None, state: EngineStateV2 | None = None):
        self._stream = tokenizer.stream(sample_rate)
        self._parts = []
        self.fmt, self.state = fmt, state
        self.fork = None  # the conversation's session with the question's audio so far
        self.version = -1  # the state version the fork was taken from
        self.prefilled = 0  # linguistic codes in the fork
        self.ahead_tokens = 0
        self.prefill_s = 0.0  # thinker time spent while the question arrived

    def push(self, wav: np.ndarray) -> None:
        self._parts.append(self._stream.push(wav))
        self._prefill_ahead()

    def finish(self):
        from npc_server.tokenizer.tokenizer import make_tokens

        parts = self._parts + [self._stream.flush()]
        return make_tokens(torch.cat([p.linguistic for p in parts]), torch.cat([p.semantic for p in parts]))

    def _prefill_ahead(self) -> None:
        if self.state is None or self.fmt is None or self.fmt.audio_input != "linguistic":
            return
        t0 = time.perf_counter()
        if self.fork is None:
            with self.state.lock:
                if self.state.answering:
                    return
                self.fork, self.version = self.state.session.fork(), self.state.version
            self.fork.prefill([self.fmt.user, self.fmt.audio_start])
        codes = torch.cat([p.linguistic for p in self._parts]).numpy()
        if len(codes) > self.prefilled:
            self.fork.prefill(self.fmt.audio(codes[self.prefilled:]))
            self.prefilled = len(codes)
        self.prefill_s += time.perf_counter() - t0

    def adopt(self, state: EngineStateV2, codes: np.ndarray) -> object | None:
        """The fork with the whole question (`codes`: all its linguistic codes) prefilled up to the answer, or None
        when there is none or the conversation changed since it was taken."""
        if self.fork is None or state is not self.state or state.version != self.version:
            return None
        if len(codes) < self.prefilled:
            return None
        self.ahead_tokens = 2 + self.prefilled  # <user> <audio_start> and the codes prefilled while it arrived
        self.fork.prefill(self.fmt.audio(codes[self.prefilled:]) + [self.fmt.audio_end, self.fmt.end,
                                                                     self.fmt.assistant, self.fmt.mode_text])
        return self.fork


class EngineV2:
    """Holds tokenizer v2, the thinker (backbone v2), the talker and the vocoder, and runs answers."""

    def __init__(self, tokenizer, model, fmt, talker, vocoder, name: str = "npc-voice/v2", lean: bool = True):
        """`model`: the AudioLM; with `lean` (serving) its int8 lean copy answers and the AudioLM is not kept."""
        from npc_server.backbone.lean import LeanLM

        self.tokenizer, self.fmt, self.talker, self.vocoder = tokenizer, fmt, talker, vocoder
        self.name = name
        self.sample_rate = int(vocoder.sample_rate)
        self.thinker = LeanLM.from_audio_lm(model) if lean else model
        self.text_rows = [int(i) for i in model.head_ids.tolist() if i < model.cfg.n_text] + [fmt.text_end]
        self._rows = model.head_index[torch.as_tensor(self.text_rows, dtype=torch.long)]
        self.batcher = None  # a StepBatcher once enable_batching() is called
        self._prefix_cache: dict[tuple[str, str], object] = {}
        self._prefix_lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, threads: int | None = None) -> EngineV2:
        """models/<name>/{tokenizer_v2, backbone_v2, talker, vocoder}; the pretrained bases come from the local
        cache (`npc-server pretrained prepare`)."""
        from npc_server.backbone.audio_lm import AudioLM, load_text_tokenizer
        from npc_server.backbone.template_v2 import DialogueFormat
        from npc_server.talker import Talker
        from npc_server.tokenizer.tokenizer_v2 import load_tokenizer
        from npc_server.vocoder import Vocoder

        model_dir = Path(model_dir)
        missing = [c for c in COMPONENTS if not (model_dir / c / "config.json").exists()]
        if missing:
            raise FileNotFoundError(f"model folder {model_dir} lacks model v2 component(s): {', '.join(missing)}")
        if threads:
            torch.set_num_threads(threads)
        model = AudioLM.from_pretrained(model_dir / "backbone_v2")
        fmt = DialogueFormat(model.cfg.layout, load_text_tokenizer(model.cfg.base), model.cfg.audio_input)
        engine = cls(load_tokenizer(model_dir / "tokenizer_v2"), model, fmt, Talker.from_pretrained(model_dir / "talker"),
                     Vocoder.from_pretrained(model_dir / "vocoder"), name=f"npc-voice/{model_dir.name} (model v2)")
        del model
        release_freed_memory()
        return engine

    def enable_batching(self, lanes: int = 1) -> bool:
        """Answers running at the same moment share one thinker pass per text token (the lean forward reads its
        weights once for the batch: on a CPU that is most of a step's cost). The service calls this when it runs
        several answer workers."""
        from npc_server.backbone.batching import StepBatcher
        from npc_server.backbone.lean import LeanLM
        from npc_server.backbone.thinker import step_sessions

        if not isinstance(self.thinker, LeanLM):
            return False
        self.batcher = StepBatcher(None, window_s=0.015, lanes=lanes, forward_many=step_sessions)
        return True

    def _step(self, session, token: int) -> None:
        """The answer's next text token into its session (batched with other answers when batching is on)."""
        if self.batcher is not None:
            self.batcher.step(session, token)
        else:
            session.prefill([token])

    # ---- sessions ----------------------------------------------------------------------------------------
    def new_session(self):
        """An empty thinker session: on the lean forward when serving, else on the AudioLM."""
        from npc_server.backbone.lean import LeanLM
        from npc_server.backbone.thinker import LeanSession, ThinkerSession

        return LeanSession(self.thinker) if isinstance(self.thinker, LeanLM) else ThinkerSession(self.thinker)

    def new_state(self, persona) -> EngineStateV2:
        key = (persona.prompt_text(), persona.language)
        with self._prefix_lock:
            base = self._prefix_cache.get(key)
            if base is None:
                base = self.new_session()
                base.prefill(self.fmt.system_ids(*key))
                if len(self._prefix_cache) >= 64:
                    self._prefix_cache.pop(next(iter(self._prefix_cache)))
                self._prefix_cache[key] = base
        return EngineStateV2(session=base.fork())

    def listen(self, sample_rate: int, state: EngineStateV2 | None = None) -> QuestionStreamV2:
        """A question arriving in chunks; with the conversation's `state` it is prefilled while it arrives."""
        return QuestionStreamV2(self.tokenizer, sample_rate, self.fmt, state)

    # ---- answering ---------------------------------------------------------------------------------------
    def answer(self, state: EngineStateV2, persona, controls: Controls,
               audio: np.ndarray | QuestionStreamV2 | None = None, text: str = "", mode: str = "audio_and_text",
               load: Callable[[], int] | None = None, lip_sync: bool = False
               ) -> Iterator[EngineText | EngineAudio | EngineLipSync | EngineDone]:
        """Stream the answer to one question (16 kHz float32 audio, a QuestionStreamV2 that heard it, or typed text;
        with both, the audio is the question). With `lip_sync` (and audio), viseme and word timings from the talker's
        alignment come as EngineLipSync events, each before the audio it describes."""
        t0 = time.perf_counter()
        with state.lock:  # until the answer is in the session, no arriving question forks it
            state.answering = True
        try:
            events = self._answer(state, persona, controls, audio, text, mode, load, lip_sync, t0)
            yield from (self.batcher.track(events) if self.batcher is not None else events)
        finally:
            with state.lock:
                state.answering = False
                state.version += 1

    def _answer(self, state, persona, controls, audio, text, mode, load, lip_sync, t0):
        from npc_server.talker import TalkerStream
        from npc_server.talker.lipsync import LipSync

        tokens = None
        if isinstance(audio, QuestionStreamV2):
            tokens = audio.finish()
        elif audio is not None:
            tokens = self.tokenizer.encode(audio, 16000)
        t_tok = time.perf_counter()
        cached, ahead = len(state.session), None
        if tokens is not None and len(tokens.linguistic):
            codes = tokens.linguistic.numpy()
            question = self.fmt.question_ids(audio=self.fmt.audio(codes, tokens.interleaved.numpy()))
            if isinstance(audio, QuestionStreamV2):
                ahead = audio.adopt(state, codes)
        elif text.strip():
            question = self.fmt.question_ids(text=text.strip())
        else:
            raise ValueError("the question has neither audio nor text")
        if ahead is not None:  # prefilled while the player spoke: only the last codes were left
            state.session = ahead
        else:
            state.session.prefill(question)
        session = state.session
        t_pre = time.perf_counter()
        state.answer_start, state.progress, state.in_flight = len(session), [], True

        talker = voc = None
        if mode != "text_only":
            talker = TalkerStream(self.talker, controls.voice, controls.language, controls.emotion, controls.speed,
                                  controls.accent)
            voc = self.vocoder.stream(voice=controls.voice,
                                      pitch_st=self.vocoder.request_pitch(controls.pitch_st, controls.emotion))
        lips = LipSync(self.talker.cfg.tokens_per_second) if lip_sync and talker is not None else None
        answer_ids: list[int] = []
        subtitle, audio_s, vocoder_s, talker_s = "", 0.0, 0.0, 0.0
        budget = max(8, int(round(persona.max_answer_seconds * TEXT_TOKENS_PER_SECOND)))

        def speak(codes: np.ndarray, final: bool) -> Iterator[EngineAudio | EngineLipSync]:
            nonlocal audio_s, vocoder_s
            if voc is None:
                return
            if lips is not None:
                events = lips.update(talker.spans)
                if final:
                    events.extend(lips.finish(talker.frames))
                if events:
                    yield EngineLipSync(events)
            if codes.size and audio_s == 0.0 and load is not None:
                voc.share_cores(int(load()))
            tv = time.perf_counter()
            pieces = list(voc.push_chunks(codes.tolist())) if codes.size else []
            if final and len(voc.tokens):
                pieces.append(voc.flush())
            vocoder_s += time.perf_counter() - tv
            for wav in pieces:
                if wav.size:
                    audio_s += len(wav) / self.sample_rate
                    state.progress.append(_Spoken(audio_s, subtitle))
                    yield EngineAudio(wav, self.sample_rate)

        for _ in range(budget):
            logits = session.next_logits()[self._rows]
            token = self.text_rows[int(logits.argmax())]
            self._step(session, token)
            if token == self.fmt.text_end:
                break
            answer_ids.append(token)
            full = self.fmt.text.decode(answer_ids, skip_special_tokens=True)
            delta, subtitle = full[len(subtitle):], full
            if not delta:
                continue
            if mode != "audio_only":
                yield EngineText(delta)
            if talker is not None:
                ts = time.perf_counter()
                codes = talker.push_text(delta)
                talker_s += time.perf_counter() - ts
                yield from speak(codes, final=False)
        else:
            session.prefill([self.fmt.text_end])  # the bound cut the answer: close it as the model would
        session.prefill([self.fmt.end])
        if talker is not None:
            ts = time.perf_counter()
            codes = talker.finish()
            talker_s += time.perf_counter() - ts
            yield from speak(codes, final=True)
        state.in_flight, state.progress = False, []
        spoken = subtitle.strip()
        state.turns.append((text or "<audio>", spoken))
        yield EngineDone(spoken_text=spoken, timings=dict(
            tokenize_ms=(t_tok - t0) * 1000, prefill_ms=(t_pre - t_tok) * 1000,
            decode_ms=(time.perf_counter() - t_pre - vocoder_s - talker_s) * 1000, vocoder_ms=vocoder_s * 1000,
            talker_ms=talker_s * 1000,
            prefill_tokens=len(question) - (audio.ahead_tokens if ahead is not None else 0),
            generated_tokens=len(answer_ids), cached_tokens=cached + (audio.ahead_tokens if ahead is not None else 0),
            prefill_ahead_ms=audio.prefill_s * 1000 if ahead is not None else 0.0))

    def interrupted(self, state: EngineStateV2, spoken_seconds: float) -> None:
        """The client stopped listening after `spoken_seconds`: the answer in the conversation becomes the text
        that had been produced when the chunk playing then left."""
        if not state.in_flight:
            return
        spoken = ""
        for p in state.progress:
            spoken = p.text
            if p.audio_end_s >= spoken_seconds:
                break
        if spoken_seconds <= 0:
            spoken = ""
        session = state.session
        session.rewind(state.answer_start)
        session.prefill(self.fmt.text_ids(spoken) + [self.fmt.text_end, self.fmt.end])
        state.turns.append(("<interrupted>", spoken.strip()))
        with state.lock:
            state.progress, state.in_flight = [], False
            state.version += 1
