"""The figures an engine replica reports for autoscaling/slo_policy.py through Serve's
`record_autoscaling_stats()`, computed the same way by the real engine
(deployments/engine.py, from vLLM's per-request timestamps) and the simulator
(bench/sim/fleet.py):

* `queue_wait_s`: mean over the requests admitted since the last report (arrival to
  first scheduled: vLLM's scheduled_ts - queued_ts) and the requests still waiting
  (their wait so far), 0 when there are none. A preempted request that waits again is
  not counted twice (vLLM keeps its first scheduled_ts);
* `arrival_rate`: requests received per second since the last report.
"""

from __future__ import annotations

from collections.abc import Iterable

QUEUE_WAIT_S = "queue_wait_s"
ARRIVAL_RATE = "arrival_rate"


class QueueWaitMeter:
    def __init__(self, now: float) -> None:
        self._arrivals = 0
        self._since = now
        self._reported: set[str] = set()

    def on_request(self) -> None:
        self._arrivals += 1

    def report(self, requests: Iterable[tuple[str, float, float]], now: float) -> dict[str, float]:
        """`requests`: (id, queued time, first scheduled time or 0) of the unfinished
        requests, on the clock of `now`. Resets the interval."""
        waits: list[float] = []
        live: set[str] = set()
        for rid, queued, scheduled in requests:
            live.add(rid)
            if queued <= 0:
                continue  # not in the engine's queue yet
            if scheduled <= 0:
                waits.append(max(0.0, now - queued))
            elif rid not in self._reported:
                waits.append(max(0.0, scheduled - queued))
                self._reported.add(rid)
        self._reported &= live
        rate = self._arrivals / (now - self._since) if now > self._since else 0.0
        self._arrivals = 0
        self._since = now
        return {QUEUE_WAIT_S: sum(waits) / len(waits) if waits else 0.0, ARRIVAL_RATE: rate}
