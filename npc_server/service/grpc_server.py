"""gRPC transport: maps NpcVoice RPCs onto NpcService, with auth from metadata and errors as status codes."""

from __future__ import annotations

import logging
import threading
from concurrent import futures
from typing import Iterator

import grpc

from npc_server.service import api
from npc_server.service.api import ApiError, ErrorCode
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
    ErrorCode.INTERNAL: grpc.StatusCode.INTERNAL,
}
AUTH_HEADER = "authorization"  # value: "Bearer <token>"

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
    return api.SpeakConfig(
        npc_id=c.npc_id,
        session_id=c.session_id,
        encoding=_ENCODINGS[c.input_format.encoding],
        sample_rate=c.input_format.sample_rate or 16000,
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
    )


def event_to_proto(ev: api.SpeakEvent) -> "pb.SpeakResponse":
    if isinstance(ev, api.AudioOut):
        return pb.SpeakResponse(audio=pb.AudioChunk(pcm=ev.pcm, sample_rate=ev.sample_rate, sequence=ev.sequence))
    if isinstance(ev, api.TextOut):
        return pb.SpeakResponse(text=pb.TextDelta(text=ev.text))
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


def client_id(declared: str | None, peer: str | None) -> str:
    """Sessions belong to a client: the id it declares (x-client-id), else its address without the port."""
    if declared:
        return declared[:128]
    peer = peer or "anonymous"
    return peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer


class NpcVoiceServicer(rpc.NpcVoiceServicer):
    def __init__(self, service: NpcService):
        self.service = service

    # every RPC goes through here: auth, then errors -> status codes; nothing a client sends can crash the server
    def _guard(self, context: grpc.ServicerContext) -> str:
        md = dict(context.invocation_metadata() or ())
        header = md.get(AUTH_HEADER, "")
        token = header[7:] if header.lower().startswith("bearer ") else header
        self.service.authenticate(token or None)
        return client_id(md.get("x-client-id"), context.peer())

    def _fail(self, context: grpc.ServicerContext, exc: BaseException):
        if isinstance(exc, ApiError):
            context.abort(STATUS[exc.code], exc.message)
        log.exception("internal error")
        context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")

    def _unary(self, context, fn):
        try:
            client = self._guard(context)
            return fn(client)
        except Exception as exc:  # noqa: BLE001 - converted into a status
            self._fail(context, exc)

    def Speak(self, request_iterator: Iterator["pb.SpeakRequest"], context: grpc.ServicerContext):
        try:
            client = self._guard(context)
            first = next(request_iterator, None)
            if first is None or first.WhichOneof("kind") != "config":
                raise ApiError(ErrorCode.INVALID_ARGUMENT, "the first Speak message must be a config")
            cfg = config_from_proto(first.config)

            def audio_chunks():
                for req in request_iterator:
                    kind = req.WhichOneof("kind")
                    if kind == "config":
                        raise ApiError(ErrorCode.INVALID_ARGUMENT, "config may only be sent once, first")
                    if kind == "audio":
                        yield req.audio

            cancelled = threading.Event()
            context.add_callback(cancelled.set)
            events = self.service.speak(client, cfg, audio_chunks(), is_cancelled=cancelled.is_set)
            try:
                for ev in events:
                    yield event_to_proto(ev)
            finally:
                events.close()
        except grpc.RpcError:  # the client's side of the stream broke (cancelled, too large): nothing to answer
            return
        except Exception as exc:  # noqa: BLE001
            self._fail(context, exc)

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


def start_grpc(service: NpcService, host: str, port: int, max_workers: int = 16) -> tuple[grpc.Server, int]:
    """Start the gRPC server in background threads; returns (server, bound port)."""
    limits = service.limits
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        options=[
            # above our own chunk limit, so an oversized chunk gets our readable message, not a transport error
            ("grpc.max_receive_message_length", 2 * limits.max_chunk_bytes + 65536),
            ("grpc.max_send_message_length", 8 << 20),
        ],
        maximum_concurrent_rpcs=max_workers * 4,
    )
    rpc.add_NpcVoiceServicer_to_server(NpcVoiceServicer(service), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC on {host}:{port}")
    server.start()
    return server, bound
