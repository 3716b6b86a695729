"""The service logic behind every transport: auth, validation and limits, sessions, scheduling, speak streaming."""

from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import soxr

from npc_server import __version__
from npc_server.audio import AudioError, float_to_pcm16, load_audio, pcm16_to_float, resample, to_mono
from npc_server.controls import Controls
from npc_server.engine import EngineAudio, EngineDone, EngineLipSync, EngineText
from npc_server.personas import Persona, PersonaStore, ReloadResult
from npc_server.service.api import (
    ApiError,
    AudioEncoding,
    AudioOut,
    EndOut,
    LipSyncOut,
    ErrorCode,
    Limits,
    OutputMode,
    SpeakConfig,
    SpeakEvent,
    TextOut,
    Timings,
    shorten,
)
from npc_server.service.auth import matches
from npc_server.service.scheduler import Scheduler
from npc_server.service.sessions import AnswerInFlight, SessionManager

ENGINE_SAMPLE_RATE_IN = 16000
SESSION_BUSY_GRACE_S = 2.0  # how long a question waits for its session's previous (stopped or cancelled) answer
OUTPUT_RATES = (8000, 16000, 22050, 24000, 32000, 44100, 48000)


class QuestionSlot:
    """A question still arriving (taken when its request starts, released once its audio is read)."""

    def __init__(self, release):
        self._release = release
        self._released = False
        self._lock = threading.Lock()

    def release(self) -> None:
        """Free the slot; calling it again does nothing."""
        with self._lock:
            if self._released:
                return
            self._released = True
        self._release()


@dataclass
class Health:
    status: str
    version: str
    model: str
    sessions: int
    active_requests: int
    personas: int


