"""WebSocket bridge for game engines: the gRPC API's messages as msgpack frames (see unity_bridge/protocol.md)."""

from __future__ import annotations

import asyncio
import logging
import queue
import ssl
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

import msgpack
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from npc_server import __version__
from npc_server.service import api
from npc_server.service.api import ApiError, ErrorCode, shorten
from npc_server.service.core import NpcService, QuestionSlot

log = logging.getLogger("npc_server.bridge")

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 2 << 20
FINISHED_IDS_KEPT = 256  # late audio/end_audio/cancel for these recently ended speak ids are ignored, not errors
_END = object()


def _err(code: ErrorCode, message: str, req_id: Any = None) -> dict:
    return {"type": "error", "id": req_id, "code": code.value, "message": message}


def _names(keys) -> str:
    """Map keys a client sent, for an error message: a few, each cut short."""
    names = sorted(str(k) if len(str(k)) <= 30 else str(k)[:27] + "..." for k in keys)
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def config_from_frame(c: Any) -> api.SpeakConfig:
    """A speak frame's `config` map -> SpeakConfig, with readable errors for wrong fields or types."""
    if not isinstance(c, dict):
        raise ApiError(ErrorCode.INVALID_ARGUMENT, "speak.config must be a map")
    allowed = {"npc_id", "session_id", "encoding", "sample_rate", "channels", "text", "overrides",
               "output_sample_rate", "mode", "lip_sync", "heard_seconds"}
    unknown = set(c) - allowed
    if unknown:
        raise ApiError(ErrorCode.INVALID_ARGUMENT, f"unknown config field(s): {_names(unknown)}")

    def get(name, typ, default):
        v = c.get(name, default)
        if v is None:
            return default
        if typ is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, typ) or isinstance(v, bool):
            raise ApiError(ErrorCode.INVALID_ARGUMENT, f"config.{name} must be {typ.__name__}")
        return v

    o = c.get("overrides") or {}
    if not isinstance(o, dict):
        raise ApiError(ErrorCode.INVALID_ARGUMENT, "config.overrides must be a map")
    bad = set(o) - {"emotion", "speed", "pitch", "language", "accent"}
    if bad:
        raise ApiError(ErrorCode.INVALID_ARGUMENT, f"unknown override(s): {_names(bad)}")
    for key in ("speed", "pitch"):
        if key in o and (isinstance(o[key], bool) or not isinstance(o[key], (int, float))):
            raise ApiError(ErrorCode.INVALID_ARGUMENT, f"overrides.{key} must be a number")
    for key in ("emotion", "language", "accent"):
        if key in o and not isinstance(o[key], str):
            raise ApiError(ErrorCode.INVALID_ARGUMENT, f"overrides.{key} must be text")
    lip_sync = c.get("lip_sync", False)
    if not isinstance(lip_sync, bool):
        raise ApiError(ErrorCode.INVALID_ARGUMENT, "config.lip_sync must be true or false")
    heard = c.get("heard_seconds")
    if heard is not None and (isinstance(heard, bool) or not isinstance(heard, (int, float))):
        raise ApiError(ErrorCode.INVALID_ARGUMENT, "config.heard_seconds must be a number")
    encoding, mode = get("encoding", str, "pcm_s16le"), get("mode", str, "audio_and_text")
    if encoding not in {e.value for e in api.AudioEncoding}:
        raise ApiError(ErrorCode.INVALID_ARGUMENT,
                       f"config.encoding {shorten(encoding)} is not one of {', '.join(e.value for e in api.AudioEncoding)}")
    if mode not in {m.value for m in api.OutputMode}:
        raise ApiError(ErrorCode.INVALID_ARGUMENT,
                       f"config.mode {shorten(mode)} is not one of {', '.join(m.value for m in api.OutputMode)}")
    return api.SpeakConfig(
        npc_id=get("npc_id", str, ""),
        session_id=get("session_id", str, ""),
        encoding=api.AudioEncoding(encoding),
        sample_rate=get("sample_rate", int, 16000),
        channels=get("channels", int, 1),
        text=get("text", str, ""),
        overrides=api.Overrides(**{k: o.get(k) for k in ("emotion", "speed", "pitch", "language", "accent")}),
        output_sample_rate=get("output_sample_rate", int, 0),
        mode=api.OutputMode(mode),
        lip_sync=lip_sync,
        heard_seconds=float(heard) if heard is not None else None,
    )


