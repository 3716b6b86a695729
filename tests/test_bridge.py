"""Python reference test of the WebSocket bridge (unity_bridge/protocol.md) against a live server on loopback."""

from __future__ import annotations

import ssl
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import msgpack
import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from npc_server.audio import load_audio
from npc_server.engine import Engine
from npc_server.personas import PersonaStore
from npc_server.service.api import Limits
from npc_server.service.bridge import start_bridge
from npc_server.service.core import NpcService

from npc_server.tiny import capped_personas

TOKEN = "bridge-token"
CANCEL_NPC = "quest_giver"  # the one persona allowed a long answer, so a cancel lands mid-answer
pytestmark = pytest.mark.usefixtures("no_handler_crashes")


@pytest.fixture(scope="module")
def bridge(tiny_model_dir, tmp_path_factory):
    personas = capped_personas(tmp_path_factory.mktemp("bridge_personas"), long_npc=CANCEL_NPC)
    limits = Limits(max_audio_seconds=10, max_sessions_per_client=3, max_pending_questions=6,
                    max_pending_questions_per_client=3, question_timeout_seconds=2)
    service = NpcService(Engine.from_pretrained(tiny_model_dir), PersonaStore(personas), limits, auth_token=TOKEN)
    server, port = start_bridge(service, "127.0.0.1", 0)
    yield {"port": port, "service": service, "personas": personas}
    server.stop()
    service.shutdown()


class Conn:
    """A minimal synchronous bridge client: msgpack maps in binary WebSocket frames."""

    def __init__(self, port: int, hello: dict | None = None, handshake: bool = True, client_id: str = "py-ref",
                 ssl_context: ssl.SSLContext | None = None):
        self._stack = ExitStack()
        scheme = "wss" if ssl_context else "ws"
        self.ws = self._stack.enter_context(connect(f"{scheme}://127.0.0.1:{port}", max_size=8 << 20, open_timeout=10,
                                                    ssl=ssl_context))
        self.welcome = None
        if handshake:
            self.send(hello or {"type": "hello", "version": 1, "token": TOKEN, "client_id": client_id})
            self.welcome = self.recv()

    def send(self, frame) -> None:
        self.ws.send(msgpack.packb(frame, use_bin_type=True))

    def recv(self, timeout: float = 60) -> dict:
        return msgpack.unpackb(self.ws.recv(timeout), raw=False, strict_map_key=False)

    def request(self, frame: dict) -> dict:
        self.send(frame)
        return self.recv()

    def speak(self, req_id, config: dict, audio: bytes = b"", chunk: int = 8192, cancel_after_audio: int = 0):
        """Send a question, collect the answer's frames; cancel after that many audio frames when asked."""
        self.send({"type": "speak", "id": req_id, "config": config})
        for i in range(0, len(audio), chunk):
            self.send({"type": "audio", "id": req_id, "data": audio[i:i + chunk]})
        self.send({"type": "end_audio", "id": req_id})
        frames, n_audio = [], 0
        while True:
            f = self.recv()
            assert f["id"] == req_id, f
            frames.append(f)
            if f["type"] == "audio":
                n_audio += 1
                if n_audio == cancel_after_audio:
                    self.send({"type": "cancel", "id": req_id})
            if f["type"] in ("end", "error"):
                return frames

    def close(self) -> None:
        self._stack.close()


def split(frames):
    audio = [f for f in frames if f["type"] == "audio"]
    text = "".join(f["text"] for f in frames if f["type"] == "text")
    return audio, text, frames[-1]


@pytest.fixture()
def conn(bridge):
    c = Conn(bridge["port"])
    yield c
    c.close()


def pcm16(wav: np.ndarray) -> bytes:
    return (np.clip(wav, -1, 1) * 32767).astype("<i2").tobytes()


# ---- handshake ---------------------------------------------------------------------------------------------


def test_handshake_welcome(conn, bridge):
    w = conn.welcome
    assert w["type"] == "welcome" and w["version"] == 1 and w["server"].startswith("npc-voice ")
    assert isinstance(w["model"], str) and w["sample_rate"] == bridge["service"].engine.sample_rate