class NpcService:
    """Everything a client can ask, independent of gRPC or WebSocket framing."""

    def __init__(
        self,
        engine,
        personas: PersonaStore,
        limits: Limits = Limits(),
        auth_token: str | None = None,
        workers: int = 1,
        batch_lanes: int = 1,
        client_tokens: dict[str, str] | None = None,
    ):
        """`auth_token`: one token shared by all clients; `client_tokens`: {token: client name}, one per client
        (`serve --tokens-file`). With neither, anyone may connect (development on loopback)."""
        if auth_token is not None and client_tokens:
            raise ValueError("give a shared auth_token or per-client client_tokens, not both")
        self.engine = engine
        self.personas = personas
        self.limits = limits
        self.auth_token = auth_token
        self.client_tokens = dict(client_tokens or {})
        self.sessions = SessionManager(limits)
        self.scheduler = Scheduler(workers, max_running=limits.playing_answers)
        if workers > 1 and hasattr(engine, "enable_batching"):
            engine.enable_batching(batch_lanes)  # concurrent answers share decode steps
        self._active = 0
        self._active_lock = threading.Lock()
        self._pending: dict[str, int] = {}  # client -> questions still arriving
        self._pending_lock = threading.Lock()

    # ---- auth ----------------------------------------------------------------------------------------------

    def authenticate(self, token: str | None) -> str | None:
        """Check a client's token. Returns the client's name when it has a token of its own (`client_tokens`),
        None when it holds the shared token or the server runs without auth."""
        if self.client_tokens:
            name = None
            for known, client in self.client_tokens.items():  # look at every one: the time says nothing
                if token and matches(token, known):
                    name = client
            if name is None:
                raise ApiError(ErrorCode.UNAUTHENTICATED, "missing or wrong auth token")
            return name
        if self.auth_token is not None and (not token or not matches(token, self.auth_token)):
            raise ApiError(ErrorCode.UNAUTHENTICATED, "missing or wrong auth token")
        return None

    def identify(self, token: str | None, declared_id: str | None, peer: str) -> str:
        """Authenticate a client and name the owner of its sessions and questions.

        A client with its own token is that token's name, whatever it declares. Holders of the shared token are
        trusted alike: the id a client declares (gRPC `x-client-id`, bridge `client_id`) only keeps well-behaved
        clients apart (their sessions' random ids are what keeps them private), else its address is used.
        """
        name = self.authenticate(token)
        if name is not None:
            return name
        return declared_id[:128] if declared_id else peer

    def hold_question(self, client_id: str) -> QuestionSlot:
        """Count a question that has started to arrive, or refuse it with RESOURCE_EXHAUSTED.

        A question waiting for its audio holds a thread of its transport, so these are bounded per client and
        in all: held-open questions cannot take the threads that every other request needs."""
        lim = self.limits
        with self._pending_lock:
            mine = self._pending.get(client_id, 0)
            if mine >= lim.max_pending_questions_per_client:
                raise ApiError(
                    ErrorCode.RESOURCE_EXHAUSTED,
                    f"this client already has {mine} questions arriving (limit {lim.max_pending_questions_per_client})",
                )
            if sum(self._pending.values()) >= lim.max_pending_questions:
                raise ApiError(ErrorCode.RESOURCE_EXHAUSTED, "the server is busy with arriving questions; try again")
            self._pending[client_id] = mine + 1

        def release() -> None:
            with self._pending_lock:
                left = self._pending.get(client_id, 1) - 1
                if left > 0:
                    self._pending[client_id] = left
                else:
                    self._pending.pop(client_id, None)

        return QuestionSlot(release)

    def pending_questions(self) -> int:
        with self._pending_lock:
            return sum(self._pending.values())

    # ---- small calls ---------------------------------------------------------------------------------------

    def list_personas(self) -> list[Persona]:
        return self.personas.all()

    def reload_personas(self) -> ReloadResult:
        return self.personas.reload()

    def open_session(self, client_id: str, npc_id: str, session_id: str = "") -> str:
        persona = self._persona(npc_id)
        s = self.sessions.open(persona.id, client_id, session_id)
        if s.state is None:
            s.state = self.engine.new_state(persona)
        return s.id

    def close_session(self, client_id: str, session_id: str) -> bool:
        return self.sessions.close(session_id, client_id)

    def health(self) -> Health:
        self.sessions.sweep()
        return Health(
            status="ok",
            version=__version__,
            model=getattr(self.engine, "name", type(self.engine).__name__),
            sessions=len(self.sessions),
            active_requests=self._active,
            personas=len(self.personas.all()),
        )

    def shutdown(self) -> None:
        self.scheduler.shutdown()
        self.personas.stop()

    # ---- validation ------------------------------------------------------------------------------------------

    def _persona(self, npc_id: str) -> Persona:
        if not npc_id:
            raise ApiError(ErrorCode.INVALID_ARGUMENT, "npc_id is required")
        try:
            return self.personas.get(npc_id)
        except KeyError:
            known = ", ".join(p.id for p in self.personas.all()) or "none"
            raise ApiError(ErrorCode.NOT_FOUND, f"unknown NPC {shorten(npc_id)}; known: {known}") from None

    def resolve_controls(self, persona: Persona, cfg: SpeakConfig) -> Controls:
        try:
            return Controls.from_persona(persona, cfg.overrides)
        except ValueError as exc:
            raise ApiError(ErrorCode.INVALID_ARGUMENT, str(exc)) from None

    def _validate_config(self, cfg: SpeakConfig) -> None:
        if len(cfg.text) > self.limits.max_text_chars:
            raise ApiError(
                ErrorCode.INVALID_ARGUMENT, f"text is {len(cfg.text)} characters; the limit is {self.limits.max_text_chars}"
            )
        if cfg.encoding == AudioEncoding.PCM_S16LE and cfg.sample_rate and not (8000 <= cfg.sample_rate <= 192000):
            raise ApiError(
                ErrorCode.INVALID_ARGUMENT, f"input sample_rate {cfg.sample_rate} Hz is not supported (8000-192000)"
            )
        if cfg.heard_seconds is not None and not 0 <= cfg.heard_seconds < 1e6:
            raise ApiError(ErrorCode.INVALID_ARGUMENT, f"heard_seconds must be >= 0, got {cfg.heard_seconds:g}")
        if cfg.channels not in (0, 1, 2):
            raise ApiError(ErrorCode.INVALID_ARGUMENT, f"channels must be 1 or 2, got {cfg.channels}")
        if cfg.output_sample_rate and cfg.output_sample_rate not in OUTPUT_RATES:
            raise ApiError(
                ErrorCode.INVALID_ARGUMENT,
                f"output_sample_rate {cfg.output_sample_rate} is not supported; use one of {OUTPUT_RATES} or 0",
            )

    def _read_audio(self, cfg: SpeakConfig, chunks: Iterable[bytes], state=None):
        """Read the question -> 16 kHz audio, or audio tokens, or None when there is no audio.

        Raw PCM is tokenized while it arrives (the streaming tokenizer equals offline encoding), so at the end
        of the player's speech only the last block is left to encode; an engine may also prefill it into the
        conversation `state` as it comes (model v2). A wav/flac/ogg file is decoded once complete,
        in blocks, after a look at its declared duration (a small compressed file can hold hours of audio).
        """
        total = 0
        buf = io.BytesIO()
        stream = None
        carry = b""
        channels = max(cfg.channels, 1)
        frame = 2 * channels
        seconds = 0.0
        try:
            for chunk in chunks:
                if len(chunk) > self.limits.max_chunk_bytes:
                    raise ApiError(
                        ErrorCode.INVALID_ARGUMENT,
                        f"audio chunk of {len(chunk)} bytes exceeds the limit of {self.limits.max_chunk_bytes} bytes",
                    )
                total += len(chunk)
                if total > self.limits.max_request_bytes:
                    raise ApiError(
                        ErrorCode.RESOURCE_EXHAUSTED, f"question audio exceeds {self.limits.max_request_bytes} bytes"
                    )
                if cfg.encoding == AudioEncoding.WAV:
                    buf.write(chunk)
                    continue
                if not cfg.sample_rate:
                    raise ApiError(ErrorCode.INVALID_ARGUMENT,
                                   "pcm_s16le audio needs its input sample_rate (8000-192000 Hz); it was not given")
                data = carry + chunk
                usable = len(data) - len(data) % frame
                carry = data[usable:]
                if not usable:
                    continue
                wav = pcm16_to_float(data[:usable])
                if channels == 2:
                    wav = to_mono(wav.reshape(-1, 2))
                seconds += len(wav) / cfg.sample_rate
                if seconds > self.limits.max_audio_seconds:
                    raise AudioError(f"audio is over {seconds:.1f} s long; the limit is {self.limits.max_audio_seconds:.1f} s")
                if stream is None:
                    stream = self.engine.listen(cfg.sample_rate, state)
                stream.push(wav)
            if cfg.encoding == AudioEncoding.WAV:
                if not buf.tell():
                    return None
                wav, sr = load_audio(buf.getvalue(), max_seconds=self.limits.max_audio_seconds)
                return resample(wav, sr, ENGINE_SAMPLE_RATE_IN)
            if carry:
                raise AudioError(
                    f"s16le audio with {channels} channel(s) must be a multiple of {frame} bytes, got {total}"
                )
            return stream  # flushed by the engine once the question is complete
        except AudioError as exc:
            raise ApiError(ErrorCode.INVALID_ARGUMENT, str(exc)) from None

    # ---- speak -----------------------------------------------------------------------------------------------

    def speak(
        self,
        client_id: str,
        cfg: SpeakConfig,
        audio_chunks: Iterable[bytes],
        is_cancelled: Callable[[], bool] = lambda: False,
        question: QuestionSlot | None = None,
    ) -> Iterator[SpeakEvent]:
        """Validate, read the question, then stream the answer. Raises ApiError before the first event on bad input.

        `question`: the slot of `hold_question()` the transport took for this request; released once the question's
        audio is read (the answer then counts against `max_concurrent_requests` instead)."""
        try:
            self._validate_config(cfg)
            persona = self._persona(cfg.npc_id)
            controls = self.resolve_controls(persona, cfg)
            if cfg.session_id:
                session = self.sessions.get(cfg.session_id, client_id)
                if session.npc_id != persona.id:
                    raise ApiError(
                        ErrorCode.FAILED_PRECONDITION,
                        f"session {shorten(cfg.session_id)} talks to NPC {session.npc_id!r}, not {persona.id!r}",
                    )
            else:
                session = None
            flight = session.answering if session is not None else None
            if flight is not None:  # barge-in: the player speaks again while the NPC answers; the NPC stops now
                flight.barge_in(cfg.heard_seconds)
            # the conversation the question goes to, so the engine may start on it while the audio arrives
            if session is not None and session.state is None:
                session.state = self.engine.new_state(persona)
            state = session.state if session is not None else self.engine.new_state(persona)
            audio = self._read_audio(cfg, audio_chunks, state)
            if audio is None and not cfg.text.strip():
                raise ApiError(ErrorCode.INVALID_ARGUMENT, "a question needs audio, text or both")
            t_question_end = time.perf_counter()

            with self._active_lock:
                if self._active >= self.limits.max_concurrent_requests:
                    raise ApiError(ErrorCode.RESOURCE_EXHAUSTED, "the server is busy; try again shortly")
                self._active += 1
        finally:
            if question is not None:
                question.release()
        try:
            if session is not None:
                # a stopped or cancelled answer needs a moment to end and rewrite the history: wait for it briefly
                if not session.busy.acquire(timeout=SESSION_BUSY_GRACE_S):
                    raise ApiError(ErrorCode.FAILED_PRECONDITION, f"session {shorten(session.id)} is already answering")
                session.answering = flight = AnswerInFlight()
                try:
                    yield from self._answer(session.state, session.id, persona, controls, cfg, audio, t_question_end,
                                            is_cancelled, flight)
                finally:
                    session.answering = None
                    session.busy.release()
                    self.sessions.touch(session)
            else:
                yield from self._answer(state, "", persona, controls, cfg, audio, t_question_end, is_cancelled)
        finally:
            with self._active_lock:
                self._active -= 1

    def _answer(self, state, session_id, persona, controls, cfg, audio, t0, is_cancelled,
                flight: AnswerInFlight | None = None) -> Iterator[SpeakEvent]:
        """Stream one answer. It stops (interrupted) when the client cancels or, with `flight`, when a new question
        on the session barges in; the conversation then keeps what was sent, or what the player heard if known."""
        mode = cfg.mode
        job = self.scheduler.submit(
            self.engine.answer(state, persona, controls, audio=audio, text=cfg.text, mode=mode.value,
                               load=lambda: self._active, lip_sync=cfg.lip_sync and mode != OutputMode.TEXT_ONLY)
        )
        out_sr = cfg.output_sample_rate or self.engine.sample_rate
        seq = 0
        samples_sent = 0
        resampler: soxr.ResampleStream | None = None
        first_audio: float | None = None
        text_parts: list[str] = []
        done: EngineDone | None = None
        interrupted = False
        try:
            for ev in job.items():
                if is_cancelled() or (flight is not None and flight.stop.is_set()):
                    interrupted = True
                    break
                if isinstance(ev, EngineText):
                    if mode != OutputMode.AUDIO_ONLY:
                        text_parts.append(ev.text)
                        yield TextOut(ev.text)
                elif isinstance(ev, EngineLipSync):
                    if cfg.lip_sync and mode != OutputMode.TEXT_ONLY:
                        yield LipSyncOut([(v.viseme, v.start_ms, v.duration_ms) for v in ev.events.visemes],
                                         [(w.text, w.start_ms, w.end_ms) for w in ev.events.words])
                elif isinstance(ev, EngineAudio):
                    if mode == OutputMode.TEXT_ONLY or ev.wav.size == 0:
                        continue
                    if resampler is None and ev.sample_rate != out_sr:
                        # one stream per answer: chunk-by-chunk resampling would click at every chunk boundary
                        resampler = soxr.ResampleStream(ev.sample_rate, out_sr, 1, dtype="float32", quality="HQ")
                    wav = ev.wav if resampler is None else resampler.resample_chunk(ev.wav, last=False)
                    if wav.size == 0:
                        continue
                    if first_audio is None:
                        first_audio = time.perf_counter()
                    # counted before the yield: the transport may be stopped (a cancel) while it sends this chunk,
                    # and the client may well have it by then; what was sent belongs in the history
                    seq += 1
                    samples_sent += len(wav)
                    yield AudioOut(float_to_pcm16(wav), out_sr, seq - 1)
                elif isinstance(ev, EngineDone):
                    done = ev
                    tail = resampler.resample_chunk(np.zeros(0, np.float32), last=True) if resampler else None
                    if tail is not None and tail.size:
                        seq += 1
                        samples_sent += len(tail)
                        yield AudioOut(float_to_pcm16(tail), out_sr, seq - 1)
        except GeneratorExit:  # the transport stopped reading: the client cancelled
            interrupted = True
            raise
        finally:
            if interrupted or done is None:
                job.cancel()
                for _ in job.items():  # drain so the engine generator is closed before we touch the state
                    pass
                spoken = samples_sent / out_sr
                if flight is not None and flight.stop.is_set() and flight.heard_seconds is not None:
                    spoken = min(spoken, max(flight.heard_seconds, 0.0))
                self.engine.interrupted(state, spoken_seconds=spoken)
        t_end = time.perf_counter()
        timings = Timings(**(done.timings if done else {}))
        timings.total_ms = (t_end - t0) * 1000
        timings.time_to_first_audio_ms = ((first_audio - t0) * 1000) if first_audio else 0.0
        timings.queued_ms = self.scheduler.queued_ms(job)
        spoken = done.spoken_text if done else "".join(text_parts)
        yield EndOut(session_id, spoken, samples_sent / out_sr, timings, interrupted)
