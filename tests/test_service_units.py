"""Session manager (ownership, LRU, idle timeout, per-client and memory bounds), auth, arriving-question bounds
and the fair step scheduler."""

from __future__ import annotations

import threading
import time

import pytest

from npc_server.service.api import ApiError, ErrorCode, Limits
from npc_server.service.auth import TokensFileError, bearer_token, read_tokens_file
from npc_server.service.core import NpcService
from npc_server.service.scheduler import Scheduler
from npc_server.service.sessions import SessionManager


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Sized:
    def __init__(self, n: int):
        self.n = n

    def memory_bytes(self) -> int:
        return self.n


def test_open_get_close_and_ownership():
    sm = SessionManager(Limits())
    s = sm.open("innkeeper", "alice")
    assert sm.get(s.id, "alice") is s
    assert len(s.id) >= 22  # 128 random bits: the id is a capability nobody guesses
    # another client can neither use nor close it, nor learn that it exists
    with pytest.raises(ApiError) as e:
        sm.get(s.id, "bob")
    assert e.value.code == ErrorCode.NOT_FOUND
    assert not sm.close(s.id, "bob") and sm.get(s.id, "alice") is s
    # the same id chosen by another client is another session
    assert sm.open("merchant", "bob", s.id) is not s and sm.get(s.id, "alice").npc_id == "innkeeper"
    with pytest.raises(ApiError) as e:
        sm.open("merchant", "alice", s.id)
    assert "talks to NPC 'innkeeper'" in e.value.message
    assert sm.open("innkeeper", "alice", s.id) is s  # reopening is idempotent
    assert sm.close(s.id, "alice") and not sm.close(s.id, "alice")
    with pytest.raises(ApiError) as e:
        sm.get(s.id, "alice")
    assert e.value.code == ErrorCode.NOT_FOUND


def test_bad_session_id():
    sm = SessionManager(Limits())
    with pytest.raises(ApiError, match="printable"):
        sm.open("innkeeper", "a", "x" * 200)


def test_idle_timeout():
    clock = FakeClock()
    sm = SessionManager(Limits(session_idle_seconds=10), clock=clock)
    a = sm.open("innkeeper", "c")
    clock.t = 5
    b = sm.open("innkeeper", "c")
    clock.t = 12
    assert sm.sweep() == 1
    with pytest.raises(ApiError):
        sm.get(a.id, "c")
    assert sm.get(b.id, "c") is b


def test_per_client_limit_evicts_lru_idle_but_not_busy():
    clock = FakeClock()
    sm = SessionManager(Limits(max_sessions_per_client=2), clock=clock)
    a = sm.open("innkeeper", "c")
    clock.t = 1
    b = sm.open("innkeeper", "c")
    clock.t = 2
    sm.get(a.id, "c")  # a is now most recently used
    c = sm.open("innkeeper", "c")  # evicts b
    assert sm.evicted == 1 and len(sm) == 2
    with pytest.raises(ApiError):
        sm.get(b.id, "c")
    # when every session of the client is answering, a new one is refused instead of evicting
    a.busy.acquire()
    c.busy.acquire()
    try:
        with pytest.raises(ApiError) as e:
            sm.open("innkeeper", "c")
        assert e.value.code == ErrorCode.RESOURCE_EXHAUSTED
    finally:
        a.busy.release()
        c.busy.release()
    other = sm.open("innkeeper", "someone-else")  # other clients are not affected
    assert other.client_id == "someone-else"


