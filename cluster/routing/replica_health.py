"""Replicas this gateway process saw fail, shared by the gateway and its pools' routers.

When an engine call fails (the replica died, is unreachable, or its engine errored) the
gateway marks the replica; every router in the process leaves it out of its candidates
at once, for `exclude_s`, instead of waiting a stats period or for Serve's controller to
notice. A replica that reports itself wedged in its routing stats is skipped the same way
by the router that reads them. Exclusion never empties a pool: when every candidate is
excluded the router uses them all (Serve may already have replaced the failed one).

Nor does a mark abandon a request that has nowhere else to go. The gateway stops waiting
on a replica marked failed only while another replica of a pool the request may use is
usable (`has_alternative`; the routers report their pools' members, `set_pool`): like
Envoy's outlier detection, which never ejects past `max_ejection_percent`. A replica that
looks wedged because the machine is starved (a replacement engine loading on the same
cores stalled the survivors' steps for 11-17 s in a CI run) is then waited for, not
given up with every request on it: that run failed 22 of 24 streams, all on the two
replicas left, both marked at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from threading import Lock


class ReplicaHealth:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._until: dict[str, float] = {}
        self._pools: dict[str, frozenset[str]] = {}  # pool -> its replicas, as its router knows them
        self._lock = Lock()

    def set_pool(self, pool: str, replica_ids: Iterable[str]) -> None:
        """The replicas a pool's router currently routes to (it calls this on every change)."""
        with self._lock:
            self._pools[pool] = frozenset(replica_ids)

    def mark_failed(self, replica_id: str, exclude_s: float) -> None:
        with self._lock:
            self._until[replica_id] = max(self._until.get(replica_id, 0.0), self._clock() + exclude_s)

    def is_excluded(self, replica_id: str) -> bool:
        with self._lock:
            until = self._until.get(replica_id)
            if until is None:
                return False
            if until <= self._clock():
                del self._until[replica_id]
                return False
            return True

    def usable(self, replica_ids: Iterable[str], also_excluded: Iterable[str] = ()) -> set[str]:
        """The ids that are neither marked failed nor in `also_excluded` (e.g. the replicas
        this request already failed on)."""
        skip = set(also_excluded)
        return {r for r in replica_ids if r not in skip and not self.is_excluded(r)}

    def has_alternative(self, replica_id: str, pools: Sequence[str], also_excluded: Iterable[str] = ()) -> bool:
        """Whether a request on `replica_id` could go elsewhere: a usable replica other
        than it in one of `pools`. True when no router reported any of those pools (this
        board cannot tell, so a mark is acted on as before)."""
        with self._lock:
            known = [self._pools[p] for p in pools if p in self._pools]
        if not known:
            return True
        others = set().union(*known) - {replica_id}
        return bool(self.usable(others, also_excluded))


# One per process: the gateway marks, the routers it owns read.
HEALTH = ReplicaHealth()

__all__ = ["HEALTH", "ReplicaHealth"]
