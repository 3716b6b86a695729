"""gRPC transport: maps NpcVoice RPCs onto NpcService, with auth from metadata and errors as status codes."""

from __future__ import annotations

import logging
import queue
import threading
from concurrent import futures
from typing import Iterator

import grpc

from npc_server.service import api
from npc_server.service.api import ApiError, ErrorCode
from npc_server.service.auth import bearer_token
from npc_server.service.core import NpcService
from npc_server.service.protos import pb, rpc

log = logging.getLogger("npc_server.grpc")

STATUS = {
    ErrorCode.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorCode.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorCode.INTERNAL: grpc.StatusCode.INTERNAL,
}
AUTH_HEADER = "authorization"  # value: "Bearer <token>"
# threads for the cheap calls (Health, ListPersonas, sessions) beyond those questions and answers may hold
RESERVED_THREADS = 8

_ENCODINGS = {
    pb.AUDIO_ENCODING_UNSPECIFIED: api.AudioEncoding.PCM_S16LE,
    pb.PCM_S16LE: api.AudioEncoding.PCM_S16LE,
    pb.WAV: api.AudioEncoding.WAV,
}
_MODES = {pb.AUDIO_AND_TEXT: api.OutputMode.AUDIO_AND_TEXT, pb.TEXT_ONLY: api.OutputMode.TEXT_ONLY,
          pb.AUDIO_ONLY: api.OutputMode.AUDIO_ONLY}


def config_from_proto(c: "pb.SpeakConfig") -> api.SpeakConfig:
    o = c.overrides
    if c.input_format.encoding not in _ENCODINGS:
        raise ApiError(ErrorCode.INVALID_ARGUMENT, f"unknown audio encoding {c.input_format.encoding}")
    if c.mode not in _MODES:
        raise ApiError(ErrorCode.INVALID_ARGUMENT, f"unknown output mode {c.mode}")
    # sample_rate 0 = not given (proto3 cannot tell): an error once pcm_s16le audio arrives, fine for text alone
    return api.SpeakConfig(
        npc_id=c.npc_id,
        session_id=c.session_id,
        encoding=_ENCODINGS[c.input_format.encoding],
        sample_rate=c.input_format.sample_rate,
        channels=c.input_format.channels,
        text=c.text,
        overrides=api.Overrides(
            emotion=o.emotion if o.HasField("emotion") else None,
            speed=o.speed if o.HasField("speed") else None,
            pitch=o.pitch if o.HasField("pitch") else None,
            language=o.language if o.HasField("language") else None,
            accent=o.accent if o.HasField("accent") else None,
        ),
        output_sample_rate=c.output_sample_rate,
        mode=_MODES[c.mode],
        lip_sync=c.lip_sync,
        heard_seconds=c.heard_seconds if c.HasField("heard_seconds") else None,
    )


def event_to_proto(ev: api.SpeakEvent) -> "pb.SpeakResponse":
    if isinstance(ev, api.AudioOut):
        return pb.SpeakResponse(audio=pb.AudioChunk(pcm=ev.pcm, sample_rate=ev.sample_rate, sequence=ev.sequence))
    if isinstance(ev, api.TextOut):
        return pb.SpeakResponse(text=pb.TextDelta(text=ev.text))
    if isinstance(ev, api.LipSyncOut):
        return pb.SpeakResponse(lip_sync=pb.LipSync(
            visemes=[pb.Viseme(viseme=v, start_ms=s, duration_ms=d) for v, s, d in ev.visemes],
            words=[pb.WordTiming(text=w, start_ms=s, end_ms=e) for w, s, e in ev.words]))
    t = ev.timings
    return pb.SpeakResponse(
        end=pb.SpeakEnd(
            session_id=ev.session_id,
            text=ev.text,
            audio_seconds=ev.audio_seconds,
            interrupted=ev.interrupted,
            timings=pb.Timings(**vars(t)),
        )
    )


def peer_address(peer: str | None) -> str:
    """A gRPC peer ("ipv4:127.0.0.1:5000", "ipv6:[::1]:5000") without its port."""
    peer = peer or "anonymous"
    return peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer


_CLOSED = object()


class _Messages:
    """The request stream of one Speak call, read by a helper thread so that a silent client times out.

    gRPC's request iterator blocks until the next message with no timeout of its own; a question whose client
    sends a config and then nothing would hold its thread for good. `next(timeout)` raises DEADLINE_EXCEEDED
    instead, the call ends, and the helper thread ends with it. The queue is short, so a fast sender waits
    for the reader (gRPC flow control) instead of filling memory.
    """

    def __init__(self, request_iterator: Iterator["pb.SpeakRequest"]):
        self._queue: queue.Queue = queue.Queue(maxsize=4)
        self._stopped = threading.Event()
        threading.Thread(target=self._pump, args=(request_iterator,), name="grpc-question", daemon=True).start()

    def _pump(self, request_iterator) -> None:
        try:
            for message in request_iterator:
                if not self._put(message):
                    return
        except Exception as exc:  # noqa: BLE001 - the call broke (cancelled, too large): handed to the reader
            self._put(exc)
            return
        self._put(_CLOSED)

    def _put(self, item) -> bool:
        while not self._stopped.is_set():
            try:
                self._queue.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def next(self, timeout: float):
        """The next message, or None when the client closed its side of the stream."""
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise ApiError(
                ErrorCode.DEADLINE_EXCEEDED,
                f"no message for {timeout:g} s: send the question's audio as it comes and close the request stream "
                "when the player stops talking",
            ) from None
        if isinstance(item, Exception):
            raise item
        return None if item is _CLOSED else item

    def stop(self) -> None:
        self._stopped.set()


