"""`FairQueue`: one pool's gate at saturation, in this gateway.

At most `capacity()` requests of the pool are in flight from this gateway; beyond that a
request waits here, bounded in number (`max_queued`) and in time (its deadline), instead of
piling up in the engines' queues. Waiters are served by priority class first
(interactive before batch), then by start-time fair queueing across tenants: each
request gets a virtual finish tag `max(now_v, tenant's last tag) + 1/weight`, the smallest
tag goes first, so a flooding tenant gets its share, not the queue, and a tenant that
sends a few requests is served at its weight's share, in order. When the queue is full a
new request sheds the newest waiter of a lower class if there is one, else is refused.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from cluster.config import PRIORITY_ORDER, PriorityClass


class QueueFull(Exception):
    """No room in the queue (or shed by a request of a higher class)."""


class QueueTimeout(Exception):
    """The request waited past its deadline."""


@dataclass(order=True)
class _Waiter:
    rank: int
    tag: float
    seq: int
    start: float = field(compare=False)
    tenant: str = field(compare=False)
    future: asyncio.Future[None] = field(compare=False)


class FairQueue:
    def __init__(self, capacity: Callable[[], int], max_queued: int) -> None:
        self.capacity = capacity
        self.max_queued = max_queued
        self.in_flight = 0
        self._heap: list[_Waiter] = []
        self._last_tag: dict[str, float] = {}
        self._vtime = 0.0
        self._seq = itertools.count()

    @property
    def queued(self) -> int:
        return sum(1 for w in self._heap if not w.future.done())

    async def acquire(self, tenant: str, *, weight: float = 1.0, priority: PriorityClass = "interactive",
                      deadline_s: float = 10.0) -> None:  # fmt: skip
        """Return once the request may go to the engines (call `release` after it ends)."""
        if not self._live() and self.in_flight < max(1, self.capacity()):
            self.in_flight += 1
            return
        rank = PRIORITY_ORDER.index(priority)
        if self.queued >= self.max_queued and not self._shed_below(rank):
            raise QueueFull(f"{self.queued} requests already queued")
        start = max(self._vtime, self._last_tag.get(tenant, 0.0))
        tag = start + 1.0 / weight
        self._last_tag[tenant] = tag
        waiter = _Waiter(rank, tag, next(self._seq), start, tenant, asyncio.get_running_loop().create_future())
        heapq.heappush(self._heap, waiter)
        self._grant()
        try:
            await asyncio.wait_for(waiter.future, deadline_s)
        except TimeoutError:
            self._give_back(waiter)
            raise QueueTimeout(f"waited {deadline_s:g} s") from None
        except asyncio.CancelledError:  # the client left while waiting
            self._give_back(waiter)
            raise

    def _give_back(self, waiter: _Waiter) -> None:
        """A slot granted in the same loop turn as a timeout or cancellation is freed."""
        f = waiter.future
        if f.done() and not f.cancelled() and f.exception() is None:
            self.release()

    def release(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)
        self._grant()

    def _live(self) -> bool:
        while self._heap and self._heap[0].future.done():
            heapq.heappop(self._heap)
        return bool(self._heap)

    def _grant(self) -> None:
        while self.in_flight < max(1, self.capacity()) and self._live():
            waiter = heapq.heappop(self._heap)
            self._vtime = max(self._vtime, waiter.start)
            self.in_flight += 1
            waiter.future.set_result(None)

    def _shed_below(self, rank: int) -> bool:
        """Refuse the newest waiter of a class below `rank` to make room; False if none."""
        lower = [w for w in self._heap if w.rank > rank and not w.future.done()]
        if not lower:
            return False
        victim = max(lower, key=lambda w: (w.rank, w.seq))
        victim.future.set_exception(QueueFull("shed for a request of a higher priority class"))
        return True


__all__ = ["FairQueue", "QueueFull", "QueueTimeout"]
