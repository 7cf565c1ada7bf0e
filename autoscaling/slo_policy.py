"""A Ray Serve autoscaling policy that scales an engine pool on the latency it delivers,
not on a request count: measured queue wait against a target, plus an anticipation of
the arrival rate over the pool's cold start.

Why: a fixed `target_ongoing_requests` means different latencies for 500-token and
30k-token prompts, and a replica asked for when the queue is already long arrives
minutes later (weight load + engine start). So:

* feedback: when the mean queue wait (time from arrival to the start of prefill, the
  part of TTFT that more replicas remove) is above `target_queue_wait_s`, ask for
  `current * wait / target` replicas (at most `max_step_up` times the current count);
* anticipation: fit the total arrival rate's trend over `trend_window_s` and scale the
  ongoing-requests decision by the rate expected `lead_s` from now (Little's law: at a
  fixed latency, ongoing requests grow with the arrival rate);
* scale down only while the wait is below `scale_down_below * target`, to the
  anticipated ongoing-requests decision; in between, hold.

Engines report `queue_wait_s` and `arrival_rate` (autoscaling/engine_metrics.py)
through `record_autoscaling_stats()`; Serve averages them per replica over
`look_back_period_s`. Without them the policy decides like Serve's default. Ray applies
min/max replicas, delays and scaling factors around the decision
(serve/autoscaling_policy.py: _apply_autoscaling_config). No Ray imports: the simulator
calls the same object with its own context.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from autoscaling.engine_metrics import ARRIVAL_RATE, QUEUE_WAIT_S

POLICY_IMPORT_PATH = "autoscaling.slo_policy:SLOAutoscalingPolicy"


class SLOAutoscalingPolicy:
    def __init__(
        self,
        target_queue_wait_s: float = 0.5,
        scale_down_below: float = 0.25,
        trend_window_s: float = 120.0,
        lead_s: float = 300.0,
        max_step_up: float = 2.0,
        max_growth: float = 3.0,
    ) -> None:
        if target_queue_wait_s <= 0:
            raise ValueError(f"target_queue_wait_s must be > 0, got {target_queue_wait_s}")
        if not 0 <= scale_down_below < 1:
            raise ValueError(f"scale_down_below must be in [0, 1), got {scale_down_below}")
        if trend_window_s <= 0 or lead_s < 0:
            raise ValueError(f"trend_window_s must be > 0 and lead_s >= 0, got {trend_window_s}, {lead_s}")
        if max_step_up < 1 or max_growth < 1:
            raise ValueError(f"max_step_up and max_growth must be >= 1, got {max_step_up}, {max_growth}")
        self.target_queue_wait_s = target_queue_wait_s
        self.scale_down_below = scale_down_below
        self.trend_window_s = trend_window_s
        self.lead_s = lead_s
        self.max_step_up = max_step_up
        self.max_growth = max_growth
        # (time, total arrival rate) samples for the trend; one instance per deployment.
        self._rates: deque[tuple[float, float]] = deque()

    def _growth(self, now: float, rate: float) -> tuple[float, float]:
        """(projected rate / current rate, slope in requests/s per s) from a least-squares
        fit of the rate over the trend window; never below 1 (anticipation only adds)."""
        rates = self._rates
        rates.append((now, rate))
        while rates and rates[0][0] < now - self.trend_window_s:
            rates.popleft()
        n = len(rates)
        if n < 3 or rate <= 0:
            return 1.0, 0.0
        mt = sum(t for t, _ in rates) / n
        mr = sum(r for _, r in rates) / n
        var = sum((t - mt) ** 2 for t, _ in rates)
        if var <= 0:
            return 1.0, 0.0
        slope = sum((t - mt) * (r - mr) for t, r in rates) / var
        fitted_now = mr + slope * (now - mt)
        if fitted_now <= 0:
            return 1.0, slope
        projected = fitted_now + max(0.0, slope) * self.lead_s
        return min(self.max_growth, max(1.0, projected / fitted_now)), slope

    def __call__(self, ctx: Any) -> tuple[float, dict[str, Any]]:
        current = ctx.current_num_replicas
        if current == 0:
            return ctx.target_num_replicas, {}
        by_requests = ctx.total_num_requests / ctx.config.get_target_ongoing_requests()
        metrics = ctx.aggregated_metrics or {}
        waits = list((metrics.get(QUEUE_WAIT_S) or {}).values())
        rates = list((metrics.get(ARRIVAL_RATE) or {}).values())
        if not waits:
            return by_requests, {"by_requests": by_requests, "measured": False}
        wait = sum(waits) / len(waits)
        now = float(ctx.current_time or 0.0)
        growth, slope = self._growth(now, sum(rates)) if rates else (1.0, 0.0)
        anticipated = by_requests * growth
        target = self.target_queue_wait_s
        # Replicas already asked for (target > current: still starting) count as added:
        # the wait they will remove is still measured until they serve.
        asked = float(max(ctx.target_num_replicas, current))
        if wait > target:
            desired = max(anticipated, asked, current * min(self.max_step_up, wait / target))
            mode = "up"
        elif wait < self.scale_down_below * target:
            desired = anticipated
            mode = "free"
        else:
            desired = max(asked, anticipated)
            mode = "hold"
        state = {
            "by_requests": by_requests,
            "queue_wait_s": wait,
            "arrival_rate": sum(rates),
            "rate_slope": slope,
            "growth": growth,
            "mode": mode,
            "measured": True,
        }
        return desired, state


def slo_policy_kwargs(
    target_queue_wait_s: float, scale_down_below: float, trend_window_s: float, lead_s: float
) -> dict[str, Any]:
    return {
        "target_queue_wait_s": target_queue_wait_s,
        "scale_down_below": scale_down_below,
        "trend_window_s": trend_window_s,
        "lead_s": lead_s,
    }