def test_another_clients_sessions_are_never_evicted():
    """Opening sessions under new client ids must not push out anyone else's: RESOURCE_EXHAUSTED instead."""
    clock = FakeClock()
    sm = SessionManager(Limits(max_sessions=2, max_session_memory_mb=1.0), clock=clock)
    a = sm.open("innkeeper", "alice", state=Sized(300_000))
    b = sm.open("innkeeper", "alice", state=Sized(300_000))
    for intruder in ("mallory", "mallory2"):
        with pytest.raises(ApiError) as e:
            sm.open("innkeeper", intruder)
        assert e.value.code == ErrorCode.RESOURCE_EXHAUSTED
    assert sm.get(a.id, "alice") is a and sm.get(b.id, "alice") is b and sm.evicted == 0
    # at the total bound a client may still make room among its own idle sessions
    c = sm.open("innkeeper", "alice")
    assert sm.evicted == 1 and len(sm) == 2 and sm.get(c.id, "alice") is c
    # the memory budget: over it, a newcomer is refused rather than someone else's session dropped
    sm2 = SessionManager(Limits(max_session_memory_mb=1.0), clock=clock)
    big = sm2.open("innkeeper", "alice", state=Sized(1_200_000))
    with pytest.raises(ApiError) as e:
        sm2.open("innkeeper", "bob")
    assert e.value.code == ErrorCode.RESOURCE_EXHAUSTED and "memory" in e.value.message
    sm2.touch(big)
    assert sm2.get(big.id, "alice") is big


def test_memory_budget_evicts_least_recently_used():
    clock = FakeClock()
    sm = SessionManager(Limits(max_session_memory_mb=1.0), clock=clock)
    sessions = []
    for i in range(3):
        clock.t = i
        sessions.append(sm.open("innkeeper", "c", state=Sized(400_000)))
    clock.t = 10
    sm.touch(sessions[2])  # 1.2 MB > 1 MB: the oldest goes
    assert len(sm) == 2 and sm.memory_bytes() == 800_000
    with pytest.raises(ApiError):
        sm.get(sessions[0].id, "c")


class NoPersonas:
    """Stands in for a PersonaStore where no persona is needed."""

    def all(self):
        return []

    def stop(self):
        pass


def test_tokens_file(tmp_path):
    f = tmp_path / "tokens"
    f.write_text("# game servers\nrealm-eu  eu-0123456789abcdef\n\nrealm-us us-0123456789abcdef\n")
    assert read_tokens_file(f) == {"eu-0123456789abcdef": "realm-eu", "us-0123456789abcdef": "realm-us"}
    for text, words in [("a b c\n", ":1: expected `name token`"), ("x short\n", "shorter than 16"),
                        ("x 0123456789abcdef\nx 0123456789abcdeX\n", ":2: client 'x' is named twice"),
                        ("x 0123456789abcdef\ny 0123456789abcdef\n", "same token as 'x'"), ("# none\n", "no `name")]:
        f.write_text(text)
        with pytest.raises(TokensFileError, match=words):
            read_tokens_file(f)


def test_bearer_header_and_identity():
    assert bearer_token(None) is None
    assert bearer_token("Bearer abc") == "abc" and bearer_token("bearer  abc") == "abc"
    for header in ("abc", "Basic abc", "Bearer", "Bearer "):
        with pytest.raises(ApiError) as e:
            bearer_token(header)
        assert e.value.code == ErrorCode.UNAUTHENTICATED

    shared = NpcService(object(), NoPersonas(), auth_token="shared-secret")
    try:
        assert shared.identify("shared-secret", "game-1", "ipv4:1.2.3.4") == "game-1"
        assert shared.identify("shared-secret", None, "ipv4:1.2.3.4") == "ipv4:1.2.3.4"
        with pytest.raises(ApiError):
            shared.identify("wrong", "game-1", "x")
    finally:
        shared.shutdown()
    own = NpcService(object(), NoPersonas(), client_tokens={"eu-0123456789abcdef": "realm-eu"})
    try:  # with its own token a client is that token's name, whatever id it declares
        assert own.identify("eu-0123456789abcdef", "realm-us", "x") == "realm-eu"
        for token in (None, "shared-secret"):
            with pytest.raises(ApiError):
                own.identify(token, "realm-eu", "x")
    finally:
        own.shutdown()