def event_to_frame(ev: api.SpeakEvent, req_id: Any) -> dict:
    if isinstance(ev, api.AudioOut):
        return {"type": "audio", "id": req_id, "pcm": ev.pcm, "sample_rate": ev.sample_rate, "seq": ev.sequence}
    if isinstance(ev, api.TextOut):
        return {"type": "text", "id": req_id, "text": ev.text}
    if isinstance(ev, api.LipSyncOut):
        return {"type": "lip_sync", "id": req_id,
                "visemes": [{"viseme": v, "start_ms": s, "duration_ms": d} for v, s, d in ev.visemes],
                "words": [{"text": w, "start_ms": s, "end_ms": e} for w, s, e in ev.words]}
    return {"type": "end", "id": req_id, "session_id": ev.session_id, "text": ev.text,
            "audio_seconds": ev.audio_seconds, "interrupted": ev.interrupted, "timings": asdict(ev.timings)}


class _Speak:
    """One speak request of a connection: its audio inbox, cancel flag and the slot of its arriving question."""

    def __init__(self, question: QuestionSlot, timeout: float):
        self.audio: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()
        self.ended = False  # its last frame (end or error) is sent: nothing more goes out for it
        self.question = question
        self.timeout = timeout

    def chunks(self):
        while True:
            try:
                item = self.audio.get(timeout=self.timeout)
            except queue.Empty:
                raise ApiError(
                    ErrorCode.DEADLINE_EXCEEDED,
                    f"no audio or end_audio for {self.timeout:g} s: send the question's audio as it comes and "
                    "end_audio when the player stops talking",
                ) from None
            if item is _END:
                return
            if isinstance(item, ApiError):
                raise item
            yield item

    def stop(self, error: ApiError | None = None) -> None:
        """Stop reading the question (with `error` raised to its reader) and interrupt the answer."""
        self.cancelled.set()
        self.audio.put(error if error is not None else _END)


class _Connection:
    """The state of one client connection: its speak requests in flight and how to send it a frame."""

    def __init__(self, ws: ServerConnection):
        self.ws = ws
        self.speaks: dict[Any, _Speak] = {}
        self.finished: OrderedDict = OrderedDict()  # ids of answers that ended (error or end frame already sent)
        self.tasks: set[asyncio.Task] = set()
        self._send_lock = asyncio.Lock()

    async def send(self, frame: dict) -> None:
        async with self._send_lock:
            await self.ws.send(msgpack.packb(frame, use_bin_type=True))

    def finish(self, req_id, sp: _Speak) -> None:
        """The speak's last frame is about to leave: free its id (the client may reuse it once it sees that)."""
        sp.ended = True
        if self.speaks.get(req_id) is sp:
            del self.speaks[req_id]
            self.finished[req_id] = True
            while len(self.finished) > FINISHED_IDS_KEPT:
                self.finished.popitem(last=False)

    async def end_with_error(self, req_id, error: ApiError) -> None:
        """Send `error` for `req_id`; when that is a speak in flight, it ends there (protocol.md: an error ends
        the request it names): its question stops, its answer is interrupted and no more frames follow."""
        sp = self.speaks.get(req_id)
        if sp is not None:
            self.finish(req_id, sp)
            sp.stop(error)
        await self.send(_err(error.code, error.message, req_id))


