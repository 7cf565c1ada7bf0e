"""The queue/KV-aware Serve autoscaling policy, driven with Ray's own AutoscalingConfig
and AutoscalingContext objects (pure decision logic; no cluster)."""

from __future__ import annotations

from typing import Any

import pytest
from ray.serve._private.common import DeploymentID
from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from autoscaling.queue_kv_policy import POLICY_IMPORT_PATH, QueueKVAutoscalingPolicy
from cluster.profiles import load_profile
from deployments.serve_autoscaling import serve_autoscaling_config


def serve_config(queue_kv_policy: bool) -> AutoscalingConfig:
    cfg = load_profile("h200x4-fp8")
    pool = cfg.pool("long")
    pool.autoscaling.policy = "queue-kv" if queue_kv_policy else "ongoing-requests"
    pool.autoscaling.target_ongoing_requests = 16  # the figures below are worked out at 16
    return AutoscalingConfig(**serve_autoscaling_config(cfg, pool))


def context(
    config: AutoscalingConfig,
    replicas: int,
    ongoing: float,
    waiting: list[float] | None = None,
    kv: list[float] | None = None,
) -> AutoscalingContext:
    metrics: dict[str, dict[Any, float]] = {}
    if waiting is not None:
        metrics["num_waiting"] = {f"r{i}": w for i, w in enumerate(waiting)}
    if kv is not None:
        metrics["kv_usage"] = {f"r{i}": u for i, u in enumerate(kv)}
    return AutoscalingContext(
        deployment_id=DeploymentID(name="engine-long", app_name="mistral-large"),
        deployment_name="engine-long",
        app_name="mistral-large",
        current_num_replicas=replicas,
        target_num_replicas=replicas,
        running_replicas=[],
        total_num_requests=ongoing,
        total_queued_requests=0.0,
        aggregated_metrics=metrics,
        raw_metrics={},
        capacity_adjusted_min_replicas=config.min_replicas,
        capacity_adjusted_max_replicas=config.max_replicas,
        policy_state={},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=1000.0,
        config=config,
    )


def test_serve_accepts_the_policy_config() -> None:
    config = serve_config(queue_kv_policy=True)
    assert config.policy.policy_function == POLICY_IMPORT_PATH
    policy_cls = config.policy.get_policy()  # what Serve's controller deserializes
    assert policy_cls.__name__ == "QueueKVAutoscalingPolicy"
    instance = policy_cls(**config.policy.policy_kwargs)
    assert instance.target_kv_usage == 0.85
    # ongoing-requests is Ray's own policy.
    assert serve_config(queue_kv_policy=False).policy.is_default_policy_function()


@pytest.mark.parametrize(("replicas", "ongoing"), [(2, 10.0), (2, 64.0), (4, 5.0)])
def test_without_engine_metrics_it_decides_like_the_default_policy(replicas: int, ongoing: float) -> None:
    config = serve_config(queue_kv_policy=True)
    ctx = context(config, replicas, ongoing)
    ours, _ = QueueKVAutoscalingPolicy()(ctx)
    default, _ = replica_queue_length_autoscaling_policy(context(config, replicas, ongoing))
    assert ours == pytest.approx(default)


def test_full_kv_with_waiting_requests_scales_out() -> None:
    config = serve_config(queue_kv_policy=True)  # target 16 ongoing per replica
    # 2 replicas, 20 ongoing (default: 1.25 replicas) but caches full and 3 waiting.
    ctx = context(config, 2, 20.0, waiting=[2, 1], kv=[0.99, 0.97])
    desired, state = QueueKVAutoscalingPolicy(target_kv_usage=0.85)(ctx)
    assert desired == pytest.approx(2 * 0.98 / 0.85)
    assert state["by_kv"] == desired and not state["held_for_kv"]


def test_deep_queues_scale_out() -> None:
    config = serve_config(queue_kv_policy=True)
    ctx = context(config, 2, 30.0, waiting=[10, 14], kv=[0.6, 0.6])
    desired, state = QueueKVAutoscalingPolicy(target_waiting_per_replica=4)(ctx)
    assert desired == pytest.approx(24 / 4)
    assert state["total_waiting"] == 24


def test_busy_caches_hold_the_replica_count() -> None:
    config = serve_config(queue_kv_policy=True)
    # Light load would scale 4 -> 1, but the caches hold warm prefixes.
    desired, state = QueueKVAutoscalingPolicy(kv_hold=0.5)(context(config, 4, 8.0, waiting=[0] * 4, kv=[0.7] * 4))
    assert desired == 4 and state["held_for_kv"]
    # Idle caches: scale down as the default policy would.
    desired, state = QueueKVAutoscalingPolicy(kv_hold=0.5)(context(config, 4, 8.0, waiting=[0] * 4, kv=[0.1] * 4))
    assert desired == pytest.approx(8.0 / config.get_target_ongoing_requests()) and not state["held_for_kv"]


def test_rejects_meaningless_settings() -> None:
    with pytest.raises(ValueError, match="target_kv_usage"):
        QueueKVAutoscalingPolicy(target_kv_usage=1.5)
    with pytest.raises(ValueError, match="target_waiting_per_replica"):
        QueueKVAutoscalingPolicy(target_waiting_per_replica=0)