def test_arriving_questions_are_bounded_per_client_and_in_all():
    svc = NpcService(object(), NoPersonas(), Limits(max_pending_questions=3, max_pending_questions_per_client=2))
    try:
        a1, a2 = svc.hold_question("a"), svc.hold_question("a")
        with pytest.raises(ApiError) as e:
            svc.hold_question("a")
        assert e.value.code == ErrorCode.RESOURCE_EXHAUSTED and "limit 2" in e.value.message
        b1 = svc.hold_question("b")
        with pytest.raises(ApiError) as e:
            svc.hold_question("c")
        assert e.value.code == ErrorCode.RESOURCE_EXHAUSTED
        a1.release()
        a1.release()  # a second release changes nothing
        assert svc.pending_questions() == 2
        svc.hold_question("c").release()
        a2.release()
        b1.release()
        assert svc.pending_questions() == 0
    finally:
        svc.shutdown()


def _steps(name: str, n: int, log: list, delay: float = 0.0):
    for i in range(n):
        if delay:
            time.sleep(delay)
        log.append(name)
        yield f"{name}{i}"


def test_scheduler_interleaves_fairly():
    sched = Scheduler(workers=1)
    log: list[str] = []
    gate = threading.Event()

    def gated():
        gate.wait(5)
        yield "start"
        yield from _steps("long", 20, log)

    long_job = sched.submit(gated())
    short_job = sched.submit(_steps("short", 3, log))
    gate.set()
    assert list(short_job.items()) == ["short0", "short1", "short2"]
    assert len(list(long_job.items())) == 21
    # the short answer finished long before the long one did
    assert max(i for i, x in enumerate(log) if x == "short") < 10
    sched.shutdown()


def test_scheduler_cancel_and_errors():
    sched = Scheduler(workers=1)
    closed = threading.Event()

    def endless():
        try:
            while True:
                time.sleep(0.001)
                yield 1
        finally:
            closed.set()

    job = sched.submit(endless())
    it = job.items()
    next(it)
    job.cancel()
    rest = list(it)
    assert closed.wait(2) and len(rest) < 1000

    def failing():
        yield 1
        raise RuntimeError("boom")

    job = sched.submit(failing())
    with pytest.raises(RuntimeError, match="boom"):
        list(job.items())
    # the worker survived
    assert list(sched.submit(iter([1, 2])).items()) == [1, 2]
    sched.shutdown()


def test_scheduler_runs_at_most_max_running_and_the_rest_wait_in_line():
    sched = Scheduler(workers=2, max_running=2)
    log: list[str] = []
    jobs = [sched.submit(_steps(name, 5, log, delay=0.002)) for name in ("a", "b", "c", "d")]
    assert sched.waiting() == 2
    for job in jobs:
        assert len(list(job.items())) == 5
    # c and d started only after a and b ended: the first two never shared their turns with the last two
    first_late = min(i for i, x in enumerate(log) if x in ("c", "d"))
    assert set(log[:first_late]) == {"a", "b"} and log[:first_late].count("a") + log[:first_late].count("b") >= 6
    assert sched.waiting() == 0
    sched.shutdown()


def test_scheduler_cancel_while_waiting_in_line_ends_the_job_without_a_turn():
    sched = Scheduler(workers=1, max_running=1)
    gate = threading.Event()
    started = threading.Event()

    def blocking():
        gate.wait(5)
        yield 1

    def queued():
        started.set()
        yield 2

    first = sched.submit(blocking())
    second = sched.submit(queued())
    assert sched.waiting() == 1
    second.cancel()
    assert list(second.items()) == [] and second.finished.is_set() and not started.is_set()
    assert sched.waiting() == 0
    gate.set()
    assert list(first.items()) == [1]
    assert list(sched.submit(iter([3])).items()) == [3]  # the freed turn is usable
    sched.shutdown()
