"""The local multi-node cluster's node shapes follow the chart's worker groups, and the
gateway is pinned where the chart's CPU backend serves it (pure config logic)."""

from __future__ import annotations

from cluster.ops.helm_values import worker_group
from cluster.ops.local_nodes import pool_node_cpus
from cluster.profiles import load_profile
from deployments.app import placement_group_config
from deployments.serve_config import GATEWAY_RAY_RESOURCE, HEAD_NODE_RESOURCE, gateway_options


def test_a_pool_node_holds_exactly_its_pods_engine_replicas() -> None:
    cfg = load_profile("cpu-tiny")
    for pool in cfg.pools:
        bundles = placement_group_config(cfg, pool)["bundles"]
        # The node advertises one pool unit per bundle, as the chart's worker pod does.
        assert worker_group(cfg, pool)["rayResources"] == {pool.ray_resource: len(bundles)}
        # Bundle CPUs plus the replica actor's CPU (ray.serve.llm merges it into bundle 0).
        assert pool_node_cpus(cfg, pool) == sum(b["CPU"] for b in bundles) + 1


def test_the_gateway_runs_on_the_head_on_cpu_and_on_its_group_on_gpu() -> None:
    cpu = gateway_options(load_profile("cpu-tiny"))["ray_actor_options"]["resources"]
    assert set(cpu) == {HEAD_NODE_RESOURCE}
    gpu = gateway_options(load_profile("h100x8-bf16"))
    assert gpu["ray_actor_options"]["resources"] == {GATEWAY_RAY_RESOURCE: 1}
    assert gpu["max_replicas_per_node"] == 1
