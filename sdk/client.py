"""A typed, streaming gRPC client for the npc-voice server."""

from __future__ import annotations

import time
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np

from npc_server.service.protos import pb, rpc

CHUNK_BYTES = 32000  # 1 s of 16 kHz s16le per message


class NpcError(Exception):
    """A call failed; `code` is the gRPC status code name (e.g. 'NOT_FOUND'), `message` the server's text."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


def _pcm_samples(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0


@dataclass
class AudioEvent:
    pcm: bytes  # s16le mono
    sample_rate: int
    sequence: int

    def samples(self) -> np.ndarray:
        return _pcm_samples(self.pcm)


@dataclass
class TextEvent:
    text: str  # subtitle delta


@dataclass
class LipSyncEvent:
    """Mouth shapes and words on the answer's audio time line (ms from its first sample); asked with `lip_sync=True`.
    visemes: (viseme, start_ms, duration_ms), the viseme one of sil PP FF TH DD kk CH SS nn RR aa E I O U;
    words: (text, start_ms, end_ms)."""

    visemes: list[tuple[str, float, float]]
    words: list[tuple[str, float, float]]


@dataclass
class EndEvent:
    session_id: str
    text: str  # full subtitle of what was spoken
    audio_seconds: float
    interrupted: bool
    timings: dict  # time_to_first_audio_ms, total_ms, tokenize_ms, prefill_ms, decode_ms, vocoder_ms, ...


Event = AudioEvent | TextEvent | LipSyncEvent | EndEvent


@dataclass
class Answer:
    """Everything one `ask()` returned, collected."""

    text: str
    pcm: bytes
    sample_rate: int
    end: EndEvent
    visemes: list[tuple[str, float, float]] = field(default_factory=list)  # with lip_sync=True
    words: list[tuple[str, float, float]] = field(default_factory=list)

    def samples(self) -> np.ndarray:
        """The whole answer as float32 samples in [-1, 1) at `sample_rate`."""
        return _pcm_samples(self.pcm)

    def save_wav(self, path: str | Path) -> None:
        with wave.open(str(path), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(self.sample_rate)
            w.writeframes(self.pcm)


class Speech:
    """An answer being streamed: iterate for events; `cancel()` interrupts the NPC mid-sentence."""

    def __init__(self, call):
        self._call = call

    def __iter__(self) -> Iterator[Event]:
        try:
            for msg in self._call:
                kind = msg.WhichOneof("kind")
                if kind == "audio":
                    yield AudioEvent(msg.audio.pcm, msg.audio.sample_rate, msg.audio.sequence)
                elif kind == "text":
                    yield TextEvent(msg.text.text)
                elif kind == "lip_sync":
                    ls = msg.lip_sync
                    yield LipSyncEvent([(v.viseme, v.start_ms, v.duration_ms) for v in ls.visemes],
                                       [(w.text, w.start_ms, w.end_ms) for w in ls.words])
                elif kind == "end":
                    e = msg.end
                    t = e.timings
                    yield EndEvent(e.session_id, e.text, e.audio_seconds, e.interrupted,
                                   {f.name: getattr(t, f.name) for f in t.DESCRIPTOR.fields})
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED:
                return
            raise NpcError(exc.code().name, exc.details() or "") from None

    def cancel(self) -> None:
        self._call.cancel()


def _read_audio_file(path: str | Path) -> bytes:
    return Path(path).read_bytes()


class NpcClient:
    """Client of one npc-voice server.

    >>> client = NpcClient("127.0.0.1:50051", token="secret")
    >>> for event in client.speak(npc="innkeeper", audio="question.wav"):
    ...     if isinstance(event, TextEvent): print(event.text, end="")
    """

    def __init__(self, target: str = "127.0.0.1:50051", token: str | None = None, client_id: str | None = None,
                 timeout: float = 120.0, tls: bool = False, tls_ca: str | Path | bytes | None = None):
        """`tls`: talk TLS to a server started with --tls-cert, trusting the system's certificate authorities;
        `tls_ca`: trust this PEM certificate (a path or its bytes) instead, e.g. the server's self-signed one."""
        options = [("grpc.max_receive_message_length", 16 << 20)]
        if tls or tls_ca is not None:
            roots = tls_ca if isinstance(tls_ca, (bytes, type(None))) else Path(tls_ca).read_bytes()
            self._channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=roots), options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = rpc.NpcVoiceStub(self._channel)
        self._metadata = []
        if token:
            self._metadata.append(("authorization", f"Bearer {token}"))
        if client_id:
            self._metadata.append(("x-client-id", client_id))
        self.timeout = timeout

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "NpcClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _unary(self, method, request):
        try:
            return method(request, metadata=self._metadata, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise NpcError(exc.code().name, exc.details() or "") from None

    # ---- calls ---------------------------------------------------------------------------------------------

    def health(self) -> dict:
        r = self._unary(self._stub.Health, pb.HealthRequest())
        return {f.name: getattr(r, f.name) for f in r.DESCRIPTOR.fields}

    def list_personas(self) -> list[dict]:
        r = self._unary(self._stub.ListPersonas, pb.ListPersonasRequest())
        return [{f.name: getattr(p, f.name) for f in p.DESCRIPTOR.fields} for p in r.personas]

    def reload_personas(self) -> dict:
        r = self._unary(self._stub.ReloadPersonas, pb.ReloadPersonasRequest())
        return {"loaded": list(r.loaded), "changed": list(r.changed), "removed": list(r.removed),
                "errors": list(r.errors)}

    def open_session(self, npc: str, session_id: str = "") -> str:
        return self._unary(self._stub.OpenSession, pb.OpenSessionRequest(npc_id=npc, session_id=session_id)).session_id

    def close_session(self, session_id: str) -> bool:
        return self._unary(self._stub.CloseSession, pb.CloseSessionRequest(session_id=session_id)).closed

    def speak(
        self,
        npc: str,
        audio: str | Path | bytes | np.ndarray | None = None,
        *,
        sample_rate: int = 16000,
        session: str = "",
        text: str = "",
        emotion: str | None = None,
        speed: float | None = None,
        pitch: float | None = None,
        language: str | None = None,
        accent: str | None = None,
        output_sample_rate: int = 0,
        mode: str = "audio_and_text",
        lip_sync: bool = False,
        heard_seconds: float | None = None,
        chunk_bytes: int = CHUNK_BYTES,
        realtime: bool = False,
    ) -> Speech:
        """Ask `npc` a question and stream the answer.

        `audio` is a wav/flac/ogg file path, the bytes of such a file, or a float32 numpy array at `sample_rate`.
        `lip_sync`: also stream LipSyncEvents (visemes and word timings; model v2 servers).
        A question on a `session` stops the session's answer in flight (barge-in); `heard_seconds`: how much of it
        the player heard, which the conversation keeps (default: all that was sent).
        `realtime`: send numpy audio as a live microphone would, in 100 ms chunks at the pace it is spoken (the
        server may work on the question while it arrives); otherwise as fast as possible, `chunk_bytes` at a time.
        """
        overrides = pb.Overrides()
        for name, value in (("emotion", emotion), ("speed", speed), ("pitch", pitch), ("language", language),
                            ("accent", accent)):
            if value is not None:
                setattr(overrides, name, value)
        if isinstance(audio, np.ndarray):
            if not np.all(np.isfinite(audio)):
                raise ValueError("audio contains NaN or infinite samples")
            data = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
            fmt = pb.AudioFormat(encoding=pb.PCM_S16LE, sample_rate=sample_rate, channels=1)
        elif audio is None:
            data, fmt = b"", pb.AudioFormat(encoding=pb.PCM_S16LE, sample_rate=16000)
        else:
            data = audio if isinstance(audio, (bytes, bytearray)) else _read_audio_file(audio)
            fmt = pb.AudioFormat(encoding=pb.WAV)
        modes = {"audio_and_text": pb.AUDIO_AND_TEXT, "text_only": pb.TEXT_ONLY, "audio_only": pb.AUDIO_ONLY}
        if mode not in modes:
            raise ValueError(f"mode must be one of {', '.join(modes)}")
        config = pb.SpeakConfig(npc_id=npc, session_id=session, input_format=fmt, text=text, overrides=overrides,
                                output_sample_rate=output_sample_rate, mode=modes[mode], lip_sync=lip_sync)
        if heard_seconds is not None:
            if not heard_seconds >= 0:
                raise ValueError("heard_seconds must be >= 0")
            config.heard_seconds = heard_seconds

        pace = 0.0
        if realtime and isinstance(audio, np.ndarray):
            chunk_bytes, pace = 2 * sample_rate // 10, 0.1  # 100 ms of s16le mono per chunk, 100 ms apart

        def requests():
            yield pb.SpeakRequest(config=config)
            t0 = time.perf_counter()
            for k, i in enumerate(range(0, len(data), chunk_bytes)):
                if pace:  # chunk k is complete (spoken) at (k + 1) x 100 ms
                    time.sleep(max(0.0, t0 + (k + 1) * pace - time.perf_counter()))
                yield pb.SpeakRequest(audio=bytes(data[i:i + chunk_bytes]))

        call = self._stub.Speak(requests(), metadata=self._metadata, timeout=self.timeout)
        return Speech(call)

    def ask(self, npc: str, audio=None, **kwargs) -> Answer:
        """Speak and collect the whole answer (text, PCM, end message)."""
        pcm, text, sr, end, visemes, words = bytearray(), [], 0, None, [], []
        for ev in self.speak(npc, audio, **kwargs):
            if isinstance(ev, AudioEvent):
                pcm += ev.pcm
                sr = ev.sample_rate
            elif isinstance(ev, TextEvent):
                text.append(ev.text)
            elif isinstance(ev, LipSyncEvent):
                visemes += ev.visemes
                words += ev.words
            else:
                end = ev
        if end is None:
            raise NpcError("UNKNOWN", "the answer stream ended without an end message")
        return Answer("".join(text), bytes(pcm), sr or 24000, end, visemes, words)

    def say(self, npc: str, question: str | Path, out_wav: str | Path, **kwargs) -> Answer:
        """Ask with a wav file and save the spoken answer to `out_wav`."""
        answer = self.ask(npc, question, **kwargs)
        answer.save_wav(out_wav)
        return answer
