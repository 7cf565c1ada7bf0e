"""What Ray Serve does around an autoscaling policy's decision, without Ray, so the
simulator can run the policy objects exactly as Serve's controller does.

Ray 2.60 (serve/autoscaling_policy.py `_apply_autoscaling_config` and
serve/_private/autoscaling_state.py `get_decision_num_replicas`), per control-loop tick:

1. cold-start fast path: no running replica but requests -> max(ceil(upscaling_factor),
   target) at once;
2. the policy's desired count (a float is fine);
3. scaling factors on the difference to the *running* count (ceil; a scale-down that
   the factor rounds away still drops one replica);
4. delays against the current *target*: the same direction must persist for
   upscale_delay_s / downscale_delay_s of clock time; a change of direction restarts it;
   scale-down keeps at least one replica (scale to zero is 1 -> 0 only);
5. ceil and clip to [min_replicas, max_replicas].

`PolicyContext` carries the fields of Serve's AutoscalingContext that policies read.
tests/test_autoscaling_rules.py checks these rules against Ray's own functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

# Keys of Serve's internal delay state (ray.serve._private.constants).
DECISION_COUNTER = "__decision_counters"
DECISION_TIMESTAMP = "__decision_timestamp"
DELAY_EPS_S = 1e-6


@dataclass(frozen=True)
class ScalingRules:
    """The AutoscalingConfig fields Serve applies; the methods policies call on
    `ctx.config` have Serve's names."""

    min_replicas: int
    max_replicas: int
    target_ongoing_requests: float
    upscale_delay_s: float
    downscale_delay_s: float
    upscaling_factor: float = 1.0
    downscaling_factor: float = 1.0
    metrics_interval_s: float = 10.0
    look_back_period_s: float = 30.0

    @classmethod
    def from_serve_config(cls, config: Mapping[str, Any]) -> ScalingRules:
        """From the dict `serve_autoscaling_config` renders."""
        return cls(
            min_replicas=int(config["min_replicas"]),
            max_replicas=int(config["max_replicas"]),
            target_ongoing_requests=float(config["target_ongoing_requests"]),
            upscale_delay_s=float(config["upscale_delay_s"]),
            downscale_delay_s=float(config["downscale_delay_s"]),
            upscaling_factor=float(config.get("upscaling_factor") or 1.0),
            downscaling_factor=float(config.get("downscaling_factor") or 1.0),
            metrics_interval_s=float(config.get("metrics_interval_s", 10.0)),
            look_back_period_s=float(config.get("look_back_period_s", 30.0)),
        )

    def get_target_ongoing_requests(self) -> float:
        return self.target_ongoing_requests

    def get_upscaling_factor(self) -> float:
        return self.upscaling_factor

    def get_downscaling_factor(self) -> float:
        return self.downscaling_factor


@dataclass
class PolicyContext:
    """The AutoscalingContext fields a policy reads (same names)."""

    current_num_replicas: int  # running replicas
    target_num_replicas: int  # what the controller currently aims for (incl. starting)
    total_num_requests: float  # ongoing requests over the running replicas, look-back mean
    aggregated_metrics: dict[str, dict[str, float]]  # custom metric -> replica -> look-back mean
    config: ScalingRules
    current_time: float
    running_replicas: list[str] = field(default_factory=list)
    total_queued_requests: float = 0.0
    raw_metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    policy_state: dict[str, Any] = field(default_factory=dict)
    last_scale_up_time: float | None = None
    last_scale_down_time: float | None = None

    @property
    def capacity_adjusted_min_replicas(self) -> int:
        return self.config.min_replicas

    @property
    def capacity_adjusted_max_replicas(self) -> int:
        return self.config.max_replicas


Policy = Callable[[Any], tuple[float, dict[str, Any]]]


def ongoing_requests_policy(ctx: Any) -> tuple[float, dict[str, Any]]:
    """Serve's default policy (replica_queue_length_autoscaling_policy): running
    replicas x ongoing / (target x running), i.e. ongoing / target."""
    running = ctx.current_num_replicas
    if running == 0:
        return ctx.target_num_replicas, {}
    return running * ctx.total_num_requests / (ctx.config.get_target_ongoing_requests() * running), {}


def apply_scaling_factors(desired: float, current: int, rules: ScalingRules) -> int:
    if current == 0:
        return math.ceil(desired)
    delta = desired - current
    factor = rules.get_upscaling_factor() if delta > 0 else rules.get_downscaling_factor()
    scaled = math.ceil(current + factor * delta)
    if math.ceil(float(desired)) < current and scaled == current:
        scaled -= 1
    return scaled


def apply_delays(desired: int, target: int, rules: ScalingRules, state: dict[str, Any], now: float) -> int:
    """Serve's _apply_delay_logic; updates `state` in place."""
    decision = target
    counter = state.get(DECISION_COUNTER, 0)
    since = state.get(DECISION_TIMESTAMP)
    if desired > target:
        if counter < 0:
            counter, since = 0, None
        counter += 1
        if since is None:
            since = now
        if now - since + DELAY_EPS_S >= rules.upscale_delay_s:
            counter, since, decision = 0, None, desired
    elif desired < target:
        if counter > 0:
            counter, since = 0, None
        counter -= 1
        if target != 1:
            desired = max(1, desired)
        if since is None:
            since = now
        if now - since + DELAY_EPS_S >= rules.downscale_delay_s:
            counter, since, decision = 0, None, desired
    else:
        counter, since = 0, None
    state[DECISION_COUNTER] = counter
    state[DECISION_TIMESTAMP] = since
    return decision


class ServeAutoscaler:
    """One deployment's controller-side decision: a policy object wrapped in Serve's rules."""

    def __init__(self, policy: Policy, rules: ScalingRules) -> None:
        self.policy = policy
        self.rules = rules
        self.state: dict[str, Any] = {}  # the delay state
        self.last_policy_state: dict[str, Any] = {}

    def decide(self, ctx: PolicyContext) -> int:
        rules = self.rules
        if ctx.current_num_replicas == 0 and ctx.total_num_requests > 0:
            decision = max(math.ceil(rules.get_upscaling_factor()), ctx.target_num_replicas)
        else:
            desired, self.last_policy_state = self.policy(ctx)
            scaled = apply_scaling_factors(desired, ctx.current_num_replicas, rules)
            if ctx.current_num_replicas == 0 and scaled > 0:
                decision = scaled
            else:
                decision = apply_delays(max(0, scaled), ctx.target_num_replicas, rules, self.state, ctx.current_time)
        return max(rules.min_replicas, min(rules.max_replicas, math.ceil(decision)))
