"""A live gRPC server on loopback (tiny untrained model): streaming, sessions, cancellation, reload, every error."""

from __future__ import annotations

import io
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile as sf

from npc_server.audio import load_audio
from npc_server.engine import Engine
from npc_server.personas import PersonaStore
from npc_server.service.api import AudioOut, Limits, SpeakConfig
from npc_server.service.core import NpcService
from npc_server.service.grpc_server import start_grpc
from npc_server.service.protos import pb, rpc
from npc_server.tiny import capped_personas
from sdk import AudioEvent, EndEvent, NpcClient, NpcError, TextEvent

TOKEN = "test-token"


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    personas = capped_personas(tmp_path_factory.mktemp("personas"))
    engine = Engine.from_pretrained(tiny_model_dir)
    limits = Limits(max_audio_seconds=10, max_chunk_bytes=64 * 1024, max_text_chars=200, max_sessions_per_client=3,
                    max_pending_questions=4, max_pending_questions_per_client=2, question_timeout_seconds=2)
    service = NpcService(engine, PersonaStore(personas), limits, auth_token=TOKEN)
    grpc_server, port = start_grpc(service, "127.0.0.1", 0)
    yield {"service": service, "port": port, "personas": personas, "target": f"127.0.0.1:{port}"}
    grpc_server.stop(0)
    service.shutdown()


@pytest.fixture()
def client(server):
    with NpcClient(server["target"], token=TOKEN, client_id="tester") as c:
        yield c


def collect(speech):
    audio, text, end = [], [], None
    for ev in speech:
        if isinstance(ev, AudioEvent):
            audio.append(ev)
        elif isinstance(ev, TextEvent):
            text.append(ev.text)
        else:
            end = ev
    return audio, "".join(text), end


def test_health_and_personas(client):
    h = client.health()
    assert h["status"] == "ok" and h["personas"] >= 5
    ids = {p["id"] for p in client.list_personas()}
    assert {"innkeeper", "town_guard", "merchant", "blacksmith", "quest_giver"} <= ids


