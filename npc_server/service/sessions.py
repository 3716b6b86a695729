"""Conversation sessions: per-session model state (KV cache), bounded memory with LRU eviction, idle timeout."""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

from npc_server.service.api import ApiError, ErrorCode, Limits


@dataclass
class Session:
    id: str
    npc_id: str
    client_id: str
    state: Any = None  # the engine's per-conversation state (KV cache, history)
    created: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    busy: threading.Lock = field(default_factory=threading.Lock)  # one answer at a time per session

    def memory_bytes(self) -> int:
        fn = getattr(self.state, "memory_bytes", None)
        return int(fn()) if callable(fn) else 0


class SessionManager:
    """Thread-safe store of sessions.

    Bounds: a total session count, a per-client count and a total memory budget for the engine states.
    When a bound is hit the least recently used idle session is evicted (never one that is answering).
    Sessions idle for longer than `limits.session_idle_seconds` are dropped by `sweep()`.
    """

    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic):
        self.limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: OrderedDict[str, Session] = OrderedDict()  # LRU order: oldest first
        self.evicted = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def open(self, npc_id: str, client_id: str, session_id: str = "", state: Any = None) -> Session:
        if session_id and (len(session_id) > 128 or not session_id.isprintable()):
            raise ApiError(ErrorCode.INVALID_ARGUMENT, "session_id must be printable and at most 128 characters")
        with self._lock:
            self._sweep_locked()
            if session_id in self._sessions:
                s = self._sessions[session_id]
                if s.client_id != client_id:
                    raise ApiError(ErrorCode.FAILED_PRECONDITION, f"session {session_id!r} belongs to another client")
                if s.npc_id != npc_id:
                    raise ApiError(
                        ErrorCode.FAILED_PRECONDITION,
                        f"session {session_id!r} talks to NPC {s.npc_id!r}, not {npc_id!r}",
                    )
                return s
            mine = [s for s in self._sessions.values() if s.client_id == client_id]
            if len(mine) >= self.limits.max_sessions_per_client:
                if not self._evict_one_locked(mine):
                    raise ApiError(
                        ErrorCode.RESOURCE_EXHAUSTED,
                        f"client has {len(mine)} sessions open (limit {self.limits.max_sessions_per_client}); close one",
                    )
            if len(self._sessions) >= self.limits.max_sessions and not self._evict_one_locked(
                list(self._sessions.values())
            ):
                raise ApiError(ErrorCode.RESOURCE_EXHAUSTED, "the server has too many sessions open; try again later")
            sid = session_id or secrets.token_urlsafe(12)
            s = Session(id=sid, npc_id=npc_id, client_id=client_id, state=state, created=self._clock())
            s.last_used = self._clock()
            self._sessions[sid] = s
            return s

    def get(self, session_id: str, client_id: str) -> Session:
        with self._lock:
            s = self._sessions.get(session_id)
            if s is None:
                raise ApiError(ErrorCode.NOT_FOUND, f"unknown session {session_id!r} (closed, expired or evicted)")
            if s.client_id != client_id:
                raise ApiError(ErrorCode.FAILED_PRECONDITION, f"session {session_id!r} belongs to another client")
            s.last_used = self._clock()
            self._sessions.move_to_end(session_id)
            return s

    def touch(self, session: Session) -> None:
        """Mark as used after an answer and enforce the memory budget (the state may have grown)."""
        with self._lock:
            session.last_used = self._clock()
            if session.id in self._sessions:
                self._sessions.move_to_end(session.id)
            budget = self.limits.max_session_memory_mb * 1e6
            while self._total_memory_locked() > budget:
                if not self._evict_one_locked([s for s in self._sessions.values() if s is not session]):
                    break

    def close(self, session_id: str, client_id: str) -> bool:
        with self._lock:
            s = self._sessions.get(session_id)
            if s is None:
                return False
            if s.client_id != client_id:
                raise ApiError(ErrorCode.FAILED_PRECONDITION, f"session {session_id!r} belongs to another client")
            del self._sessions[session_id]
            return True

    def sweep(self) -> int:
        with self._lock:
            return self._sweep_locked()

    def memory_bytes(self) -> int:
        with self._lock:
            return self._total_memory_locked()

    # ---- internals (lock held) -------------------------------------------------------------------------------

    def _total_memory_locked(self) -> int:
        return sum(s.memory_bytes() for s in self._sessions.values())

    def _evict_one_locked(self, candidates: list[Session]) -> bool:
        for s in sorted(candidates, key=lambda s: s.last_used):
            if not s.busy.locked():
                del self._sessions[s.id]
                self.evicted += 1
                return True
        return False

    def _sweep_locked(self) -> int:
        now = self._clock()
        stale = [
            sid
            for sid, s in self._sessions.items()
            if now - s.last_used > self.limits.session_idle_seconds and not s.busy.locked()
        ]
        for sid in stale:
            del self._sessions[sid]
        return len(stale)
