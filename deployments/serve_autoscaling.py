"""Ray Serve replica autoscaling of one engine pool, derived from the typed config."""

from __future__ import annotations

from typing import Any

from autoscaling.queue_kv_policy import queue_kv_policy_config
from cluster.config import PoolConfig


def serve_autoscaling_config(pool: PoolConfig, *, queue_kv_policy: bool = False) -> dict[str, Any]:
    """The `autoscaling_config` of a pool's engine deployment.

    target_ongoing_requests is per replica: at that many in-flight requests Serve adds
    a replica (after upscale_delay_s); KubeRay's autoscaler then adds a GPU node when
    the new replica's placement group cannot be scheduled.

    With `queue_kv_policy`, the decision also follows engine queue depth and KV cache
    usage (autoscaling/queue_kv_policy.py); engines must then report `num_waiting` and
    `kv_usage` from `record_autoscaling_stats()`.
    """
    a = pool.autoscaling
    config: dict[str, Any] = {
        "min_replicas": pool.min_replicas,
        "max_replicas": pool.max_replicas,
        "initial_replicas": pool.start_replicas,
        "target_ongoing_requests": a.target_ongoing_requests,
        "upscale_delay_s": a.upscale_delay_s,
        "downscale_delay_s": a.downscale_delay_s,
        "upscaling_factor": a.upscaling_factor,
        "downscaling_factor": a.downscaling_factor,
    }
    if queue_kv_policy:
        config["policy"] = queue_kv_policy_config()
    return config