def test_spoken_question_streams_text_audio_and_end(client, question_wav):
    audio, text, end = collect(client.speak(npc="innkeeper", audio=question_wav, output_sample_rate=16000))
    assert isinstance(end, EndEvent) and not end.interrupted
    assert audio, "no audio chunks"
    assert [a.sequence for a in audio] == list(range(len(audio)))
    assert all(a.sample_rate == 16000 for a in audio)
    samples = sum(len(a.pcm) // 2 for a in audio)
    assert end.audio_seconds == pytest.approx(samples / 16000, abs=1e-6)
    assert end.text == text
    t = end.timings
    assert 0 < t["time_to_first_audio_ms"] <= t["total_ms"]
    assert t["prefill_tokens"] > 0 and t["generated_tokens"] > 0 and t["tokenize_ms"] > 0


def test_pcm_input_and_modes(client, question_wav):
    wav, sr = load_audio(question_wav)
    audio, text, end = collect(client.speak(npc="merchant", audio=wav, sample_rate=sr, mode="text_only"))
    assert audio == [] and end.audio_seconds == 0
    audio, text, end = collect(client.speak(npc="merchant", audio=wav, sample_rate=sr, mode="audio_only"))
    assert audio and text == ""
    # typed text alone is a valid question
    _, _, end = collect(client.speak(npc="blacksmith", text="How much is a sword?"))
    assert end is not None


def test_realtime_question_is_sent_at_the_pace_it_is_spoken(client, question_wav):
    """`speak(realtime=True)` streams a recording as a microphone would: the question's end (and so the answer)
    cannot come before the audio's own duration; the answer is the same as sent at once."""
    wav, sr = load_audio(question_wav)
    wav = wav[: int(0.6 * sr)]
    t0 = time.perf_counter()
    _, paced, end = collect(client.speak(npc="merchant", audio=wav, sample_rate=sr, mode="text_only", realtime=True))
    assert time.perf_counter() - t0 >= 0.55 and end is not None
    _, at_once, _ = collect(client.speak(npc="merchant", audio=wav, sample_rate=sr, mode="text_only"))
    assert paced == at_once


def test_session_follow_up_prefills_only_the_new_turn(client, question_wav):
    sid = client.open_session("innkeeper")
    _, _, first = collect(client.speak(npc="innkeeper", audio=question_wav, session=sid))
    _, _, second = collect(client.speak(npc="innkeeper", audio=question_wav, session=sid))
    _, _, oneshot = collect(client.speak(npc="innkeeper", audio=question_wav))
    assert first.session_id == sid == second.session_id
    # a one-shot question prefills system + question; a follow-up only its question (+ 1 pending token)
    assert second.timings["prefill_tokens"] <= first.timings["prefill_tokens"] + 1
    assert oneshot.timings["prefill_tokens"] == first.timings["prefill_tokens"]
    assert client.close_session(sid)
    with pytest.raises(NpcError) as e:
        collect(client.speak(npc="innkeeper", audio=question_wav, session=sid))
    assert e.value.code == "NOT_FOUND"


def test_cancel_mid_answer_records_what_was_spoken(server, client, question_wav):
    service = server["service"]
    sid = client.open_session("quest_giver")
    speech = client.speak(npc="quest_giver", audio=question_wav, session=sid, output_sample_rate=16000)
    got = 0
    for ev in speech:
        if isinstance(ev, AudioEvent):
            got += 1
            speech.cancel()
            break
    assert got == 1
    session = service.sessions.get(sid, "tester")
    deadline = time.time() + 10
    while session.busy.locked() and time.time() < deadline:
        time.sleep(0.02)
    state = session.state
    assert state.turns and state.turns[-1][0] == "<interrupted>"
    # the KV cache holds exactly the (rewritten) conversation
    gen_session = state.session
    assert gen_session.cache.get_seq_length() == sum(len(s) for s in gen_session.segments)
    # and the conversation goes on
    _, _, end = collect(client.speak(npc="quest_giver", audio=question_wav, session=sid))
    assert end is not None and not end.interrupted


@pytest.fixture(scope="module")
def long_answers(tiny_model_dir, tmp_path_factory):
    """A server whose quest_giver talks for 8 s (an untrained model babbles to its cap): answers to interrupt."""
    personas = capped_personas(tmp_path_factory.mktemp("long_personas"), long_npc="quest_giver")
    service = NpcService(Engine.from_pretrained(tiny_model_dir), PersonaStore(personas), Limits(), auth_token=TOKEN)
    grpc_server, port = start_grpc(service, "127.0.0.1", 0)
    with NpcClient(f"127.0.0.1:{port}", token=TOKEN, client_id="tester") as c:
        yield service, c
    grpc_server.stop(0)
    service.shutdown()


@pytest.mark.parametrize("heard", [None, 0.0])
def test_a_new_question_on_the_session_stops_the_answer_in_flight(long_answers, question_wav, heard):
    """Barge-in: the player speaks while the NPC answers; the answer stops (its call ends interrupted), the new
    question is answered, and the conversation keeps what was sent, or only what the player heard."""
    service, client = long_answers
    sid = client.open_session("quest_giver")
    first = iter(client.speak(npc="quest_giver", audio=question_wav, session=sid, output_sample_rate=16000))
    assert isinstance(next(e for e in first if isinstance(e, AudioEvent)), AudioEvent)  # the NPC is speaking
    second = client.speak(npc="quest_giver", text="Wait, where is the inn?", session=sid, heard_seconds=heard)
    end = [e for e in first if isinstance(e, EndEvent)][-1]
    assert end.interrupted and 0 < end.audio_seconds < 8
    _, _, end2 = collect(second)
    assert end2 is not None and not end2.interrupted
    turns = service.sessions.get(sid, "tester").state.turns
    assert [t[0] for t in turns][-2:] == ["<interrupted>", "Wait, where is the inn?"]
    if heard == 0.0:
        assert turns[-2][1] == ""  # the player heard none of it: none of it stays in the conversation
    client.close_session(sid)


def test_answers_beyond_playing_answers_wait_in_line(tiny_model_dir, tmp_path, question_wav):
    """With one answer playing at a time, a second client's answer waits until the first has ended, then comes
    whole (queueing, not refusal, not a shared stutter)."""
    personas = capped_personas(tmp_path, long_npc="quest_giver")
    service = NpcService(Engine.from_pretrained(tiny_model_dir), PersonaStore(personas), Limits(playing_answers=1),
                         auth_token=TOKEN, workers=2)
    grpc_server, port = start_grpc(service, "127.0.0.1", 0)
    try:
        with NpcClient(f"127.0.0.1:{port}", token=TOKEN) as a, NpcClient(f"127.0.0.1:{port}", token=TOKEN) as b:
            first = iter(a.speak(npc="quest_giver", audio=question_wav))
            assert isinstance(next(e for e in first if isinstance(e, AudioEvent)), AudioEvent)  # playing
            seen: dict[str, float] = {}

            def second():
                for ev in b.speak(npc="innkeeper", text="Do you have a room?"):
                    seen.setdefault("first_event", time.monotonic())
                    if isinstance(ev, EndEvent):
                        seen["end"], seen["queued_ms"] = time.monotonic(), ev.timings["queued_ms"]

            t = threading.Thread(target=second)
            t.start()
            assert _wait_for(lambda: service.scheduler.waiting() == 1)
            end_first = [e for e in first if isinstance(e, EndEvent)]
            first_done = time.monotonic()
            t.join(30)
            assert end_first and not end_first[-1].interrupted and "end" in seen
            assert seen["first_event"] >= first_done - 0.5  # nothing of the second answer before the first ended
            assert seen["queued_ms"] > 0  # and its timings say how long it waited
            assert service.scheduler.waiting() == 0
    finally:
        grpc_server.stop(0)
        service.shutdown()


def test_reload_personas(server, client):
    folder: Path = server["personas"]
    src = (folder / "blacksmith.yaml").read_text()
    (folder / "smith2.yaml").write_text(src.replace("id: blacksmith", "id: smith_two"))
    (folder / "broken.yaml").write_text(src.replace("id: blacksmith", "id: broken").replace("speed: 0.85", "speed: 7"))
    try:
        r = client.reload_personas()
        assert "smith_two" in r["loaded"] and "smith_two" in r["changed"]
        assert any(re.search(r"broken\.yaml:\d+: voice\.speed: must be between", e) for e in r["errors"])
        assert "smith_two" in {p["id"] for p in client.list_personas()}
    finally:
        (folder / "smith2.yaml").unlink()
        (folder / "broken.yaml").unlink()
        client.reload_personas()


def _flac_bomb() -> bytes:
    """10 min of silence in 14 kB of FLAC: refused from its header, never decoded whole."""
    buf = io.BytesIO()
    sf.write(buf, np.zeros(8000 * 600, np.float32), 8000, format="FLAC")
    return buf.getvalue()


def _nan_wav() -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.full(1600, np.nan, np.float32), 16000, format="WAV", subtype="FLOAT")
    return buf.getvalue()


