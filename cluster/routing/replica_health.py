"""Replicas this gateway process saw fail, shared by the gateway and its pools' routers.

When an engine call fails (the replica died, is unreachable, or its engine errored) the
gateway marks the replica; every router in the process leaves it out of its candidates
at once, for `exclude_s`, instead of waiting a stats period or for Serve's controller to
notice. A replica that reports itself wedged in its routing stats is skipped the same way
by the router that reads them. Exclusion never empties a pool: when every candidate is
excluded the router uses them all (Serve may already have replaced the failed one).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from threading import Lock


class ReplicaHealth:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._until: dict[str, float] = {}
        self._lock = Lock()

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


# One per process: the gateway marks, the routers it owns read.
HEALTH = ReplicaHealth()

__all__ = ["HEALTH", "ReplicaHealth"]
