"""Session manager (LRU, idle timeout, per-client and memory bounds) and the fair step scheduler."""

from __future__ import annotations

import threading
import time

import pytest

from npc_server.service.api import ApiError, ErrorCode, Limits
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
    with pytest.raises(ApiError) as e:
        sm.get(s.id, "bob")
    assert e.value.code == ErrorCode.FAILED_PRECONDITION
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