class NpcVoiceServicer(rpc.NpcVoiceServicer):
    def __init__(self, service: NpcService):
        self.service = service

    # every RPC goes through here: auth, then errors -> status codes; nothing a client sends can crash the server
    def _guard(self, context: grpc.ServicerContext) -> str:
        md = dict(context.invocation_metadata() or ())
        token = bearer_token(md.get(AUTH_HEADER))
        return self.service.identify(token, md.get("x-client-id"), peer_address(context.peer()))

    def _fail(self, context: grpc.ServicerContext, exc: BaseException):
        if isinstance(exc, ApiError):
            context.abort(STATUS[exc.code], exc.message)
        log.exception("internal error")
        context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")

    def _unary(self, context, fn):
        try:
            client = self._guard(context)
            return fn(client)
        except Exception as exc:  # noqa: BLE001 - converted into a status
            self._fail(context, exc)

    def Speak(self, request_iterator: Iterator["pb.SpeakRequest"], context: grpc.ServicerContext):
        question = None
        messages = None
        try:
            client = self._guard(context)
            question = self.service.hold_question(client)  # before anything is read: silent calls count too
            timeout = self.service.limits.question_timeout_seconds
            messages = _Messages(request_iterator)
            first = messages.next(timeout)
            if first is None or first.WhichOneof("kind") != "config":
                raise ApiError(ErrorCode.INVALID_ARGUMENT, "the first Speak message must be a config")
            cfg = config_from_proto(first.config)

            def audio_chunks():
                while (req := messages.next(timeout)) is not None:
                    kind = req.WhichOneof("kind")
                    if kind == "config":
                        raise ApiError(ErrorCode.INVALID_ARGUMENT, "config may only be sent once, first")
                    if kind == "audio":
                        yield req.audio

            cancelled = threading.Event()
            context.add_callback(cancelled.set)
            events = self.service.speak(client, cfg, audio_chunks(), is_cancelled=cancelled.is_set,
                                        question=question)
            try:
                for ev in events:
                    yield event_to_proto(ev)
            finally:
                events.close()
        except grpc.RpcError:  # the client's side of the stream broke (cancelled, too large): nothing to answer
            return
        except Exception as exc:  # noqa: BLE001
            self._fail(context, exc)
        finally:
            if question is not None:
                question.release()
            if messages is not None:
                messages.stop()

    def ListPersonas(self, request, context):
        def run(client):
            return pb.ListPersonasResponse(
                personas=[
                    pb.Persona(**p.summary()) for p in self.service.list_personas()
                ]
            )

        return self._unary(context, run)

    def ReloadPersonas(self, request, context):
        def run(client):
            r = self.service.reload_personas()
            return pb.ReloadPersonasResponse(
                loaded=r.loaded, changed=r.changed, removed=r.removed, errors=[str(e) for e in r.errors]
            )

        return self._unary(context, run)

    def OpenSession(self, request, context):
        return self._unary(
            context,
            lambda client: pb.OpenSessionResponse(
                session_id=self.service.open_session(client, request.npc_id, request.session_id)
            ),
        )

    def CloseSession(self, request, context):
        return self._unary(
            context, lambda client: pb.CloseSessionResponse(closed=self.service.close_session(client, request.session_id))
        )

    def Health(self, request, context):
        return self._unary(context, lambda client: pb.HealthResponse(**vars(self.service.health())))


def worker_threads(limits: api.Limits) -> int:
    """Threads of the gRPC server: one per question that may be arriving and per answer that may be streaming
    (both are bounded, so Speak calls cannot hold more), plus RESERVED_THREADS for every other call."""
    return limits.max_pending_questions + limits.max_concurrent_requests + RESERVED_THREADS


def start_grpc(service: NpcService, host: str, port: int, tls: tuple[bytes, bytes] | None = None,
               ) -> tuple[grpc.Server, int]:
    """Start the gRPC server in background threads; returns (server, bound port).

    `tls`: (certificate chain PEM, private key PEM) to serve TLS only. Raises OSError when the address cannot be
    bound."""
    limits = service.limits
    threads = worker_threads(limits)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="grpc"),
        options=[
            # above our own chunk limit, so an oversized chunk gets our readable message, not a transport error
            ("grpc.max_receive_message_length", 2 * limits.max_chunk_bytes + 65536),
            ("grpc.max_send_message_length", 8 << 20),
        ],
        # beyond this many calls at once gRPC itself answers RESOURCE_EXHAUSTED instead of queueing them
        maximum_concurrent_rpcs=threads * 2,
    )
    rpc.add_NpcVoiceServicer_to_server(NpcVoiceServicer(service), server)
    address = f"{host}:{port}"
    try:
        if tls is None:
            bound = server.add_insecure_port(address)
        else:
            cert_chain, private_key = tls
            bound = server.add_secure_port(address, grpc.ssl_server_credentials([(private_key, cert_chain)]))
    except RuntimeError:  # grpcio >= 1.60 raises instead of returning 0
        bound = 0
    if bound == 0:
        raise OSError(f"cannot listen on {address} (gRPC): the port is in use, or the address is not this machine's")
    server.start()
    return server, bound
