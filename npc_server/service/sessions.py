"""Conversation sessions: per-session model state (KV cache), bounded counts and memory, idle timeout.

A session belongs to the client that opened it: it is stored under (owner, session id), so another client can
neither use nor close it, and does not even learn that it exists (NOT_FOUND). Ids the server picks are random
128-bit strings. When a bound is hit, only the asking client's own least recently used idle session may be
evicted; another client's session never is: the request gets RESOURCE_EXHAUSTED instead.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

from npc_server.service.api import ApiError, ErrorCode, Limits, shorten


@dataclass
class AnswerInFlight:
    """The answer a session is giving now; a new question on the session stops it (barge-in)."""

    stop: threading.Event = field(default_factory=threading.Event)
    heard_seconds: float | None = None  # how much of it the player heard before speaking again, when known

    def barge_in(self, heard_seconds: float | None) -> None:
        self.heard_seconds = heard_seconds
        self.stop.set()


@dataclass
class Session:
    id: str
    npc_id: str
    client_id: str  # the owner: the authenticated client (see NpcService.authenticate)
    state: Any = None  # the engine's per-conversation state (KV cache, history)
    created: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    busy: threading.Lock = field(default_factory=threading.Lock)  # one answer at a time per session
    answering: AnswerInFlight | None = None  # set while an answer holds `busy`

    def memory_bytes(self) -> int:
        fn = getattr(self.state, "memory_bytes", None)
        return int(fn()) if callable(fn) else 0


class SessionManager:
    """Thread-safe store of sessions.

    Bounds: a total session count, a per-client count and a total memory budget for the engine states.
    At a bound the asking client's least recently used idle session is evicted (never one that is answering,
    never another client's); when it has none, the request is refused with RESOURCE_EXHAUSTED.
    Sessions idle for longer than `limits.session_idle_seconds` are dropped by `sweep()`.
    """

    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic):
        self.limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        # (owner, session id) -> session, in LRU order: oldest first
        self._sessions: OrderedDict[tuple[str, str], Session] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def open(self, npc_id: str, client_id: str, session_id: str = "", state: Any = None) -> Session:
        if session_id and (len(session_id) > 128 or not session_id.isprintable()):
            raise ApiError(ErrorCode.INVALID_ARGUMENT, "session_id must be printable and at most 128 characters")
        with self._lock:
            self._sweep_locked()
            s = self._sessions.get((client_id, session_id))
            if s is not None:
                if s.npc_id != npc_id:
                    raise ApiError(
                        ErrorCode.FAILED_PRECONDITION,
                        f"session {shorten(session_id)} talks to NPC {s.npc_id!r}, not {npc_id!r}",
                    )
                return s
            mine = [s for s in self._sessions.values() if s.client_id == client_id]
            if len(mine) >= self.limits.max_sessions_per_client and not self._evict_one_locked(mine):
                raise ApiError(
                    ErrorCode.RESOURCE_EXHAUSTED,
                    f"this client has {len(mine)} sessions open (limit {self.limits.max_sessions_per_client}) and all "
                    "are answering; close one",
                )
            if len(self._sessions) >= self.limits.max_sessions and not self._evict_one_locked(mine):
                raise ApiError(ErrorCode.RESOURCE_EXHAUSTED, "the server has too many sessions open; try again later")
            budget = self.limits.max_session_memory_mb * 1e6
            while self._total_memory_locked() > budget:
                if not self._evict_one_locked([s for s in self._sessions.values() if s.client_id == client_id]):
                    raise ApiError(ErrorCode.RESOURCE_EXHAUSTED,
                                   "the server's session memory is full; try again later")
            sid = session_id or secrets.token_urlsafe(16)
            s = Session(id=sid, npc_id=npc_id, client_id=client_id, state=state, created=self._clock())
            s.last_used = self._clock()
            self._sessions[(client_id, sid)] = s
            return s

    def get(self, session_id: str, client_id: str) -> Session:
        with self._lock:
            s = self._sessions.get((client_id, session_id))
            if s is None:  # also when another client owns it: that is none of this client's business
                raise ApiError(ErrorCode.NOT_FOUND,
                               f"unknown session {shorten(session_id)} (closed, expired or evicted)")
            s.last_used = self._clock()
            self._sessions.move_to_end((client_id, session_id))
            return s

    def touch(self, session: Session) -> None:
        """Mark as used after an answer and enforce the memory budget (the state may have grown): the owner's
        other idle sessions go first; while the budget stays exceeded, no new session opens."""
        key = (session.client_id, session.id)
        with self._lock:
            session.last_used = self._clock()
            if key in self._sessions:
                self._sessions.move_to_end(key)
            budget = self.limits.max_session_memory_mb * 1e6
            while self._total_memory_locked() > budget:
                own = [s for s in self._sessions.values() if s.client_id == session.client_id and s is not session]
                if not self._evict_one_locked(own):
                    break

    def close(self, session_id: str, client_id: str) -> bool:
        with self._lock:
            return self._sessions.pop((client_id, session_id), None) is not None

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
                del self._sessions[(s.client_id, s.id)]
                self.evicted += 1
                return True
        return False

    def _sweep_locked(self) -> int:
        now = self._clock()
        stale = [
            key
            for key, s in self._sessions.items()
            if now - s.last_used > self.limits.session_idle_seconds and not s.busy.locked()
        ]
        for key in stale:
            del self._sessions[key]
        return len(stale)
