"""Node loss on a real multi-node Ray cluster (several raylets on this machine, shaped
like the chart: a head with the gateway, one node per worker pod advertising its pool's
resource). A standard-pool node is SIGKILLed with everything on it (raylet, replica,
vLLM engine) under streaming load, chosen as the node of a replica seen streaming a reply:
every request still succeeds and every cut stream is migrated; the lost replica is not
placed anywhere its pool may not go, and once a new node of the pool joins (what KubeRay
does on scale-up) the replacement lands there.
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
from bench.live.streams import StreamResult, mid_reply, stream_chat
from cluster.ops.local_nodes import start_local_nodes
from cluster.profiles import load_profile
from deployments.serve_config import APP_NAME
from tests import node_clusters
from tests.node_clusters import NodeCluster
from tests.test_e2e_faults import MAX_TOKENS, assert_whole

pytestmark = [pytest.mark.e2e, pytest.mark.own_cluster]

# EARLY_STREAMS long replies before the loss, the rest of STREAMS after it.
STREAMS, EARLY_STREAMS, LONG_TOKENS = 24, 18, 160
MID_REPLY_TIMEOUT_S = 120
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
    live = [StreamResult() for _ in range(EARLY_STREAMS)]  # watched for the victim
    with ThreadPoolExecutor(STREAMS) as pool:
        futures = []
        for i, into in enumerate(live):
            text = f"Request {i}: tell me a long story."
            futures.append(pool.submit(stream_chat, http, model, text, max_tokens=LONG_TOKENS, into=into))
            time.sleep(0.1)
        # The victim is the node of the first standard replica seen streaming a reply (a
        # long one: still open when its node dies), so the loss cuts a stream for certain,
        # not by a timer that a slow machine outruns (the streams not begun are retried).
        deadline, victim_replica = time.monotonic() + MID_REPLY_TIMEOUT_S, None
        while victim_replica is None and time.monotonic() < deadline:
            victim_replica = next((r for r in mid_reply(live) if r in placed), None)
            time.sleep(0.05)
        assert victim_replica is not None, f"no standard replica streamed a reply: {mid_reply(live)}"
        victim_node_id = placed[victim_replica]
        killed = nodes.kill(standard[victim_node_id])
        print(f"killed node {victim_node_id[:8]} ({len(killed)} processes)", file=sys.stderr)
        for i in range(EARLY_STREAMS, STREAMS):  # sent after the loss
            text = f"Request {i}: a story."
            futures.append(pool.submit(stream_chat, http, model, text, max_tokens=MAX_TOKENS))
            time.sleep(0.1)
        results = [f.result() for f in futures]
    for result in results[:EARLY_STREAMS]:
        assert result.whole(LONG_TOKENS), result.why_not_whole(LONG_TOKENS)
    for result in results[EARLY_STREAMS:]:
        assert_whole(result)
    migrated = migrations(http, "standard") - migrated_before
    served = Counter(r.served_by for r in results)
    assert migrated > 0, f"no stream was cut by the node loss (victim {victim_replica}; served by {dict(served)})"
    seconds = sorted(r.seconds for r in results)
    print(
        f"{len(results)} streams ({EARLY_STREAMS} of {LONG_TOKENS} tokens before the loss, the rest of "
        f"{MAX_TOKENS} after): 0 failed, {migrated:.0f} migrated, "
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
        assert_whole(stream_chat(http, model, f"After the node loss {i}.", max_tokens=MAX_TOKENS))
