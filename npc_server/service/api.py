"""Transport-neutral request/response types, limits and errors shared by the gRPC server and the WebSocket bridge."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from npc_server.controls import shorten  # noqa: F401  (the service's error messages quote client values with it)


class ErrorCode(str, Enum):
    """Error kinds; each maps to a gRPC status code and to the bridge's error frame `code`."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    INTERNAL = "INTERNAL"


MAX_MESSAGE_CHARS = 300  # an error message never grows with what the client sent


class ApiError(Exception):
    """A client-facing error with a readable message (cut to MAX_MESSAGE_CHARS)."""

    def __init__(self, code: ErrorCode, message: str):
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[: MAX_MESSAGE_CHARS - 3] + "..."
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class Limits:
    """Bounds on what one client may ask; every one is checked before any model work is done."""

    max_audio_seconds: float = 30.0
    max_chunk_bytes: int = 1 << 20  # one audio chunk
    max_request_bytes: int = 16 << 20  # all audio of one question
    max_text_chars: int = 1000
    max_sessions_per_client: int = 16
    max_sessions: int = 256
    max_session_memory_mb: float = 512.0  # all sessions' KV caches together
    session_idle_seconds: float = 600.0
    max_concurrent_requests: int = 16  # answers admitted at once (more are refused as busy)
    # answers generated at once; later admitted ones wait in line (4: what 2 cores keep in real time, `bench`)
    playing_answers: int = 4
    # questions still arriving (config sent, audio not finished): each holds a connection thread while it waits
    max_pending_questions: int = 32
    max_pending_questions_per_client: int = 8
    question_timeout_seconds: float = 10.0  # longest silence between two messages of a question


@dataclass
class Overrides:
    emotion: str | None = None
    speed: float | None = None
    pitch: float | None = None
    language: str | None = None
    accent: str | None = None


class AudioEncoding(str, Enum):
    PCM_S16LE = "pcm_s16le"
    WAV = "wav"


class OutputMode(str, Enum):
    AUDIO_AND_TEXT = "audio_and_text"
    TEXT_ONLY = "text_only"
    AUDIO_ONLY = "audio_only"


@dataclass
class SpeakConfig:
    npc_id: str
    session_id: str = ""
    encoding: AudioEncoding = AudioEncoding.PCM_S16LE
    sample_rate: int = 16000  # of pcm_s16le audio; 0 = not given (an error once such audio arrives)
    channels: int = 1
    text: str = ""
    overrides: Overrides = field(default_factory=Overrides)
    output_sample_rate: int = 0
    mode: OutputMode = OutputMode.AUDIO_AND_TEXT
    lip_sync: bool = False  # also stream LipSyncOut events (an engine without alignment sends none)
    # barge-in: a question on a session stops the session's answer in flight; the history keeps this many seconds
    # of it (what the player heard), or all that was sent when None
    heard_seconds: float | None = None


# ---- events streamed back --------------------------------------------------------------------------------------


@dataclass
class AudioOut:
    pcm: bytes  # s16le mono
    sample_rate: int
    sequence: int


@dataclass
class TextOut:
    text: str


@dataclass
class LipSyncOut:
    """Visemes (viseme, start_ms, duration_ms) and words (text, start_ms, end_ms) on the answer's audio time line."""

    visemes: list[tuple[str, float, float]]
    words: list[tuple[str, float, float]]


@dataclass
class Timings:
    time_to_first_audio_ms: float = 0.0
    total_ms: float = 0.0
    tokenize_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    vocoder_ms: float = 0.0
    prefill_tokens: int = 0
    generated_tokens: int = 0
    cached_tokens: int = 0
    prefill_ahead_ms: float = 0.0  # thinker time spent on the question while it arrived (model v2)
    talker_ms: float = 0.0  # model v2: the talker's time (answer text -> audio tokens); decode_ms is then the thinker's
    queued_ms: float = 0.0  # time the answer waited in line for a turn (`--playing-answers`); in time_to_first_audio_ms


@dataclass
class EndOut:
    session_id: str
    text: str
    audio_seconds: float
    timings: Timings
    interrupted: bool = False


SpeakEvent = AudioOut | TextOut | LipSyncOut | EndOut
