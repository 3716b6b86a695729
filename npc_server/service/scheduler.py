"""Fair step scheduler: runs many answers on a few worker threads, one generation step at a time, round robin.

An answer is a Python iterator whose every `next()` does a bounded amount of model work (a block of tokens,
a vocoder chunk). Interleaving steps means a long answer never blocks a short one, and the 2 cores are not
oversubscribed by one thread per request. With `max_running`, at most that many answers take turns; later ones
wait in line (first come, first served) and start as earlier ones end, so the answers that run stay in real time
instead of all of them slowing down together.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from typing import Any, Iterator

_DONE = object()


class Job:
    """Handle of a submitted iterator: read its items with `items()`, stop it with `cancel()`."""

    def __init__(self, it: Iterator[Any]):
        self._it = it
        self.submitted = time.perf_counter()
        self.started: float | None = None  # when it got its first turn (after waiting in line, if it had to)
        self._out: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()
        self.finished = threading.Event()
        self._on_cancel = None  # set by the scheduler while the job waits in line

    def cancel(self) -> None:
        self.cancelled.set()
        if self._on_cancel is not None:
            self._on_cancel(self)

    def items(self, poll: float = 0.05) -> Iterator[Any]:
        """Yield the iterator's items as they are produced; re-raise its exception, if any."""
        while True:
            try:
                item = self._out.get(timeout=poll)
            except queue.Empty:
                if self.finished.is_set() and self._out.empty():
                    return
                continue
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class Scheduler:
    def __init__(self, workers: int = 1, max_running: int = 0):
        """`max_running`: answers taking turns at once (0: no limit); the rest wait in line."""
        self._active: deque[Job] = deque()
        self._waiting: deque[Job] = deque()
        self._running = 0  # jobs submitted and not finished, minus those waiting in line
        self.max_running = max_running
        self._cv = threading.Condition()
        self._stop = False
        self._threads = [threading.Thread(target=self._loop, name=f"sched-{i}", daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()

    def submit(self, it: Iterator[Any]) -> Job:
        job = Job(it)
        with self._cv:
            if self.max_running and self._running >= self.max_running:
                job._on_cancel = self._leave_line
                self._waiting.append(job)
            else:
                self._running += 1
                self._active.append(job)
                self._cv.notify()
        return job

    def active(self) -> int:
        with self._cv:
            return len(self._active)

    def queued_ms(self, job: Job) -> float:
        """How long `job` waited in line before its first turn (so far, if it is still waiting)."""
        return ((job.started or time.perf_counter()) - job.submitted) * 1000

    def waiting(self) -> int:
        """Jobs waiting in line for a turn (`max_running`)."""
        with self._cv:
            return len(self._waiting)

    def _leave_line(self, job: Job) -> None:
        """A job cancelled while it waits in line ends now, without a turn."""
        with self._cv:
            if job not in self._waiting:
                return
            self._waiting.remove(job)
        self._end(job, self._close(job))

    def shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout=5)

    def _finish(self, job: Job, item: Any = _DONE) -> None:
        with self._cv:  # free the turn first: a client that sees this job end may submit the next one at once
            self._running -= 1
            if self._waiting and (not self.max_running or self._running < self.max_running):
                nxt = self._waiting.popleft()
                nxt._on_cancel = None
                self._running += 1
                self._active.append(nxt)
                self._cv.notify()
        self._end(job, item)

    @staticmethod
    def _end(job: Job, item: Any = _DONE) -> None:
        """Hand the job's last item (its end, or a failure and then its end) to its reader."""
        job._out.put(item)
        if item is not _DONE:
            job._out.put(_DONE)
        job.finished.set()

    @staticmethod
    def _close(job: Job) -> Any:
        """Close a cancelled job's iterator -> the item that ends the job: _DONE, or the failure of its cleanup (a
        failing cleanup is the job's error; it must not kill a worker or reach the one who cancelled)."""
        close = getattr(job._it, "close", None)
        try:
            if close is not None:
                close()
        except Exception as exc:
            return _Failure(exc)
        return _DONE

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._active and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                job = self._active.popleft()
            if job.cancelled.is_set():
                self._finish(job, self._close(job))
                continue
            if job.started is None:
                job.started = time.perf_counter()
            try:
                item = next(job._it)
            except StopIteration:
                self._finish(job)
                continue
            except Exception as exc:
                self._finish(job, _Failure(exc))
                continue
            job._out.put(item)
            with self._cv:
                self._active.append(job)