@pytest.mark.parametrize(
    "hello,code,close_code",
    [
        ({"type": "hello", "version": 1, "token": "wrong"}, "UNAUTHENTICATED", 1008),
        ({"type": "hello", "version": 1}, "UNAUTHENTICATED", 1008),
        ({"type": "hello", "version": 2, "token": TOKEN}, "FAILED_PRECONDITION", 1002),
        ({"type": "health", "id": 1}, "INVALID_ARGUMENT", 1002),
    ],
)
def test_handshake_refusals_close_the_socket(bridge, hello, code, close_code):
    c = Conn(bridge["port"], handshake=False)
    c.send(hello)
    err = c.recv()
    assert err["type"] == "error" and err["code"] == code and err["id"] is None and err["message"]
    if code == "FAILED_PRECONDITION":
        assert "speaks 1" in err["message"]
    with pytest.raises(ConnectionClosed) as e:
        c.recv(timeout=10)
    assert e.value.rcvd.code == close_code


def test_handshake_garbage_first_frame(bridge):
    c = Conn(bridge["port"], handshake=False)
    c.ws.send(b"\xc1\xc1 not msgpack")
    assert c.recv()["code"] == "INVALID_ARGUMENT"
    with pytest.raises(ConnectionClosed) as e:
        c.recv(timeout=10)
    assert e.value.rcvd.code == 1002


# ---- speaking ----------------------------------------------------------------------------------------------


