"""The engine replicas of a running local cluster, as the fault tools see them: replica
ids (the gateway's X-Served-By) and their processes, Serve's replica states, and waits for
a pool to be whole again. Used by `cluster bench chaos` and the fault / drain e2e tests;
it needs a Ray connection (the process that started the local cluster has one)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection
from typing import Any

from deployments.serve_config import APP_NAME, engine_deployment


def replica_call(deployment: str, fn: Callable[[Any], Any], app: str = APP_NAME) -> dict[str, Any]:
    """`fn(replica actor)` run on every live replica of `deployment` (stopping ones
    included while they drain): replica id -> its result. Replicas that do not answer
    (dying, or on a lost node) are left out."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    out: dict[str, Any] = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        name = entry["name"] if isinstance(entry, dict) else entry
        if name.startswith(prefix):
            try:
                actor = ray.get_actor(name, namespace="serve")
                out[name[len(prefix) :]] = ray.get(actor.__ray_call__.remote(fn), timeout=10)
            except Exception:
                continue
    return out


def engine_replica_pids(pool: str, app: str = APP_NAME) -> dict[str, int]:
    """Live engine replica actors of `pool`: replica id -> pid."""
    return {r: int(pid) for r, pid in replica_call(engine_deployment(pool), lambda self: os.getpid(), app).items()}


def replica_nodes(deployment: str, app: str = APP_NAME) -> dict[str, str]:
    """Live replicas of `deployment`: replica id -> the Ray node id it runs on."""
    import ray

    return {
        r: str(n)
        for r, n in replica_call(deployment, lambda self: ray.get_runtime_context().get_node_id(), app).items()
    }


def replica_states(pool: str, app: str = APP_NAME) -> dict[str, int]:
    """Serve's replica counts of `pool` by state (RUNNING, STARTING, STOPPING, ...)."""
    from ray import serve

    status = serve.status().applications.get(app)
    dep = status.deployments.get(engine_deployment(pool)) if status is not None else None
    if dep is None:
        return {}
    return {str(getattr(k, "value", k)): int(v) for k, v in dep.replica_states.items()}


def replica_table(pool: str, app: str = APP_NAME) -> dict[str, str]:
    """Each replica of `pool` Serve's controller knows: replica id -> state (STARTING,
    RUNNING, STOPPING, ...)."""
    from cluster.upstream import ray_serve as upstream_ray

    return {
        str(r["replica_id"]): str(getattr(r["state"], "value", r["state"]))
        for r in upstream_ray.replica_details(app, engine_deployment(pool))
    }


def app_status(app: str = APP_NAME) -> str:
    from ray import serve

    status = serve.status().applications.get(app)
    return str(getattr(status.status, "value", status.status)) if status is not None else "NOT_STARTED"


def child_pids(pid: int) -> list[int]:
    """Processes whose parent is `pid` (the engine core a replica started)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except OSError:
                continue
    return out


def wait_pool(pool: str, replicas: int, timeout_s: float, *, gone: Collection[str] = ()) -> float | None:
    """Wait until `pool` serves with exactly `replicas` RUNNING replicas, none starting,
    none of the ids in `gone` among them (a SIGKILLed replica is listed RUNNING until
    Serve's health check notices), and the app RUNNING; replicas still stopping (draining)
    may linger. Seconds waited, or None at `timeout_s`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        table = replica_table(pool)
        running = {r for r, state in table.items() if state == "RUNNING"}
        settled = all(state in ("RUNNING", "STOPPING") for state in table.values())
        if len(running) == replicas and settled and not running & set(gone) and app_status() == "RUNNING":
            return time.monotonic() - t0
        time.sleep(1.0)
    return None


def running_replica_pids(pool: str) -> dict[str, int]:
    """RUNNING replicas of `pool` (not starting, not stopping): replica id -> pid."""
    table = replica_table(pool)
    return {r: pid for r, pid in engine_replica_pids(pool).items() if table.get(r) == "RUNNING"}
