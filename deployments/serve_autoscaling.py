"""Ray Serve replica autoscaling of one engine pool, derived from the typed config."""

from __future__ import annotations

import importlib
from typing import Any

from autoscaling import queue_kv_policy, slo_policy
from autoscaling.cold_start import cold_start
from autoscaling.serve_rules import Policy, ongoing_requests_policy
from cluster.config import ClusterConfig, PoolConfig

# Policy name in the typed config -> the import path Serve loads (None: Serve's default).
POLICY_IMPORT_PATHS: dict[str, str | None] = {
    "ongoing-requests": None,
    "queue-kv": queue_kv_policy.POLICY_IMPORT_PATH,
    "slo": slo_policy.POLICY_IMPORT_PATH,
}


def policy_kwargs(cfg: ClusterConfig, pool: PoolConfig) -> dict[str, Any]:
    """Constructor arguments of the pool's policy class (also what the simulator uses)."""
    a = pool.autoscaling
    if a.policy == "queue-kv":
        q = a.queue_kv
        return {
            "target_waiting_per_replica": q.target_waiting_per_replica,
            "target_kv_usage": q.target_kv_usage,
            "kv_hold": q.kv_hold,
        }
    if a.policy == "slo":
        s = a.slo
        # Look as far ahead as a replica asked for now needs to serve (a new node's).
        lead = s.lead_s if s.lead_s is not None else cold_start(cfg, pool).on_new_node_s
        return slo_policy.slo_policy_kwargs(s.target_queue_wait_s, s.scale_down_below, s.trend_window_s, lead)
    return {}


def serve_autoscaling_config(cfg: ClusterConfig, pool: PoolConfig) -> dict[str, Any]:
    """The `autoscaling_config` of a pool's engine deployment.

    target_ongoing_requests is per replica: at that many in-flight requests Serve's
    default policy adds a replica (after upscale_delay_s); KubeRay's autoscaler then adds
    a GPU node when the new replica's placement group cannot be scheduled.

    `autoscaling.policy` picks the decision: Serve's default on ongoing requests, or one
    of ours (`queue-kv`: engine queue depth and KV usage; `slo`: measured queue wait and
    the arrival-rate trend), which read the engines' `record_autoscaling_stats()`.
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
        "metrics_interval_s": a.metrics_interval_s,
        "look_back_period_s": a.look_back_period_s,
    }
    path = POLICY_IMPORT_PATHS[a.policy]
    if path is not None:
        config["policy"] = {"policy_function": path, "policy_kwargs": policy_kwargs(cfg, pool)}
    return config


def make_policy(cfg: ClusterConfig, pool: PoolConfig) -> Policy:
    """The policy object Serve's controller builds for the pool (the class at the import
    path, instantiated once with its kwargs), or Serve's default policy without Ray."""
    path = POLICY_IMPORT_PATHS[pool.autoscaling.policy]
    if path is None:
        return ongoing_requests_policy
    module, name = path.split(":")
    policy: Policy = getattr(importlib.import_module(module), name)(**policy_kwargs(cfg, pool))
    return policy
