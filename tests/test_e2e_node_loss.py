"""Node loss on a real multi-node Ray cluster (several raylets on this machine, shaped
like the chart: a head with the gateway, one node per worker pod advertising its pool's
resource). A standard-pool node is SIGKILLed with everything on it (raylet, replica,
vLLM engine) under streaming load: every request still succeeds and every cut stream is
migrated; the lost replica is not placed anywhere its pool may not go, and once a new
node of the pool joins (what KubeRay does on scale-up) the replacement lands there.
"""

from __future__ import annotations

import re
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from bench.live.replicas import replica_nodes
from cluster.ops.local_nodes import start_local_nodes
from cluster.profiles import load_profile
from deployments.serve_config import APP_NAME
from tests import node_clusters
from tests.node_clusters import NodeCluster
from tests.test_e2e_faults import MAX_TOKENS, assert_whole, stream_chat

pytestmark = [pytest.mark.e2e, pytest.mark.own_cluster]

STREAMS = 24
HEAL_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def node_cluster() -> Iterator[NodeCluster]:
    cfg = load_profile("cpu-tiny")  # standard: 2 replicas (one per pod), long: 1
    with node_clusters.node_cluster(cfg, start_local_nodes) as cluster:
        yield cluster


def running(deployment: str) -> int:
    from ray import serve

    app = serve.status().applications.get(APP_NAME)
    dep = app.deployments.get(deployment) if app is not None else None
    return int(dep.replica_states.get("RUNNING", 0)) if dep is not None else 0  # type: ignore[call-overload]


def migrations(http: httpx.Client, pool: str) -> float:
    text = http.get("/metrics").text
    found = re.search(rf'^mls_gateway_migrations_total\{{pool="{pool}"\}} (\S+)$', text, re.M)
    assert found, "the gateway exports mls_gateway_migrations_total"
    return float(found.group(1))


def test_losing_a_pool_node_under_streaming_load_loses_nothing(node_cluster: NodeCluster) -> None:
    nodes, serving = node_cluster.nodes, node_cluster.serving
    standard = {n.node_id: n for n in nodes.nodes_of("standard")}
    (long_node,) = nodes.nodes_of("long")
    # Pinning: each pool's replicas only on its own nodes (one per pod), the gateway on the head.
    placed = replica_nodes("engine-standard")
    assert sorted(placed.values()) == sorted(standard), placed
    assert list(replica_nodes("engine-long").values()) == [long_node.node_id]
    assert set(replica_nodes("gateway").values()) == {nodes.head_node_id}

    http = httpx.Client(base_url=serving.base_url, timeout=300)
    model = serving.cfg.model.served_name
    migrated_before = migrations(http, "standard")
    victim_replica, victim_node_id = sorted(placed.items())[0]
    victim = standard[victim_node_id]
    with ThreadPoolExecutor(STREAMS) as pool:
        futures = []
        for i in range(STREAMS):
            futures.append(pool.submit(stream_chat, http, model, f"Request {i}: tell me a long story."))
            time.sleep(0.1)
            # Three quarters of the load sent: the first streams (2 s old) are mid-reply, on
            # both replicas (distinct prompts: the router balances them by load).
            if i == STREAMS * 3 // 4:
                killed = nodes.kill(victim)
                print(f"killed node {victim_node_id[:8]} ({len(killed)} processes)", file=sys.stderr)
        results = [f.result() for f in futures]
    for result in results:
        assert_whole(result)
    migrated = migrations(http, "standard") - migrated_before
    served = Counter(r.served_by for r in results)
    assert migrated > 0, f"no stream was cut by the node loss (victim {victim_replica}; served by {dict(served)})"
    seconds = sorted(r.seconds for r in results)
    print(
        f"{len(results)} streams of {MAX_TOKENS} tokens: 0 failed, {migrated:.0f} migrated, "
        f"p50 {seconds[len(seconds) // 2]:.1f} s, slowest {seconds[-1]:.1f} s",
        file=sys.stderr,
    )

    # The lost replica's replacement has nowhere to go: the head and the long node have
    # CPUs to spare but no pool_standard, and the surviving standard node is full.
    (survivor_id,) = set(standard) - {victim_node_id}
    assert set(replica_nodes("engine-standard").values()) <= {survivor_id}
    assert running("engine-standard") == 1

    # A new node of the pool joins (KubeRay's scale-up): the replacement is placed on it.
    added = nodes.add_pool_node("standard")
    joined = time.monotonic()
    deadline = joined + HEAL_TIMEOUT_S
    while time.monotonic() < deadline and running("engine-standard") < 2:
        time.sleep(2)
    print(f"replacement running {time.monotonic() - joined:.0f} s after its node joined", file=sys.stderr)
    after = replica_nodes("engine-standard")
    assert running("engine-standard") == 2, after
    assert sorted(after.values()) == sorted([survivor_id, added.node_id]), after
    assert victim_replica not in after
    for i in range(4):
        assert_whole(stream_chat(http, model, f"After the node loss {i}."))
