"""Which decodes a new prefill on a replica would stall, and by how much of their TPOT.

With chunked prefill every engine step runs the running decodes plus up to
`max_num_batched_tokens` of prefill, so a step carrying a full prefill chunk takes ~20x a
decode-only step: each second of prefill a replica does is a second added to the
inter-token time of every request decoding there. A request with `max_tokens` = n spreads
that second over its n - 1 intervals, so its mean TPOT grows by 1 / (n - 1) s: short
replies are the ones a prefill pushes past a TPOT target.

A router knows this for the requests it sent: where (replica), how long (max_tokens) and
roughly when each decodes. Prefills on a replica run in routing order (the engine's
queue is FCFS), on the router's virtual prefill clock (`CacheAwarePolicy`'s backlog): a
request's first token comes when the clock passes the end of its own prefill, and if it
meets a TPOT target `tpot_s` its decode is over (n - 1) x `tpot_s` later. A new prefill
starting when the clock reads B stalls exactly the earlier requests whose decode ends
after B; as B only grows, a request whose decode ended before it never counts again. So
per replica: a heap of (decode end, 1 / (n - 1)) popped up to B, and the sum of what is
left. A finished request leaves at once.
"""

from __future__ import annotations

import heapq


class DecodeExposure:
    """One replica's in-flight decodes as a new prefill would stall them."""

    __slots__ = ("heap", "total", "live", "_seq")

    def __init__(self) -> None:
        # [decode end on the virtual prefill clock, tie-break, weight]; weight 0 = left.
        self.heap: list[list[float]] = []
        self.total = 0.0
        self.live = 0  # entries with weight left (0: the heap holds only finished ones)
        self._seq = 0

    def add(self, decode_end: float, weight: float) -> list[float]:
        """A request whose mean TPOT grows by `weight` per second of stall until
        `decode_end`; returns its entry (for `remove`)."""
        self._seq += 1
        entry = [decode_end, float(self._seq), weight]
        heapq.heappush(self.heap, entry)
        self.total += weight
        self.live += 1
        return entry

    def remove(self, entry: list[float]) -> None:
        """The request finished (or was given up) before its decode end."""
        if entry[2]:
            self.total = max(0.0, self.total - entry[2])
            entry[2] = 0.0
            self.live -= 1
            if not self.live:  # nothing left to stall: drop the finished entries at once
                self.heap.clear()
                self.total = 0.0

    def at(self, start: float) -> float:
        """TPOT growth, summed over the requests still decoding at `start`, per second of
        prefill started then (`start` never decreases between calls)."""
        heap = self.heap
        while heap and heap[0][0] <= start:
            entry = heapq.heappop(heap)
            if entry[2]:
                self.total -= entry[2]
                entry[2] = 0.0
                self.live -= 1
        if not self.live:
            heap.clear()
            self.total = 0.0
        if self.total < 1e-12:
            self.total = 0.0
        return self.total


__all__ = ["DecodeExposure"]