@pytest.mark.parametrize(
    "kwargs,code,words",
    [
        (dict(npc="dragon"), "NOT_FOUND", "unknown NPC 'dragon'"),
        (dict(npc="innkeeper", session="nope"), "NOT_FOUND", "unknown session"),
        (dict(npc="innkeeper", emotion="angry"), "INVALID_ARGUMENT", "does not allow emotion 'angry'"),
        (dict(npc="innkeeper", speed=9.0), "INVALID_ARGUMENT", "speed must be between"),
        (dict(npc="innkeeper", pitch=-40.0), "INVALID_ARGUMENT", "pitch must be between"),
        (dict(npc="innkeeper", language="klingon"), "INVALID_ARGUMENT", "unknown language"),
        (dict(npc="innkeeper", output_sample_rate=12345), "INVALID_ARGUMENT", "output_sample_rate"),
        (dict(npc="innkeeper", text="x" * 500), "INVALID_ARGUMENT", "limit is 200"),
        (dict(npc="innkeeper", audio=b"not a wav at all"), "INVALID_ARGUMENT",
         "cannot read audio bytes: Format not recognised"),
        (dict(npc="innkeeper", audio=np.zeros(16000 * 11, np.float32)), "INVALID_ARGUMENT", "limit is 10.0 s"),
        (dict(npc="innkeeper", audio=_nan_wav()), "INVALID_ARGUMENT", "audio contains NaN"),
        (dict(npc="innkeeper", audio=_flac_bomb()), "INVALID_ARGUMENT", "audio is 600.0 s long; the limit is 10.0 s"),
        (dict(npc="innkeeper", audio=np.zeros(1600, np.float32), sample_rate=4000), "INVALID_ARGUMENT", "sample_rate"),
        (dict(npc="innkeeper"), "INVALID_ARGUMENT", "needs audio, text or both"),
        (dict(npc="innkeeper", text="hi", chunk_bytes=1), None, None),  # tiny chunks are fine
    ],
)
def test_bad_requests_get_clear_statuses(client, kwargs, code, words):
    if code is None:
        return
    with pytest.raises(NpcError) as e:
        collect(client.speak(**kwargs))
    assert e.value.code == code
    assert words in e.value.message
    assert " at 0x" not in e.value.message  # no memory addresses of server objects


