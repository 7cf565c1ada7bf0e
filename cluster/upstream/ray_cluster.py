"""Several Ray nodes on one machine (Ray 2.60's `ray.cluster_utils.Cluster`, a
DeveloperAPI that Ray's own multi-node tests use; its nodes are `ray._private.node.Node`),
optionally with Ray's node autoscaler driving a fake node provider.

Each node is a raylet of its own (with its object store and workers) joined to one GCS,
so node-level behaviour (placement groups packed on one node, custom node resources,
a node lost with everything on it, nodes added for pending placement groups and removed
when idle) can be exercised without a second machine.

The autoscaler's fake provider (`ray.autoscaler._private.fake_multi_node`, what Ray
tests its autoscaler with) is loaded as an "external" provider: the 2.60 wheel does not
ship the `example.yaml` that `type: fake_multinode` reads its defaults from
(FileNotFoundError in the autoscaler monitor), so the defaults are written out here.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
from typing import Any

FAKE_PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"
# The fake provider names the head by this id and its nodes by ids it makes up: with
# use_node_id_as_ip the autoscaler matches a node's resource reports by node id, so the
# head's raylet must take this id (what `ray start --head --fixed-head-id` does).
FAKE_HEAD_NODE_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"
HEAD_NODE_TYPE = "ray.head.default"

# A node's process-table keys (ray._private.ray_constants.PROCESS_TYPE_RAYLET, _MONITOR).
_RAYLET = "raylet"
_MONITOR = "monitor"


def start_head(
    *, num_cpus: int, resources: dict[str, float], gcs_port: int, object_store_bytes: int, system_config: dict[str, Any]
) -> Any:
    """A Cluster with its head node started (GCS on `gcs_port`); nothing connected yet."""
    from ray.cluster_utils import Cluster

    return Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": num_cpus,
            "resources": resources,
            "gcs_server_port": gcs_port,
            "object_store_memory": object_store_bytes,
            "include_dashboard": False,
            "_system_config": system_config,
        },
    )


def autoscaling_config(
    *, gcs_address: str, head_resources: dict[str, float], node_types: dict[str, dict[str, Any]], idle_timeout_s: float
) -> dict[str, Any]:
    """The autoscaler's cluster config for the fake provider. `node_types`: name ->
    {"resources": {...}, "min_workers": n, "max_workers": m} (resources include CPU and
    may include object_store_memory, in bytes)."""
    types: dict[str, Any] = {name: {"node_config": {}, **t} for name, t in node_types.items()}
    types[HEAD_NODE_TYPE] = {"resources": dict(head_resources), "node_config": {}, "max_workers": 0}
    return {
        "cluster_name": "local-nodes",
        "max_workers": sum(int(t["max_workers"]) for t in node_types.values()),
        "provider": {
            "type": "external",
            "module": FAKE_PROVIDER,
            "gcs_address": gcs_address,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": types,
        "head_node_type": HEAD_NODE_TYPE,
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_s / 60,
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }


def start_autoscaling_head(
    *,
    num_cpus: int,
    gcs_port: int,
    object_store_bytes: int,
    system_config: dict[str, Any],
    node_types: dict[str, dict[str, Any]],
    idle_timeout_s: float,
    update_interval_s: int = 1,
) -> Any:
    """A Cluster whose head runs Ray's autoscaler over the fake provider: it starts a
    node of a type in `node_types` when resource demand (a pending placement group)
    needs one and stops a node idle for `idle_timeout_s`."""
    from ray.cluster_utils import Cluster
    from ray.util import get_node_ip_address

    config = autoscaling_config(
        gcs_address=f"{get_node_ip_address()}:{gcs_port}",
        head_resources={"CPU": num_cpus},
        node_types=node_types,
        idle_timeout_s=idle_timeout_s,
    )
    fd, path = tempfile.mkstemp(prefix="ray-autoscaling-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(config, f)
    # Read by the autoscaler monitor the head starts (it inherits this environment).
    os.environ["RAY_FAKE_CLUSTER"] = "1"
    os.environ["AUTOSCALER_UPDATE_INTERVAL_S"] = str(update_interval_s)
    return Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": num_cpus,
            "gcs_server_port": gcs_port,
            "object_store_memory": object_store_bytes,
            "include_dashboard": False,
            "autoscaling_config": path,
            "env_vars": {"RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID},
            "_system_config": system_config,
        },
    )


def add_node(cluster: Any, *, num_cpus: int, resources: dict[str, float], object_store_bytes: int) -> Any:
    """Start one more raylet joined to `cluster`; returns once the GCS lists it."""
    return cluster.add_node(num_cpus=num_cpus, resources=resources, object_store_memory=object_store_bytes)


def node_id(node: Any) -> str:
    """The node's Ray node id (hex), as `ray.get_runtime_context().get_node_id()` gives it."""
    return str(node.node_id)


def raylet_pid(node: Any) -> int:
    return int(node.all_processes[_RAYLET][0].process.pid)


def process_tree(pid: int) -> list[int]:
    """`pid` and every process below it (a raylet's workers, their engine processes)."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [pid] + [p.pid for p in root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_node(cluster: Any, node: Any) -> list[int]:
    """Lose `node` the way a machine is lost: SIGKILL its raylet and every process under
    it at once (workers, replicas, their vLLM engine processes; none gets to say goodbye),
    then drop the node's remaining processes (object store, agents) from the cluster.
    Returns the pids killed."""
    pids = process_tree(raylet_pid(node))
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    cluster.remove_node(node, allow_graceful=False)
    return pids


def shutdown(cluster: Any, grace_s: float = 5.0) -> None:
    """Stop every node. The autoscaler's nodes are processes of its monitor, which the
    Cluster does not know: they are stopped first (SIGTERM, SIGKILL after `grace_s`)."""
    import psutil

    head = cluster.head_node
    monitors = head.all_processes.get(_MONITOR, []) if head is not None else []
    started = [p for m in monitors for p in process_tree(int(m.process.pid))[1:]]
    procs = []
    for pid in started:
        try:
            proc = psutil.Process(pid)
            proc.terminate()
            procs.append(proc)
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    cluster.shutdown()
