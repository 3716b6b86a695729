"""Cross-conversation decode batching: answers running on several threads share one forward pass per token step.

On this CPU a decode step is bound by reading the weights from memory (~25 MB per step for the default model),
not by arithmetic, so one step for four conversations costs about twice one step for one. `StepBatcher` is a
"group commit": every answer thread that needs its next token calls `step()`; the first to arrive leads, waits
until every answer that is currently running generator code has arrived (or `window_s` has passed), runs one
`FastForward.forward_batch` for all of them and hands each thread its logits. Threads running other work
(the vocoder, sending audio) are not waited for: `track()` counts only answers inside the generator.
The batched step itself is pluggable (`forward_many`): model v2's engine batches its thinker sessions the same way.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, TypeVar

import torch
from transformers import DynamicCache

from npc_server.backbone.fast import FastForward

T = TypeVar("T")


@dataclass
class _Request:
    cache: DynamicCache | object  # what the step appends to: a v1 KV cache, or a v2 thinker session
    token: int
    rows: list[tuple[int, int]] | None
    logits: torch.Tensor | None = None
    error: BaseException | None = None
    done: bool = False


@dataclass
class BatchStats:
    sizes: dict[int, int] = field(default_factory=dict)  # batch size -> forward passes run with it

    @property
    def steps(self) -> int:  # forward passes run
        return sum(self.sizes.values())

    @property
    def requests(self) -> int:  # token steps served (requests / steps = mean batch size)
        return sum(size * n for size, n in self.sizes.items())

    @property
    def max_batch(self) -> int:
        return max(self.sizes, default=0)


class StepBatcher:
    """Batches single-token decode steps of concurrent answers (thread safe)."""

    def __init__(self, fast: FastForward | None, window_s: float = 0.003, max_batch: int = 16, lanes: int = 1,
                 forward_many: Callable[[list[object], list[int]], list[torch.Tensor]] | None = None):
        """`lanes`: batches that may run at the same time (each on its own thread, so on its own core); the
        answers waiting for a step are split evenly across the free lanes. `forward_many(states, tokens)`: the
        batched step, one logits tensor per state (default: `fast`'s batched forward over KV caches)."""
        if lanes < 1 or max_batch < 1:
            raise ValueError("lanes and max_batch must be >= 1")
        if (fast is None) == (forward_many is None):
            raise ValueError("give either a FastForward or a forward_many function")
        self.fast = fast
        self.forward_many = forward_many
        self.window_s = window_s
        self.max_batch = max_batch
        self.lanes = lanes
        self.stats = BatchStats()
        self._cv = threading.Condition()
        self._pending: list[_Request] = []
        self._running = 0  # answers executing generator code right now (they will step or yield soon)
        self._busy = 0  # lanes computing a batch now
        self._in_flight = 0  # requests inside those batches

    # ---- which answers to wait for -----------------------------------------------------------------------
    def track(self, events: Iterator[T]) -> Iterator[T]:
        """Wrap an answer's event iterator: while its code runs (inside `next()`), it counts as an answer the
        leader of a step should wait for; while suspended (its consumer is vocoding or sending), it does not."""
        try:
            while True:
                with self._cv:
                    self._running += 1
                try:
                    event = next(events)
                except StopIteration:
                    return
                finally:
                    with self._cv:
                        self._running -= 1
                        self._cv.notify_all()
                yield event
        finally:
            events.close()  # e.g. a cancelled answer: let the generator close its turn now

    # ---- the step ------------------------------------------------------------------------------------------
    def step(self, cache: DynamicCache, token: int, rows: list[tuple[int, int]] | None = None) -> torch.Tensor:
        """Feed `token` on top of `cache` (updated in place) -> logits [1, vocab], batched with the other answers
        that are stepping at the same moment. `rows`: LM-head rows this answer needs (see FastForward)."""
        req = _Request(cache, token, rows)
        with self._cv:
            self._pending.append(req)
            self._cv.notify_all()
            while not req.done and (self._busy >= self.lanes or not self._pending or self._pending[0] is not req):
                self._cv.wait()  # (a request taken into another lane's batch is no longer pending)
            if req.done:
                return self._result(req)
            # this thread leads the next batch: wait (briefly) for its share of the running answers to arrive
            self._busy += 1
            deadline = time.monotonic() + self.window_s
            while True:
                waiting = self._running - self._in_flight  # answers that will step soon, this one included
                free = self.lanes - self._busy + 1  # lanes for them, this one included
                target = min(self.max_batch, max(1, -(-waiting // free)))
                left = deadline - time.monotonic()
                if len(self._pending) >= target or left <= 0:
                    break
                self._cv.wait(left)
            batch, self._pending = self._pending[:target], self._pending[target:]
            self._in_flight += len(batch)
            self._cv.notify_all()  # the next in line may lead another lane
        try:
            self._run(batch)
        finally:
            with self._cv:
                self._busy -= 1
                self._in_flight -= len(batch)
                for r in batch:
                    r.done = True
                self._cv.notify_all()
        return self._result(req)

    @staticmethod
    def _result(req: _Request) -> torch.Tensor:
        if req.error is not None:
            raise req.error
        return req.logits

    def _run(self, batch: list[_Request]) -> None:
        try:
            if self.forward_many is not None:
                for r, logits in zip(batch, self.forward_many([r.cache for r in batch], [r.token for r in batch])):
                    r.logits = logits
            elif len(batch) == 1:
                r = batch[0]
                r.logits = self.fast.forward(r.cache, [r.token], last_only=True, rows=r.rows)
            else:
                rows = None
                if all(r.rows is not None for r in batch):  # the union: each answer masks its own grammar later
                    rows = _union([span for r in batch for span in r.rows])
                logits = self.fast.forward_batch([r.cache for r in batch], [r.token for r in batch], rows)
                for i, r in enumerate(batch):
                    r.logits = logits[i:i + 1]
        except BaseException as exc:  # every waiting answer gets the error, none hangs
            for r in batch:
                r.error = exc
        sizes = self.stats.sizes
        sizes[len(batch)] = sizes.get(len(batch), 0) + 1


def _union(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(spans):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out