def test_oversized_chunk_rejected(client, question_wav):
    big = np.zeros(70_000, np.float32)  # 140 kB in one chunk > 64 kB limit
    with pytest.raises(NpcError) as e:
        collect(client.speak(npc="innkeeper", audio=big, chunk_bytes=200_000))
    assert e.value.code == "INVALID_ARGUMENT" and "exceeds the limit" in e.value.message


def test_auth_required(server):
    with NpcClient(server["target"]) as anon:
        with pytest.raises(NpcError) as e:
            anon.health()
        assert e.value.code == "UNAUTHENTICATED"
    with NpcClient(server["target"], token="wrong") as bad:
        with pytest.raises(NpcError) as e:
            collect(bad.speak(npc="innkeeper", text="hello"))
        assert e.value.code == "UNAUTHENTICATED"


def test_sessions_per_client_limit(server):
    with NpcClient(server["target"], token=TOKEN, client_id="greedy") as c:
        sids = [c.open_session("merchant") for _ in range(3)]
        # the 4th evicts the least recently used idle one (limit 3)
        c.open_session("merchant")
        with pytest.raises(NpcError):
            collect(c.speak(npc="merchant", text="hi", session=sids[0]))


def test_protocol_violations_and_garbage(server):
    channel = grpc.insecure_channel(server["target"])
    stub = rpc.NpcVoiceStub(channel)
    md = [("authorization", f"Bearer {TOKEN}")]
    # first message must be a config
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Speak(iter([pb.SpeakRequest(audio=b"\x00\x00")]), metadata=md, timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # config twice
    cfg = pb.SpeakConfig(npc_id="innkeeper", text="hi")
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Speak(iter([pb.SpeakRequest(config=cfg), pb.SpeakRequest(config=cfg)]), metadata=md, timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # odd byte count of s16le
    cfg = pb.SpeakConfig(npc_id="innkeeper", input_format=pb.AudioFormat(encoding=pb.PCM_S16LE, sample_rate=16000))
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Speak(iter([pb.SpeakRequest(config=cfg), pb.SpeakRequest(audio=b"\x01\x02\x03")]), metadata=md,
                        timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "multiple of 2 bytes" in e.value.details()

    # fuzz: random configs and random audio bytes; every answer is a status or a normal end, never a crash
    rng = random.Random(0)
    npcs = ["innkeeper", "", "x" * 300, "merchant", "\x00\xff"]
    for i in range(40):
        fmt = pb.AudioFormat(encoding=rng.choice([0, 1, 2, 7]), sample_rate=rng.choice([0, 1, 8000, 16000, 10**9]),
                             channels=rng.choice([0, 1, 2, 5, -1]))
        cfg = pb.SpeakConfig(npc_id=rng.choice(npcs), session_id=rng.choice(["", "s" * 200, "abc"]),
                             input_format=fmt, mode=rng.choice([0, 1, 2, 9]),
                             output_sample_rate=rng.choice([0, 16000, -5]), text=rng.choice(["", "hi", "é" * 50]))
        reqs = [pb.SpeakRequest(config=cfg)] + [
            pb.SpeakRequest(audio=rng.randbytes(rng.choice([1, 2, 100, 3000]))) for _ in range(rng.randint(0, 3))
        ]
        try:
            for _ in stub.Speak(iter(reqs), metadata=md, timeout=30):
                pass
        except grpc.RpcError as exc:
            assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                                  grpc.StatusCode.FAILED_PRECONDITION), (exc.code(), exc.details())
    assert stub.Health(pb.HealthRequest(), metadata=md, timeout=10).status == "ok"
    channel.close()


def test_serve_command_and_say(tiny_model_dir, tmp_path, question_wav):
    """The real `npc-server serve` process, then `npc-server say` against it."""
    personas = capped_personas(tmp_path)
    ready = tmp_path / "ready"
    env = {**os.environ, "NPC_VOICE_TOKEN": "cli-token"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "npc_server.cli", "serve", "--port", "0", "--bridge-port", "0",
         "--model-dir", str(tiny_model_dir), "--personas", str(personas), "--ready-file", str(ready)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.time() + 300
        while not ready.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert ready.exists(), proc.stdout.read() if proc.poll() is not None else "server did not start"
        grpc_port = ready.read_text().split()[0]
        out = tmp_path / "answer.wav"
        r = subprocess.run(
            [sys.executable, "-m", "npc_server.cli", "say", "--npc", "innkeeper", "--server", f"127.0.0.1:{grpc_port}",
             str(question_wav), "-o", str(out)], env=env, capture_output=True, text=True, timeout=120,
        )
        assert r.returncode == 0, r.stderr
        assert "time to first audio" in r.stdout
        wav, sr = load_audio(out)
        assert len(wav) > 0
        r = subprocess.run(
            [sys.executable, "-m", "npc_server.cli", "say", "--npc", "ghost", "--server", f"127.0.0.1:{grpc_port}",
             "--text", "hi"], env=env, capture_output=True, text=True, timeout=60,
        )
        assert r.returncode == 1 and "NOT_FOUND: unknown NPC 'ghost'" in r.stderr

        # SIGTERM while a bridge client is asking: it gets an error frame for its request, then the close
        import msgpack
        from websockets.exceptions import ConnectionClosed
        from websockets.sync.client import connect

        bridge_port = ready.read_text().split()[1]
        with connect(f"ws://127.0.0.1:{bridge_port}", open_timeout=10) as ws:
            send = lambda frame: ws.send(msgpack.packb(frame, use_bin_type=True))  # noqa: E731
            recv = lambda: msgpack.unpackb(ws.recv(10), raw=False)  # noqa: E731
            send({"type": "hello", "version": 1, "token": "cli-token"})
            assert recv()["type"] == "welcome"
            send({"type": "speak", "id": 1, "config": {"npc_id": "innkeeper", "sample_rate": 16000}})
            send({"type": "audio", "id": 1, "data": b"\x00" * 3200})
            send({"type": "health", "id": 2})
            assert recv()["type"] == "health"  # the speak is in flight now
            proc.terminate()
            frame = recv()
            assert frame["type"] == "error" and frame["id"] == 1 and frame["code"] == "UNAVAILABLE", frame
            with pytest.raises(ConnectionClosed) as e:
                recv()
            assert e.value.rcvd.code == 1001
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert proc.returncode == 0
    out = proc.stdout.read()
    # the printed `say` command works as it is: it carries the token (here from $NPC_VOICE_TOKEN)
    assert '--token "$NPC_VOICE_TOKEN"' in out, out


def test_serve_refuses_without_token_off_loopback(tiny_model_dir):
    env = {k: v for k, v in os.environ.items() if k != "NPC_VOICE_TOKEN"}
    r = subprocess.run([sys.executable, "-m", "npc_server.cli", "serve", "--model-dir", str(tiny_model_dir)],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no auth token" in r.stderr
    r = subprocess.run([sys.executable, "-m", "npc_server.cli", "serve", "--host", "0.0.0.0", "--insecure-loopback",
                        "--model-dir", str(tiny_model_dir)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "only works on a loopback address" in r.stderr
    r = subprocess.run([sys.executable, "-m", "npc_server.cli", "serve", "--insecure-loopback",
                        "--model-dir", "/nonexistent"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "lacks trained component" in r.stderr


def test_resampled_output_is_one_continuous_stream(client, question_wav):
    """Asking for 48 kHz gives the native answer resampled as one stream (no seams at chunk boundaries)."""
    import soxr

    native, _, end_native = collect(client.speak(npc="merchant", audio=question_wav))
    high, _, end_high = collect(client.speak(npc="merchant", audio=question_wav, output_sample_rate=48000))
    sr = native[0].sample_rate
    a = np.concatenate([ev.samples() for ev in native])
    b = np.concatenate([ev.samples() for ev in high])
    assert all(ev.sample_rate == 48000 for ev in high) and len(high) > 1
    expected = soxr.resample(a, sr, 48000, quality="HQ")
    assert abs(len(b) - len(expected)) <= 2
    n = min(len(b), len(expected))
    err = np.sqrt(np.mean((b[:n] - expected[:n]) ** 2)) / (np.sqrt(np.mean(expected[:n] ** 2)) + 1e-9)
    # int16 rounding alone gives ~2e-4; resampling each chunk on its own gives ~4e-3 (seams at every boundary)
    assert err < 1e-3, err
    assert end_high.audio_seconds == pytest.approx(end_native.audio_seconds, abs=1e-3)


# ---- hardening: each test below failed before its fix ------------------------------------------------------------


def _held_open(stub, metadata, release: threading.Event):
    """A Speak call that sends its config and then nothing until `release` is set."""
    def requests():
        yield pb.SpeakRequest(config=pb.SpeakConfig(
            npc_id="innkeeper", input_format=pb.AudioFormat(encoding=pb.PCM_S16LE, sample_rate=16000)))
        release.wait(30)

    return stub.Speak(requests(), metadata=metadata, timeout=8)


def _wait_for(condition, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def test_held_open_questions_are_bounded_and_time_out(server, client):
    """Questions that send a config and never finish used to take every server thread: Health timed out."""
    service = server["service"]
    channel = grpc.insecure_channel(server["target"])
    stub = rpc.NpcVoiceStub(channel)
    release = threading.Event()
    md = lambda who: [("authorization", f"Bearer {TOKEN}"), ("x-client-id", who)]  # noqa: E731
    try:
        t0 = time.monotonic()
        # 22 questions from 11 clients that never finish: 4 are held (the limit in all), 18 refused at once
        calls = [_held_open(stub, md(f"holder{i // 2}"), release) for i in range(22)]
        time.sleep(1.0)
        # the server still answers everything else, at once
        assert stub.Health(pb.HealthRequest(), metadata=md("probe"), timeout=3).status == "ok"
        assert client.open_session("innkeeper")
        assert service.pending_questions() == 4
        codes = []
        for call in calls:
            with pytest.raises(grpc.RpcError) as e:
                next(call)
            codes.append(e.value.code())
            if e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                assert "no message for 2 s" in e.value.details()  # the server's question timeout, not ours
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 18, codes
        assert codes.count(grpc.StatusCode.DEADLINE_EXCEEDED) == 4, codes
        assert time.monotonic() - t0 < 7
        assert _wait_for(lambda: service.pending_questions() == 0)

        # per client: the third question of a client still sending two is refused (limit 2)
        solo_release = threading.Event()
        solo = [_held_open(stub, md("solo"), solo_release) for _ in range(2)]
        assert _wait_for(lambda: service.pending_questions() == 2)
        with pytest.raises(grpc.RpcError) as e:
            next(_held_open(stub, md("solo"), solo_release))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit 2" in e.value.details()
        solo_release.set()  # their questions end (empty ones: INVALID_ARGUMENT)
        for call in solo:
            with pytest.raises(grpc.RpcError) as e:
                next(call)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        release.set()
        channel.close()
    _, _, end = collect(client.speak(npc="innkeeper", text="Hello?"))
    assert end is not None
    # the helper threads that read the questions ended with their calls
    assert _wait_for(lambda: not any(t.name == "grpc-question" for t in threading.enumerate()))


def test_cancel_while_the_first_chunk_is_sent_counts_it(server, monkeypatch):
    """gRPC stops the answer's generator at the yield of the chunk it was sending when the cancel came; the
    client has that chunk, so the history must keep it (it used to record an empty answer)."""
    service = server["service"]
    spoken = []
    real = service.engine.interrupted
    monkeypatch.setattr(service.engine, "interrupted",
                        lambda state, spoken_seconds: (spoken.append(spoken_seconds), real(state, spoken_seconds)))
    sid = service.open_session("tester", "quest_giver")
    cfg = SpeakConfig(npc_id="quest_giver", session_id=sid, text="What is the quest?", output_sample_rate=16000)
    events = service.speak("tester", cfg, iter(()))
    first = next(ev for ev in events if isinstance(ev, AudioOut))
    events.close()  # what the transport does when the cancel arrives while `first` is on its way
    assert spoken == [pytest.approx(len(first.pcm) / 2 / 16000)]
    state = service.sessions.get(sid, "tester").state
    assert state.turns[-1][0] == "<interrupted>"
    gen_session = state.session
    assert gen_session.cache.get_seq_length() == sum(len(s) for s in gen_session.segments)
    assert service.close_session("tester", sid)


def test_authorization_must_be_bearer(server):
    channel = grpc.insecure_channel(server["target"])
    stub = rpc.NpcVoiceStub(channel)
    try:
        for header, ok in [(TOKEN, False), (f"Basic {TOKEN}", False), (f"Bearer {TOKEN}", True),
                           (f"bearer {TOKEN}", True)]:
            if ok:
                assert stub.Health(pb.HealthRequest(), metadata=[("authorization", header)], timeout=10).status == "ok"
                continue
            with pytest.raises(grpc.RpcError) as e:
                stub.Health(pb.HealthRequest(), metadata=[("authorization", header)], timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "Bearer <token>" in e.value.details()
    finally:
        channel.close()


def test_pcm_audio_needs_its_sample_rate(server):
    channel = grpc.insecure_channel(server["target"])
    stub = rpc.NpcVoiceStub(channel)
    md = [("authorization", f"Bearer {TOKEN}")]
    try:
        cfg = pb.SpeakConfig(npc_id="innkeeper", input_format=pb.AudioFormat(encoding=pb.PCM_S16LE))  # rate 0
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Speak(iter([pb.SpeakRequest(config=cfg), pb.SpeakRequest(audio=b"\x00" * 3200)]), metadata=md,
                            timeout=30))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "sample_rate" in e.value.details()
        # typed text alone needs no input format
        cfg = pb.SpeakConfig(npc_id="innkeeper", text="hello")
        assert list(stub.Speak(iter([pb.SpeakRequest(config=cfg)]), metadata=md, timeout=30))[-1].HasField("end")
    finally:
        channel.close()


@pytest.mark.parametrize("kwargs", [
    dict(npc="x" * 100_000, text="hi"),
    dict(npc="innkeeper", session="s" * 100_000, text="hi"),
    dict(npc="innkeeper", emotion="e" * 100_000, text="hi"),
    dict(npc="innkeeper", language="l" * 100_000, text="hi"),
])
def test_errors_do_not_echo_long_input(client, kwargs):
    with pytest.raises(NpcError) as e:
        collect(client.speak(**kwargs))
    assert e.value.code in ("NOT_FOUND", "INVALID_ARGUMENT")
    assert len(e.value.message) <= 300 and "100000 characters" in e.value.message


def test_sessions_belong_to_their_client(server, client):
    sid = client.open_session("innkeeper")
    with NpcClient(server["target"], token=TOKEN, client_id="intruder") as other:
        with pytest.raises(NpcError) as e:
            collect(other.speak(npc="innkeeper", text="hi", session=sid))
        assert e.value.code == "NOT_FOUND"  # not even told that it exists
        assert other.close_session(sid) is False
    _, _, end = collect(client.speak(npc="innkeeper", text="hi", session=sid))
    assert end.session_id == sid
    assert client.close_session(sid)


def test_per_client_tokens_tie_sessions_to_the_token(tiny_model_dir, tmp_path):
    """With --tokens-file a client is its token: declaring another client's id gets nothing of its."""
    eu, us = "eu-token-0123456789", "us-token-0123456789"
    service = NpcService(Engine.from_pretrained(tiny_model_dir), PersonaStore(capped_personas(tmp_path)),
                         Limits(max_sessions=1), client_tokens={eu: "realm-eu", us: "realm-us"})
    grpc_server, port = start_grpc(service, "127.0.0.1", 0)
    target = f"127.0.0.1:{port}"
    try:
        with NpcClient(target, token=eu) as eu_client, NpcClient(target, token=us, client_id="realm-eu") as us_client:
            sid = eu_client.open_session("innkeeper")
            with pytest.raises(NpcError) as e:
                collect(us_client.speak(npc="innkeeper", text="hi", session=sid))
            assert e.value.code == "NOT_FOUND"
            assert us_client.close_session(sid) is False
            with pytest.raises(NpcError) as e:  # the server is full: realm-eu's session is not pushed out for it
                us_client.open_session("merchant")
            assert e.value.code == "RESOURCE_EXHAUSTED"
            assert collect(eu_client.speak(npc="innkeeper", text="hi", session=sid))[2].session_id == sid
        with NpcClient(target, token=TOKEN) as stranger:
            with pytest.raises(NpcError) as e:
                stranger.health()
            assert e.value.code == "UNAUTHENTICATED"
    finally:
        grpc_server.stop(0)
        service.shutdown()


def test_tls(tiny_model_dir, tmp_path, self_signed_cert):
    cert, key = self_signed_cert
    service = NpcService(Engine.from_pretrained(tiny_model_dir), PersonaStore(capped_personas(tmp_path)),
                         auth_token=TOKEN)
    grpc_server, port = start_grpc(service, "127.0.0.1", 0, tls=(cert.read_bytes(), key.read_bytes()))
    try:
        with NpcClient(f"127.0.0.1:{port}", token=TOKEN, tls_ca=cert) as c:
            assert c.health()["status"] == "ok"
            assert collect(c.speak(npc="innkeeper", text="hi"))[2] is not None
        with NpcClient(f"127.0.0.1:{port}", token=TOKEN, timeout=5) as plain:  # no TLS: no answer
            with pytest.raises(NpcError) as e:
                plain.health()
            assert e.value.code == "UNAVAILABLE"
    finally:
        grpc_server.stop(0)
        service.shutdown()


def test_serve_port_in_use_is_one_clear_line(tiny_model_dir, tmp_path, capsys):
    from npc_server.service.serve import main as serve_main

    personas = capped_personas(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        base = ["--insecure-loopback", "--model-dir", str(tiny_model_dir), "--personas", str(personas)]
        assert serve_main(base + ["--port", str(port), "--bridge-port", "-1"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"npc-server: cannot listen on 127.0.0.1:{port} (gRPC)"), err
        assert err[-1].endswith("pick another --port")
        assert serve_main(base + ["--port", "0", "--bridge-port", str(port)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"npc-server: cannot listen on 127.0.0.1:{port} (WebSocket bridge)"), err
        assert "in use" in err[-1]


def test_say_hint_carries_what_say_needs():
    from npc_server.service.serve import _say_hint, build_parser

    args = build_parser().parse_args(["--token", "s3cret"])
    assert "--token s3cret" in _say_hint(args, 50051, token_from_env=False)
    assert '--token "$NPC_VOICE_TOKEN"' in _say_hint(args, 50051, token_from_env=True)
    args = build_parser().parse_args(["--tokens-file", "clients.txt", "--tls-cert", "c.pem", "--tls-key", "k.pem"])
    hint = _say_hint(args, 50051, token_from_env=False)
    assert "--token <a token of clients.txt>" in hint and "--tls-ca c.pem" in hint
