"""A Ray Serve autoscaling policy for engine pools that also watches queue depth and KV
cache usage, not only ongoing requests.

Ray's default policy scales on ongoing requests per replica. For a 123B model that misses
two cases: a long-context pool whose few requests fill the KV cache (ongoing requests stay
low while new sequences wait), and scale-down while the caches are busy (dropping a
replica throws away its prefix cache). This policy takes the default decision and
raises it when engines report waiting requests or a nearly full KV cache, and holds the
replica count while caches are in use.

Engines report the figures through Serve's custom autoscaling metrics: an engine
deployment's `record_autoscaling_stats()` returns the same keys as its routing stats
(`num_waiting`, `kv_usage`), which Serve aggregates per replica over
`look_back_period_s`. Without them the policy is exactly the default one.

Ray 2.60 wraps the result with the pool's min/max replicas, up/downscale delays and
scaling factors (serve/_private/autoscaling_state.py: _apply_autoscaling_config).
"""

from __future__ import annotations

from typing import Any

# Metric names the engine's record_autoscaling_stats() reports (the routing-stats keys).
NUM_WAITING = "num_waiting"
KV_USAGE = "kv_usage"

POLICY_IMPORT_PATH = "autoscaling.queue_kv_policy:QueueKVAutoscalingPolicy"


class QueueKVAutoscalingPolicy:
    """Desired replicas = max(default ongoing-requests decision, waiting-queue decision,
    KV-usage decision); no scale-down while mean KV usage is above `kv_hold`.

    Serve instantiates the class once per deployment with `policy_kwargs` and calls it
    every control-loop tick with an `AutoscalingContext`.
    """

    def __init__(
        self,
        target_waiting_per_replica: float = 4.0,
        target_kv_usage: float = 0.85,
        kv_hold: float = 0.5,
    ) -> None:
        if target_waiting_per_replica <= 0:
            raise ValueError(f"target_waiting_per_replica must be > 0, got {target_waiting_per_replica}")
        if not 0 < target_kv_usage <= 1:
            raise ValueError(f"target_kv_usage must be in (0, 1], got {target_kv_usage}")
        if not 0 <= kv_hold <= 1:
            raise ValueError(f"kv_hold must be in [0, 1], got {kv_hold}")
        self.target_waiting_per_replica = target_waiting_per_replica
        self.target_kv_usage = target_kv_usage
        self.kv_hold = kv_hold

    def __call__(self, ctx: Any) -> tuple[float, dict[str, Any]]:
        current = ctx.current_num_replicas
        if current == 0:
            # Cold start is Serve's business (it scales to initial/min replicas).
            return ctx.target_num_replicas, {}
        target_ongoing = ctx.config.get_target_ongoing_requests()
        by_requests = ctx.total_num_requests / target_ongoing

        metrics = ctx.aggregated_metrics or {}
        waiting = list((metrics.get(NUM_WAITING) or {}).values())
        kv = list((metrics.get(KV_USAGE) or {}).values())
        total_waiting = sum(waiting)
        mean_kv = sum(kv) / len(kv) if kv else 0.0

        # Enough replicas that each holds at most the target number of waiting requests.
        by_waiting = total_waiting / self.target_waiting_per_replica
        # KV only argues for more replicas while requests actually wait for cache space.
        by_kv = current * mean_kv / self.target_kv_usage if kv and total_waiting > 0 else 0.0

        desired = max(by_requests, by_waiting, by_kv)
        held = desired < current and mean_kv > self.kv_hold
        if held:
            desired = current
        state = {
            "by_requests": by_requests,
            "by_waiting": by_waiting,
            "by_kv": by_kv,
            "mean_kv_usage": mean_kv,
            "total_waiting": total_waiting,
            "held_for_kv": held,
        }
        return desired, state
