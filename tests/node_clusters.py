"""An own cluster on several local Ray nodes (cluster.ops.local_nodes) with the app on
it and a Redis of its own, for the node-loss and node-autoscaling e2e tests."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from cluster.config import ClusterConfig
from cluster.ops.local import LocalCluster, start_local_cluster
from cluster.ops.local_nodes import LocalNodes
from tests.conftest import stop_shared_cluster
from tests.redis_server import RedisServer


@dataclass
class NodeCluster:
    nodes: LocalNodes
    serving: LocalCluster


@contextlib.contextmanager
def node_cluster(cfg: ClusterConfig, start_nodes: Callable[[ClusterConfig], LocalNodes]) -> Iterator[NodeCluster]:
    """Stop the shared cluster, start the nodes (`start_nodes(cfg)`), serve `cfg` on them;
    everything is stopped again on exit."""
    stop_shared_cluster()
    redis = RedisServer().start()
    cfg.sessions.redis_url, cfg.sessions.redis_url_env = redis.url, None
    try:
        nodes = start_nodes(cfg)
        try:
            progress = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
            serving = start_local_cluster(cfg, address=nodes.address, progress=progress)
            try:
                yield NodeCluster(nodes, serving)
            finally:
                serving.stop()
        finally:
            nodes.shutdown()
    finally:
        redis.cleanup()