class Bridge:
    def __init__(self, service: NpcService, host: str, port: int, ssl_context: ssl.SSLContext | None = None):
        self.service = service
        self.host, self.port = host, port
        self.ssl_context = ssl_context
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Future | None = None
        self._thread = threading.Thread(target=self._run, name="bridge", daemon=True)
        self._error: BaseException | None = None
        self._connections: set[_Connection] = set()
        # speak requests run here, not in the loop's default executor (which the small calls use): at most one
        # thread per question that may be arriving and per answer that may be streaming (both bounded)
        limits = service.limits
        self._speak_threads = ThreadPoolExecutor(
            max_workers=limits.max_pending_questions + limits.max_concurrent_requests, thread_name_prefix="bridge-speak"
        )

    def start(self) -> int:
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        return self.port

    def stop(self, timeout: float = 5.0) -> None:
        """End every request in flight with an UNAVAILABLE error frame, close the connections, stop serving."""
        if self._stop is not None and self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout)
            except Exception:  # noqa: BLE001 - stopping goes on regardless
                log.exception("bridge shutdown")
            self._loop.call_soon_threadsafe(self._stop.set_result, None)
        self._thread.join(timeout=timeout)
        self._speak_threads.shutdown(wait=False, cancel_futures=True)

    async def _shutdown(self) -> None:
        going = ApiError(ErrorCode.UNAVAILABLE, "the server is shutting down; this request did not complete")

        async def leave(conn: _Connection) -> None:
            try:
                for req_id in list(conn.speaks):
                    await conn.end_with_error(req_id, going)
            except ConnectionClosed:
                return
            await conn.ws.close(code=1001, reason="server shutting down")

        await asyncio.gather(*(leave(conn) for conn in list(self._connections)))

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._stop = self._loop.create_future()
        async with serve(self._handle, self.host, self.port, max_size=MAX_FRAME_BYTES, ssl=self.ssl_context) as server:
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            await self._stop

    async def _handle(self, ws: ServerConnection) -> None:
        conn = _Connection(ws)
        try:
            client = await self._handshake(ws, conn.send)
        except (ConnectionClosed, ApiError):
            return
        if client is None:
            return
        self._connections.add(conn)
        try:
            async for raw in ws:
                frame: dict | None = None
                try:
                    frame = self._decode(raw)
                    await self._dispatch(frame, client, conn)
                except ApiError as exc:
                    await conn.end_with_error(frame.get("id") if frame else None, exc)
                except Exception as exc:  # noqa: BLE001 - a bug in one request must not drop the connection
                    log.exception("bridge request failed")
                    await conn.end_with_error(frame.get("id") if frame else None,
                                              ApiError(ErrorCode.INTERNAL, f"internal error: {type(exc).__name__}"))
        except ConnectionClosed:
            pass
        finally:
            self._connections.discard(conn)
            for sp in conn.speaks.values():  # the client went away: interrupt its answers
                sp.stop()
            pending = list(conn.tasks)  # a copy: finishing tasks remove themselves from `tasks`
            if pending:
                await asyncio.wait(pending, timeout=5)

    def _decode(self, raw: Any) -> dict:
        if isinstance(raw, str):
            raise ApiError(ErrorCode.INVALID_ARGUMENT, "frames must be binary msgpack, not text")
        try:
            frame = msgpack.unpackb(raw, raw=False, strict_map_key=False)
        except Exception:  # noqa: BLE001 - any garbage is a client error
            raise ApiError(ErrorCode.INVALID_ARGUMENT, "frame is not valid msgpack") from None
        if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
            raise ApiError(ErrorCode.INVALID_ARGUMENT, "frame must be a map with a string 'type'")
        if not isinstance(frame.get("id"), (type(None), bool, int, float, str, bytes)):
            raise ApiError(ErrorCode.INVALID_ARGUMENT, "id must be a scalar (an integer or a string)")
        return frame

    async def _handshake(self, ws: ServerConnection, send) -> str | None:
        try:
            raw = await asyncio.wait_for(ws.recv(), timeout=10)
            frame = self._decode(raw)
            if frame["type"] != "hello":
                raise ApiError(ErrorCode.INVALID_ARGUMENT, "the first frame must be 'hello'")
            version = frame.get("version")
            if version != PROTOCOL_VERSION:
                raise ApiError(ErrorCode.FAILED_PRECONDITION,
                               f"protocol version {shorten(version)} is not supported; this server speaks {PROTOCOL_VERSION}")
            token, cid = frame.get("token"), frame.get("client_id")
            peer = ws.remote_address[0] if ws.remote_address else "anonymous"
            client = self.service.identify(token if isinstance(token, str) else None,
                                           cid if isinstance(cid, str) else None, f"ws:{peer}")
        except ApiError as exc:
            await send(_err(exc.code, exc.message))
            await ws.close(code=1008 if exc.code == ErrorCode.UNAUTHENTICATED else 1002, reason=exc.code.value)
            return None
        except asyncio.TimeoutError:
            await ws.close(code=1002, reason="no hello")
            return None
        await send({"type": "welcome", "version": PROTOCOL_VERSION, "server": f"npc-voice {__version__}",
                    "model": getattr(self.service.engine, "name", ""),
                    "sample_rate": int(self.service.engine.sample_rate)})
        return client

    async def _dispatch(self, frame: dict, client: str, conn: _Connection) -> None:
        kind, req_id = frame["type"], frame.get("id")
        svc = self.service
        if kind == "speak":
            if req_id is None or req_id in conn.speaks:
                raise ApiError(ErrorCode.INVALID_ARGUMENT, "speak needs an 'id' not already in use on this connection")
            cfg = config_from_frame(frame.get("config"))
            question = svc.hold_question(client)
            conn.finished.pop(req_id, None)
            sp = conn.speaks[req_id] = _Speak(question, svc.limits.question_timeout_seconds)
            task = asyncio.create_task(self._run_speak(client, cfg, sp, req_id, conn))
            conn.tasks.add(task)
            task.add_done_callback(conn.tasks.discard)
        elif kind in ("audio", "end_audio", "cancel"):
            sp = conn.speaks.get(req_id)
            if sp is None and req_id in conn.finished:
                return  # the answer already ended (e.g. an early error); the client could not know yet
            if sp is None:
                raise ApiError(ErrorCode.NOT_FOUND, f"no speak request with id {shorten(req_id)} on this connection")
            if kind == "audio":
                data = frame.get("data")
                if not isinstance(data, (bytes, bytearray)):
                    raise ApiError(ErrorCode.INVALID_ARGUMENT, "audio.data must be binary")
                sp.audio.put(bytes(data))
            elif kind == "end_audio":
                sp.audio.put(_END)
            else:
                sp.stop()
        elif kind == "list_personas":
            personas = [p.summary() for p in svc.list_personas()]
            await conn.send({"type": "personas", "id": req_id, "personas": personas})
        elif kind == "reload_personas":
            r = await asyncio.to_thread(svc.reload_personas)
            await conn.send({"type": "reloaded", "id": req_id, "loaded": r.loaded, "changed": r.changed,
                             "removed": r.removed, "errors": [str(e) for e in r.errors]})
        elif kind == "open_session":
            npc, sid = frame.get("npc_id", ""), frame.get("session_id", "")
            if not isinstance(npc, str) or not isinstance(sid, str):
                raise ApiError(ErrorCode.INVALID_ARGUMENT, "npc_id and session_id must be text")
            sid = await asyncio.to_thread(svc.open_session, client, npc, sid)
            await conn.send({"type": "session", "id": req_id, "session_id": sid})
        elif kind == "close_session":
            sid = frame.get("session_id", "")
            if not isinstance(sid, str):
                raise ApiError(ErrorCode.INVALID_ARGUMENT, "session_id must be text")
            await conn.send({"type": "closed", "id": req_id, "closed": svc.close_session(client, sid)})
        elif kind == "health":
            await conn.send({"type": "health", "id": req_id, **asdict(svc.health())})
        else:
            raise ApiError(ErrorCode.INVALID_ARGUMENT, f"unknown frame type {shorten(kind)}")

    async def _run_speak(self, client: str, cfg: api.SpeakConfig, sp: _Speak, req_id, conn: _Connection) -> None:
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()

        def work() -> None:
            events = self.service.speak(client, cfg, sp.chunks(), is_cancelled=sp.cancelled.is_set,
                                        question=sp.question)
            try:
                for ev in events:
                    loop.call_soon_threadsafe(out.put_nowait, event_to_frame(ev, req_id))
            except ApiError as exc:
                loop.call_soon_threadsafe(out.put_nowait, _err(exc.code, exc.message, req_id))
            except Exception as exc:  # noqa: BLE001 - never let a request kill the server
                log.exception("speak failed")
                loop.call_soon_threadsafe(out.put_nowait,
                                          _err(ErrorCode.INTERNAL, f"internal error: {type(exc).__name__}", req_id))
            finally:
                events.close()
                sp.question.release()
                loop.call_soon_threadsafe(out.put_nowait, _END)

        worker = loop.run_in_executor(self._speak_threads, work)
        try:
            while True:
                frame = await out.get()
                if frame is _END:
                    break
                if sp.ended:  # ended by an error frame from the connection (or shutdown): nothing more for it
                    continue
                if frame["type"] in ("end", "error"):  # free the id before the client can see the last frame
                    conn.finish(req_id, sp)
                try:
                    await conn.send(frame)
                except ConnectionClosed:
                    sp.cancelled.set()
        finally:
            await worker
            conn.finish(req_id, sp)


def start_bridge(service: NpcService, host: str, port: int,
                 ssl_context: ssl.SSLContext | None = None) -> tuple[Bridge, int]:
    """Start the bridge in a background thread; returns (bridge, bound port). `ssl_context`: serve wss:// only.
    Raises OSError when the address cannot be bound."""
    bridge = Bridge(service, host, port, ssl_context)
    return bridge, bridge.start()