def test_speak_wav_streams_text_audio_end(conn, question_wav):
    frames = conn.speak(7, {"npc_id": "innkeeper", "encoding": "wav", "output_sample_rate": 16000},
                        question_wav.read_bytes())
    audio, text, end = split(frames)
    assert end["type"] == "end" and end["interrupted"] is False and end["session_id"] == ""
    assert audio and [a["seq"] for a in audio] == list(range(len(audio)))
    assert all(a["sample_rate"] == 16000 and isinstance(a["pcm"], bytes) for a in audio)
    samples = sum(len(a["pcm"]) // 2 for a in audio)
    assert end["audio_seconds"] == pytest.approx(samples / 16000, abs=1e-6)
    assert text and end["text"] == text
    t = end["timings"]
    assert set(t) >= {"time_to_first_audio_ms", "total_ms", "tokenize_ms", "prefill_ms", "decode_ms", "vocoder_ms",
                      "prefill_tokens", "generated_tokens"}
    assert 0 < t["time_to_first_audio_ms"] <= t["total_ms"] and t["prefill_tokens"] > 0


def test_speak_pcm_input_at_its_own_rate(conn, question_wav):
    wav, sr = load_audio(question_wav)
    frames = conn.speak("q-pcm", {"npc_id": "merchant", "encoding": "pcm_s16le", "sample_rate": sr, "channels": 1},
                        pcm16(wav), chunk=3000)
    audio, text, end = split(frames)
    assert end["type"] == "end", end
    rate = audio[0]["sample_rate"]
    assert end["audio_seconds"] == pytest.approx(sum(len(a["pcm"]) // 2 for a in audio) / rate, abs=1e-6)
    # stereo is mixed down; typed text alone is a question too
    st = np.frombuffer(pcm16(wav[:8000]), "<i2").repeat(2).tobytes()  # L R L R ...
    assert split(conn.speak("q-st", {"npc_id": "merchant", "sample_rate": sr, "channels": 2}, st))[2]["type"] == "end"
    assert split(conn.speak("q-txt", {"npc_id": "merchant", "text": "How much is a sword?"}))[2]["type"] == "end"


def test_modes(conn, question_wav):
    data = question_wav.read_bytes()
    audio, text, end = split(conn.speak(1, {"npc_id": "town_guard", "encoding": "wav", "mode": "text_only"}, data))
    assert end["type"] == "end", end
    assert audio == [] and end["audio_seconds"] == 0 and text
    audio, text, end = split(conn.speak(2, {"npc_id": "town_guard", "encoding": "wav", "mode": "audio_only"}, data))
    assert audio and text == ""


def test_cancel_mid_answer(conn, question_wav):
    frames = conn.speak("c", {"npc_id": CANCEL_NPC, "encoding": "wav", "output_sample_rate": 16000},
                        question_wav.read_bytes(), cancel_after_audio=1)
    audio, _, end = split(frames)
    assert end["type"] == "end" and end["interrupted"] is True
    # audio_seconds counts exactly the audio that left the server, i.e. what we received
    assert end["audio_seconds"] == pytest.approx(sum(len(a["pcm"]) // 2 for a in audio) / 16000, abs=1e-6)
    assert end["audio_seconds"] < 8
    # the id is free again and the connection goes on
    assert split(conn.speak("c", {"npc_id": "innkeeper", "text": "hello"}))[2]["type"] == "end"


def test_two_answers_in_flight_on_one_connection(conn):
    for rid in ("a", "b"):
        conn.send({"type": "speak", "id": rid, "config": {"npc_id": "blacksmith", "text": "Can you fix my sword?"}})
    for rid in ("a", "b"):
        conn.send({"type": "end_audio", "id": rid})
    ends = {}
    while len(ends) < 2:
        f = conn.recv()
        assert f["id"] in ("a", "b") and f["type"] != "error", f
        if f["type"] == "end":
            ends[f["id"]] = f
    assert set(ends) == {"a", "b"}


# ---- other requests ----------------------------------------------------------------------------------------


def test_requests_echo_their_ids(bridge, conn, question_wav):
    h = conn.request({"type": "health", "id": 11})
    assert h["type"] == "health" and h["id"] == 11 and h["status"] == "ok" and h["personas"] >= 5
    p = conn.request({"type": "list_personas", "id": 12})
    assert p["type"] == "personas" and p["id"] == 12
    by_id = {x["id"]: x for x in p["personas"]}
    assert {"innkeeper", "merchant", "blacksmith", CANCEL_NPC} <= set(by_id)
    assert set(by_id["innkeeper"]) == {"id", "name", "role", "language", "accent", "voice", "pitch", "speed",
                                       "default_emotion", "allowed_emotions", "greeting"}

    s = conn.request({"type": "open_session", "id": 13, "npc_id": "innkeeper"})
    assert s["type"] == "session" and s["id"] == 13 and s["session_id"]
    sid = s["session_id"]
    wav = question_wav.read_bytes()
    first = split(conn.speak(14, {"npc_id": "innkeeper", "session_id": sid, "encoding": "wav"}, wav))[2]
    second = split(conn.speak(15, {"npc_id": "innkeeper", "session_id": sid, "encoding": "wav"}, wav))[2]
    assert first["session_id"] == sid == second["session_id"]
    assert second["timings"]["prefill_tokens"] <= first["timings"]["prefill_tokens"] + 1  # KV cache kept
    # a session belongs to its NPC
    err = split(conn.speak(16, {"npc_id": "merchant", "session_id": sid, "text": "hi"}))[2]
    assert err["type"] == "error" and err["code"] == "FAILED_PRECONDITION"
    c = conn.request({"type": "close_session", "id": 17, "session_id": sid})
    assert c == {"type": "closed", "id": 17, "closed": True}
    assert conn.request({"type": "close_session", "id": 18, "session_id": sid})["closed"] is False
    err = split(conn.speak(19, {"npc_id": "innkeeper", "session_id": sid, "text": "hi"}))[2]
    assert err["type"] == "error" and err["code"] == "NOT_FOUND" and err["id"] == 19

    folder: Path = bridge["personas"]
    src = (folder / "blacksmith.yaml").read_text()
    (folder / "smith3.yaml").write_text(src.replace("id: blacksmith", "id: smith_three"))
    try:
        r = conn.request({"type": "reload_personas", "id": 20})
        assert r["type"] == "reloaded" and r["id"] == 20 and "smith_three" in r["loaded"] and r["errors"] == []
    finally:
        (folder / "smith3.yaml").unlink()
        conn.request({"type": "reload_personas", "id": 21})


# ---- garbage -----------------------------------------------------------------------------------------------


GARBAGE = [
    # (raw frame or dict, code, words in the message, id expected in the reply)
    ("a text frame", "INVALID_ARGUMENT", "not text", None),
    (b"\xc1garbage", "INVALID_ARGUMENT", "not valid msgpack", None),
    ([1, 2, 3], "INVALID_ARGUMENT", "must be a map", None),
    ({"id": 3}, "INVALID_ARGUMENT", "must be a map with a string 'type'", None),
    ({"type": 5, "id": 3}, "INVALID_ARGUMENT", "must be a map with a string 'type'", None),
    ({"type": "dance", "id": 4}, "INVALID_ARGUMENT", "unknown frame type 'dance'", 4),
    ({"type": "hello", "id": 5, "version": 1, "token": TOKEN}, "INVALID_ARGUMENT", "unknown frame type 'hello'", 5),
    ({"type": "audio", "id": 99, "data": b"\x00\x00"}, "NOT_FOUND", "no speak request with id 99", 99),
    ({"type": "end_audio", "id": 98}, "NOT_FOUND", "no speak request", 98),
    ({"type": "cancel", "id": 97}, "NOT_FOUND", "no speak request", 97),
    ({"type": "audio", "id": [1, 2], "data": b""}, "INVALID_ARGUMENT", "id must be", None),
    ({"type": "speak", "id": {"a": 1}, "config": {"npc_id": "innkeeper"}}, "INVALID_ARGUMENT", "id must be", None),
    ({"type": "speak", "config": {"npc_id": "innkeeper"}}, "INVALID_ARGUMENT", "needs an 'id'", None),
    ({"type": "speak", "id": 6, "config": "innkeeper"}, "INVALID_ARGUMENT", "config must be a map", 6),
    ({"type": "speak", "id": 7, "config": {"npc_id": 12}}, "INVALID_ARGUMENT", "config.npc_id must be str", 7),
    ({"type": "speak", "id": 8, "config": {"npc_id": "innkeeper", "sample_rate": "fast"}}, "INVALID_ARGUMENT",
     "config.sample_rate must be int", 8),
    ({"type": "speak", "id": 9, "config": {"npc_id": "innkeeper", "sample_rate": True}}, "INVALID_ARGUMENT",
     "config.sample_rate must be int", 9),
    ({"type": "speak", "id": 10, "config": {"npc_id": "innkeeper", "voice": "x"}}, "INVALID_ARGUMENT",
     "unknown config field(s): voice", 10),
    ({"type": "speak", "id": 11, "config": {"npc_id": "innkeeper", "overrides": {"speed": "fast"}}},
     "INVALID_ARGUMENT", "overrides.speed must be a number", 11),
    ({"type": "speak", "id": 12, "config": {"npc_id": "innkeeper", "overrides": {"timbre": 1}}},
     "INVALID_ARGUMENT", "unknown override(s): timbre", 12),
    ({"type": "speak", "id": 13, "config": {"npc_id": "innkeeper", "encoding": "mp3"}}, "INVALID_ARGUMENT", "mp3", 13),
    ({"type": "speak", "id": 14, "config": {"npc_id": "innkeeper", "mode": "loud"}}, "INVALID_ARGUMENT", "loud", 14),
    ({"type": "speak", "id": 20, "config": {"npc_id": "innkeeper", "lip_sync": "yes"}}, "INVALID_ARGUMENT",
     "config.lip_sync must be true or false", 20),
    ({"type": "speak", "id": 21, "config": {"npc_id": "innkeeper", "heard_seconds": "all"}}, "INVALID_ARGUMENT",
     "config.heard_seconds must be a number", 21),
    ({"type": "speak", "id": 22, "config": {"npc_id": "innkeeper", "text": "hi", "heard_seconds": -1}},
     "INVALID_ARGUMENT", "heard_seconds must be >= 0", 22),
    ({"type": "open_session", "id": 15, "npc_id": 3}, "INVALID_ARGUMENT", "must be text", 15),
    ({"type": "open_session", "id": 16, "npc_id": "dragon"}, "NOT_FOUND", "dragon", 16),
    ({"type": "close_session", "id": 17, "session_id": None}, "INVALID_ARGUMENT", "must be text", 17),
]


def test_garbage_gets_error_frames_and_the_connection_stays_up(bridge, conn):
    for raw, code, words, rid in GARBAGE:
        if isinstance(raw, (str, bytes)):
            conn.ws.send(raw)
        else:
            conn.send(raw)
        err = conn.recv()
        assert err["type"] == "error" and err["code"] == code, (raw, err)
        assert words in err["message"], (raw, err)
        assert err["id"] == rid, (raw, err)
    assert conn.request({"type": "health", "id": "still-here"})["status"] == "ok"


def test_bad_speaks_end_with_one_error(conn):
    cases = [
        ({"npc_id": "dragon"}, b"", "NOT_FOUND", "unknown NPC 'dragon'"),
        ({"npc_id": "innkeeper", "overrides": {"emotion": "angry"}, "text": "hi"}, b"", "INVALID_ARGUMENT", "angry"),
        ({"npc_id": "innkeeper", "sample_rate": 16000}, b"\x01\x02\x03", "INVALID_ARGUMENT", "multiple of 2 bytes"),
        ({"npc_id": "innkeeper", "encoding": "wav"}, b"RIFF not a wav", "INVALID_ARGUMENT", "cannot read audio"),
        ({"npc_id": "innkeeper"}, b"", "INVALID_ARGUMENT", "needs audio, text or both"),
        ({"npc_id": "innkeeper", "output_sample_rate": 12345, "text": "hi"}, b"", "INVALID_ARGUMENT",
         "output_sample_rate"),
    ]
    for i, (cfg, audio, code, words) in enumerate(cases):
        frames = conn.speak(100 + i, cfg, audio)
        assert len(frames) == 1 and frames[0]["type"] == "error", frames
        assert frames[0]["code"] == code and words in frames[0]["message"], frames[0]
    # an error ends the request it names (protocol.md): a speak id already in use is refused and its answer ends
    conn.send({"type": "speak", "id": "dup", "config": {"npc_id": "innkeeper", "text": "hi"}})
    conn.send({"type": "speak", "id": "dup", "config": {"npc_id": "innkeeper", "text": "hi"}})
    err = conn.recv()
    assert err["type"] == "error" and err["id"] == "dup" and err["code"] == "INVALID_ARGUMENT"
    assert "already in use" in err["message"]
    conn.send({"type": "end_audio", "id": "dup"})  # too late: ignored, "dup" has ended
    # so does a bad frame of a speak in flight
    conn.send({"type": "speak", "id": "bin", "config": {"npc_id": "innkeeper", "text": "hi"}})
    conn.send({"type": "audio", "id": "bin", "data": "not bytes"})
    err = conn.recv()
    assert err["id"] == "bin" and err["code"] == "INVALID_ARGUMENT" and "audio.data must be binary" in err["message"]
    conn.send({"type": "end_audio", "id": "bin"})
    assert conn.request({"type": "health", "id": "h"})["type"] == "health"  # no answer frames for dup or bin
    with pytest.raises(TimeoutError):
        conn.recv(timeout=1.0)
    # and the ids are free again
    assert split(conn.speak("dup", {"npc_id": "innkeeper", "text": "hi"}))[2]["type"] == "end"


def test_server_survives_oversized_frames_and_vanishing_clients(bridge, question_wav):
    c = Conn(bridge["port"])
    c.ws.send(msgpack.packb({"type": "audio", "id": 1, "data": b"\x00" * (3 << 20)}))
    with pytest.raises(ConnectionClosed) as e:
        c.recv(timeout=10)
    assert e.value.rcvd.code == 1009  # message too big
    # a client that leaves mid-answer
    c = Conn(bridge["port"])
    c.send({"type": "speak", "id": 1, "config": {"npc_id": CANCEL_NPC, "encoding": "wav"}})
    c.send({"type": "audio", "id": 1, "data": question_wav.read_bytes()})
    c.send({"type": "end_audio", "id": 1})
    while c.recv()["type"] != "audio":
        pass
    c.ws.socket.close()  # no close handshake
    deadline = time.time() + 20
    while bridge["service"].health().active_requests and time.time() < deadline:
        time.sleep(0.05)
    assert bridge["service"].health().active_requests == 0
    c = Conn(bridge["port"])
    assert c.request({"type": "health", "id": 1})["status"] == "ok"
    c.close()
    time.sleep(0.5)  # let the vanished connection's handler finish (no_handler_crashes checks it)


# ---- hardening: each test below failed before its fix ------------------------------------------------------------


def _pending(conn: Conn, req_id, npc: str = "innkeeper") -> None:
    """Start a question that sends its config and then nothing."""
    conn.send({"type": "speak", "id": req_id, "config": {"npc_id": npc, "sample_rate": 16000}})


def test_held_open_speaks_are_bounded_and_time_out(bridge):
    """Speaks that never send end_audio used to hold the bridge's few threads for good."""
    service = bridge["service"]
    holders = [Conn(bridge["port"], client_id=f"holder{i}") for i in range(3)]
    probe = Conn(bridge["port"], client_id="probe")
    try:
        t0 = time.monotonic()
        for i in range(3):  # the per-client limit is 3: the 4th of holder0 is refused
            _pending(holders[0], i)
        err = holders[0].request({"type": "speak", "id": 3, "config": {"npc_id": "innkeeper"}})
        assert err["type"] == "error" and err["id"] == 3 and err["code"] == "RESOURCE_EXHAUSTED", err
        for i in range(3):  # 6 in all: holder2's are refused
            _pending(holders[1], i)
        err = holders[2].request({"type": "speak", "id": 0, "config": {"npc_id": "innkeeper"}})
        assert err["code"] == "RESOURCE_EXHAUSTED" and err["id"] == 0, err
        assert service.pending_questions() == 6
        # everything else is still answered at once
        assert probe.request({"type": "health", "id": "h"})["status"] == "ok"
        assert probe.request({"type": "open_session", "id": "s", "npc_id": "innkeeper"})["type"] == "session"
        # after 2 s without a frame each held question ends with DEADLINE_EXCEEDED
        for conn in holders[:2]:
            errors = [conn.recv(timeout=10) for _ in range(3)]
            assert sorted(e["id"] for e in errors) == [0, 1, 2]
            assert all(e["code"] == "DEADLINE_EXCEEDED" and "end_audio" in e["message"] for e in errors), errors
        assert time.monotonic() - t0 < 10
        deadline = time.monotonic() + 5
        while service.pending_questions() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert service.pending_questions() == 0
        assert split(holders[2].speak(1, {"npc_id": "innkeeper", "text": "hello"}))[2]["type"] == "end"
    finally:
        for c in holders + [probe]:
            c.close()


def test_stop_ends_requests_in_flight_with_an_error_frame(bridge):
    """What SIGTERM does to `serve`: requests in flight get an UNAVAILABLE error, then the close (1001)."""
    server, port = start_bridge(bridge["service"], "127.0.0.1", 0)
    c = Conn(port, client_id="stopping")
    try:
        _pending(c, "asking")
        c.send({"type": "speak", "id": "answering", "config": {"npc_id": CANCEL_NPC, "text": "Any work for me?"}})
        c.send({"type": "end_audio", "id": "answering"})
        assert c.request({"type": "health", "id": "h"})["type"] == "health"  # both speaks are registered
        stopper = threading.Thread(target=server.stop)
        stopper.start()
        ended = {}
        with pytest.raises(ConnectionClosed) as e:
            while True:
                f = c.recv(timeout=10)
                assert f["id"] not in ended, f  # nothing after a request's last frame
                if f["type"] in ("end", "error"):
                    ended[f["id"]] = f
        assert e.value.rcvd.code == 1001
        assert ended["asking"]["type"] == "error" and ended["asking"]["code"] == "UNAVAILABLE"
        assert ended["answering"]["type"] in ("end", "error")  # it may have finished before the stop
        stopper.join(10)
    finally:
        c.close()
        server.stop()


def test_tls_bridge(bridge, self_signed_cert):
    cert, key = self_signed_cert
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    server, port = start_bridge(bridge["service"], "127.0.0.1", 0, ssl_context=server_ctx)
    try:
        c = Conn(port, ssl_context=ssl.create_default_context(cafile=str(cert)))
        assert c.welcome["type"] == "welcome"
        assert c.request({"type": "health", "id": 1})["status"] == "ok"
        c.close()
        with pytest.raises(Exception):  # plain ws:// gets no welcome
            Conn(port)
    finally:
        server.stop()
