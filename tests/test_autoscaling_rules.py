"""Serve's rules around a policy decision, reimplemented without Ray for the simulator
(autoscaling/serve_rules.py), checked against Ray 2.60's own functions; and the SLO
policy's decisions."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from ray.serve._private.common import DeploymentID
from ray.serve.autoscaling_policy import (
    _apply_autoscaling_config,
    _apply_delay_logic,
    _apply_scaling_factors,
    replica_queue_length_autoscaling_policy,
)
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from autoscaling.serve_rules import (
    PolicyContext,
    ScalingRules,
    ServeAutoscaler,
    apply_delays,
    apply_scaling_factors,
    ongoing_requests_policy,
)
from autoscaling.slo_policy import ARRIVAL_RATE, QUEUE_WAIT_S, SLOAutoscalingPolicy

SERVE = {
    "min_replicas": 1,
    "max_replicas": 12,
    "target_ongoing_requests": 16.0,
    "upscale_delay_s": 30.0,
    "downscale_delay_s": 600.0,
    "upscaling_factor": 1.0,
    "downscaling_factor": 0.5,
    "metrics_interval_s": 10.0,
    "look_back_period_s": 30.0,
}


def ray_context(config: AutoscalingConfig, running: int, target: int, ongoing: float, now: float) -> AutoscalingContext:
    return AutoscalingContext(
        deployment_id=DeploymentID(name="engine-standard", app_name="mistral-large"),
        deployment_name="engine-standard",
        app_name="mistral-large",
        current_num_replicas=running,
        target_num_replicas=target,
        running_replicas=[],
        total_num_requests=ongoing,
        total_queued_requests=0.0,
        aggregated_metrics={},
        raw_metrics={},
        capacity_adjusted_min_replicas=config.min_replicas,
        capacity_adjusted_max_replicas=config.max_replicas,
        policy_state={},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=now,
        config=config,
    )


def our_context(rules: ScalingRules, running: int, target: int, ongoing: float, now: float = 0.0) -> PolicyContext:
    return PolicyContext(
        current_num_replicas=running,
        target_num_replicas=target,
        total_num_requests=ongoing,
        aggregated_metrics={},
        config=rules,
        current_time=now,
    )


@pytest.mark.parametrize(("up", "down"), [(1.0, 0.5), (2.0, 0.25), (0.5, 1.0)])
def test_scaling_factors_match_ray(up: float, down: float) -> None:
    config = AutoscalingConfig(**{**SERVE, "upscaling_factor": up, "downscaling_factor": down})
    rules = ScalingRules.from_serve_config({**SERVE, "upscaling_factor": up, "downscaling_factor": down})
    for desired, current in itertools.product([0.0, 0.4, 1.0, 2.5, 3.0, 7.9, 11.0, 30.0], [0, 1, 3, 8]):
        assert apply_scaling_factors(desired, current, rules) == _apply_scaling_factors(desired, current, config)


def test_delays_match_ray_over_a_decision_sequence() -> None:
    config = AutoscalingConfig(**SERVE)
    rules = ScalingRules.from_serve_config(SERVE)
    ours: dict[str, Any] = {}
    theirs: dict[str, Any] = {}
    target = 4
    # Up for 40 s (fires after 30 s), flip-flop, then down from 55 s (fires at the first tick after 655 s).
    desired_at = [(t, 6) for t in range(0, 40, 5)] + [(45, 2), (50, 6), (55, 2)] + [(t, 2) for t in range(60, 760, 20)]
    fired = []
    for t, desired in desired_at:
        a = apply_delays(desired, target, rules, ours, float(t))
        b, theirs = _apply_delay_logic(desired, target, config, theirs, _now=float(t))
        assert a == b, t
        if a != target:
            fired.append((t, a))
            target = a
    assert fired == [(30, 6), (660, 2)]


@pytest.mark.parametrize(("running", "ongoing"), [(1, 3.0), (2, 40.0), (4, 5.0), (0, 0.0), (0, 7.0)])
def test_the_default_policy_and_the_whole_wrapper_match_ray(running: int, ongoing: float) -> None:
    # Zero delays make Ray's wall-clock delay logic deterministic.
    serve = {**SERVE, "upscale_delay_s": 0.0, "downscale_delay_s": 0.0}
    config = AutoscalingConfig(**serve)
    rules = ScalingRules.from_serve_config(serve)
    target = max(running, 1)
    ray_desired, _ = replica_queue_length_autoscaling_policy(ray_context(config, running, target, ongoing, 0.0))
    our_desired, _ = ongoing_requests_policy(our_context(rules, running, target, ongoing))
    assert our_desired == pytest.approx(ray_desired)
    ray_decision, _ = _apply_autoscaling_config(replica_queue_length_autoscaling_policy)(
        ray_context(config, running, target, ongoing, 0.0)
    )
    ray_bounded = max(config.min_replicas, min(config.max_replicas, ray_decision))
    ours = ServeAutoscaler(ongoing_requests_policy, rules).decide(our_context(rules, running, target, ongoing))
    assert ours == ray_bounded


def slo_context(
    running: int, waits: list[float], rates: list[float] | None = None, target: int | None = None, now: float = 0.0
) -> PolicyContext:
    rules = ScalingRules.from_serve_config(SERVE)
    metrics = {QUEUE_WAIT_S: {f"r{i}": w for i, w in enumerate(waits)}}
    if rates is not None:
        metrics[ARRIVAL_RATE] = {f"r{i}": r for i, r in enumerate(rates)}
    return PolicyContext(
        current_num_replicas=running,
        target_num_replicas=target if target is not None else running,
        total_num_requests=16.0 * running,  # exactly the ongoing-requests target
        aggregated_metrics=metrics,
        config=rules,
        current_time=now,
    )


def test_slo_policy_without_engine_metrics_is_the_default() -> None:
    rules = ScalingRules.from_serve_config(SERVE)
    ctx = PolicyContext(
        current_num_replicas=3,
        target_num_replicas=3,
        total_num_requests=80.0,
        aggregated_metrics={},
        config=rules,
        current_time=0.0,
    )
    assert SLOAutoscalingPolicy()(ctx)[0] == pytest.approx(ongoing_requests_policy(ctx)[0])


def test_slo_policy_scales_out_on_long_waits_and_counts_starting_replicas() -> None:
    policy = SLOAutoscalingPolicy(target_queue_wait_s=0.5, max_step_up=2.0)
    desired, state = policy(slo_context(4, [1.5, 1.5, 0.5, 0.5]))  # mean 1.0 s: twice the target
    assert desired == pytest.approx(8.0) and state["mode"] == "up"
    # Five more already starting: the wait they will remove is still measured; no more asked.
    desired, _ = SLOAutoscalingPolicy(target_queue_wait_s=0.5)(slo_context(4, [1.0] * 4, target=9))
    assert desired == 9
    # Far above the target: at most max_step_up times the running replicas.
    assert SLOAutoscalingPolicy(target_queue_wait_s=0.5)(slo_context(4, [30.0] * 4))[0] == 8


def test_slo_policy_holds_between_thresholds_and_frees_below() -> None:
    policy = SLOAutoscalingPolicy(target_queue_wait_s=0.5, scale_down_below=0.25)
    ctx = slo_context(6, [0.3] * 6)
    ctx.total_num_requests = 16.0  # the ongoing-requests decision alone would be 1 replica
    desired, state = policy(ctx)
    assert desired == 6 and state["mode"] == "hold"
    ctx = slo_context(6, [0.05] * 6)
    ctx.total_num_requests = 16.0
    desired, state = SLOAutoscalingPolicy(target_queue_wait_s=0.5)(ctx)
    assert desired == pytest.approx(1.0) and state["mode"] == "free"


def test_slo_policy_anticipates_a_rising_arrival_rate() -> None:
    policy = SLOAutoscalingPolicy(target_queue_wait_s=0.5, trend_window_s=120.0, lead_s=300.0)
    # Total rate rising 1 req/s per 60 s, from 4 req/s; waits fine.
    for k in range(7):
        desired, state = policy(slo_context(4, [0.05] * 4, rates=[(4 + k * 10 / 60) / 4] * 4, now=10.0 * k))
    # Now 5 req/s, 300 s ahead 10 req/s: the ongoing-requests decision (4) doubles.
    assert state["rate_slope"] == pytest.approx(1 / 60)
    assert state["growth"] == pytest.approx(2.0)
    assert desired == pytest.approx(8.0)
    # A flat rate gives no growth.
    flat = SLOAutoscalingPolicy(lead_s=300.0)
    for k in range(7):
        desired, state = flat(slo_context(4, [0.05] * 4, rates=[1.0] * 4, now=10.0 * k))
    assert state["growth"] == 1.0 and desired == pytest.approx(4.0)


def test_slo_policy_rejects_meaningless_settings() -> None:
    with pytest.raises(ValueError, match="target_queue_wait_s"):
        SLOAutoscalingPolicy(target_queue_wait_s=0)
    with pytest.raises(ValueError, match="scale_down_below"):
        SLOAutoscalingPolicy(scale_down_below=1.0)


def test_queue_wait_meter_reports_admitted_and_still_waiting_requests_once() -> None:
    from autoscaling.engine_metrics import QueueWaitMeter

    meter = QueueWaitMeter(now=100.0)
    for _ in range(6):
        meter.on_request()
    # a: admitted after 0.5 s; b: still waiting since 101; c: not queued in the core yet.
    first = meter.report([("a", 100.0, 100.5), ("b", 101.0, 0.0), ("c", 0.0, 0.0)], now=102.0)
    assert first == {QUEUE_WAIT_S: pytest.approx((0.5 + 1.0) / 2), ARRIVAL_RATE: pytest.approx(3.0)}
    # a was reported already; b got scheduled at 102.5 (waited 1.5 s).
    second = meter.report([("a", 100.0, 100.5), ("b", 101.0, 102.5)], now=104.0)
    assert second == {QUEUE_WAIT_S: pytest.approx(1.5), ARRIVAL_RATE: 0.0}
    assert meter.report([], now=106.0) == {QUEUE_WAIT_S: 0.0, ARRIVAL_RATE: 0.0}
