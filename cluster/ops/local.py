"""Start and stop the whole cluster on this machine: Ray (in-process head), Serve, the app.

Ray's GCS would default to port 6379, which Redis owns here: every Ray port we can name
is an explicit free port. Ray gets more logical CPUs than the machine has cores: each
engine replica's placement group takes its TP bundles plus one CPU for the replica
actor, and with exactly-as-many logical CPUs as cores the gateway could never be
scheduled (it waits forever, without an error). Logical CPUs are bookkeeping only.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cluster.config import ClusterConfig
from cluster.upstream import ray_serve as upstream_ray
from deployments.serve_config import APP_NAME, controller_env, engine_env

Progress = Callable[[str], None]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def replica_room(cfg: ClusterConfig, replicas: int) -> int:
    """Replicas a pool of at most `replicas` may run at once: its size plus the new ones a
    redeploy starts before the old ones stop (drain.redeploy_surge_percent)."""
    return replicas + cfg.drain.surge_replicas(replicas)


def logical_cpus(cfg: ClusterConfig) -> int:
    """Enough for every engine replica at max scale during a redeploy (TP bundles + replica
    actor), the gateway and Serve's own actors, with headroom."""
    engines = sum(replica_room(cfg, p.max_replicas) * (p.engine.tensor_parallel_size + 1) for p in cfg.pools)
    return max(16, engines + 4)


def pool_slots(cfg: ClusterConfig) -> dict[str, float]:
    """This one node stands in for every pool's worker group: each pool's Ray resource,
    enough for the pool at max scale during a redeploy."""
    return {p.ray_resource: float(replica_room(cfg, p.max_replicas) * p.engine.tensor_parallel_size) for p in cfg.pools}


def _print(msg: str) -> None:
    print(msg, flush=True)


@dataclass
class LocalCluster:
    cfg: ClusterConfig
    http_port: int
    gcs_port: int
    metrics_export_port: int | None = None  # Ray's Prometheus endpoint (Ray, Serve and vLLM metrics)
    started_at: float = field(default_factory=time.monotonic)
    ready_after_s: float | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def stop(self) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def _log_dir() -> str:
    """Where Ray writes this session's logs (engines, gateway, controller)."""
    try:
        return upstream_ray.node_log_dir()
    except Exception:
        return "/tmp/ray/session_latest/logs"


def _replica_summary(status: Any, app_name: str) -> str:
    app = status.applications.get(app_name)
    if app is None:
        return "application not created yet"
    parts = []
    for name, dep in sorted(app.deployments.items()):
        states = ", ".join(f"{k.lower() if isinstance(k, str) else k}={v}" for k, v in dep.replica_states.items())
        parts.append(f"{name}[{states or '-'}]")
    return f"{app.status}: " + " ".join(parts)


def _http_ready(base_url: str) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(f"{base_url}/readyz", timeout=5) as r:
            return r.status == 200, r.read().decode()
    except urllib.error.HTTPError as e:
        return False, e.read().decode(errors="replace")
    except OSError as e:
        return False, str(e)


def deploy_app(cfg: ClusterConfig) -> None:
    """Deploy (or redeploy) the app from `cfg` and return at once, as `serve.run` does with
    the rendered config's application. A redeploy is a rolling update of every deployment:
    Serve starts the new replicas, moves new requests to them once they serve, and stops the
    old ones gracefully (deployments.serve_config.drain_options)."""
    from deployments.app import build_app
    from deployments.serve_config import render_serve_config

    args = render_serve_config(cfg)["applications"][0]["args"]
    upstream_ray.deploy_without_waiting(build_app(args), name=APP_NAME, route_prefix="/")


def start_local_cluster(
    cfg: ClusterConfig,
    *,
    http_port: int | None = None,
    progress: Progress = _print,
    timeout_s: float = 900.0,
    quiet: bool = True,
    address: str | None = None,
) -> LocalCluster:
    """Start Ray + Serve + the app and block until /readyz answers 200.

    With `address`, attach to a Ray cluster that already runs (e.g. the several local
    nodes of cluster.ops.local_nodes) instead of starting a one-node Ray here; its nodes
    carry their own resources, and stopping the LocalCluster leaves them running."""
    import ray
    from ray import serve

    if quiet:
        # The driver would print every deployment's options and each client HTTP call.
        for name in ("ray.serve", "ray.llm", "httpx", "httpx2", "openai"):
            logging.getLogger(name).setLevel(logging.WARNING)
    t0 = time.monotonic()
    http_port = http_port or free_port()
    # vLLM settings for the CPU backend also apply to anything started in this process.
    for k, v in engine_env(cfg).items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    for k, v in controller_env().items():  # Ray's processes, the Serve controller's too, inherit it
        os.environ.setdefault(k, v)
    log_to_driver = bool(os.environ.get("CLUSTER_LOG_TO_DRIVER"))
    metrics_export_port: int | None
    if address is None:
        gcs_port = free_port()
        os.environ["RAY_GCS_SERVER_PORT"] = str(gcs_port)  # read by Ray when it starts the GCS
        metrics_export_port = free_port()
        cpus = logical_cpus(cfg)
        progress(f"[cluster] starting Ray (GCS port {gcs_port}, {cpus} logical CPUs) ...")
        ray.init(
            num_cpus=cpus,
            resources=pool_slots(cfg) if cfg.node.pin_pools else None,
            include_dashboard=False,
            object_store_memory=512 * 1024**2,
            _metrics_export_port=metrics_export_port,
            log_to_driver=log_to_driver,
            configure_logging=False,
        )
        proxy_location: str | None = None  # Serve's default; one node, one proxy
    else:
        gcs_port = int(address.rsplit(":", 1)[1])
        metrics_export_port = None
        progress(f"[cluster] attaching to the Ray cluster at {address} ...")
        ray.init(address=address, log_to_driver=log_to_driver, configure_logging=False)
        # Every local node shares 127.0.0.1, and Serve's proxies share the HTTP port
        # (SO_REUSEPORT): a proxy per node would take a share of the clients' connections
        # and drop them with its node. On Kubernetes the chart's serve Service sends
        # clients only to the head and gateway pods; here the head's proxy alone does.
        proxy_location = "HeadOnly"
    cluster = LocalCluster(
        cfg=cfg, http_port=http_port, gcs_port=gcs_port, metrics_export_port=metrics_export_port, started_at=t0
    )
    try:
        serve.start(proxy_location=proxy_location, http_options={"host": "127.0.0.1", "port": http_port})
        progress(
            f"[cluster] building the app (profile {cfg.profile}; pools "
            + ", ".join(f"{p.name}={p.max_model_len}x{p.start_replicas}" for p in cfg.pools)
            + ")"
        )
        deploy_app(cfg)
        _wait_ready(cluster, progress, timeout_s)
    except BaseException:
        cluster.stop()
        raise
    cluster.ready_after_s = time.monotonic() - t0
    progress(f"[cluster] ready at {cluster.base_url} after {cluster.ready_after_s:.0f} s (logs: {_log_dir()})")
    return cluster


def _wait_ready(cluster: LocalCluster, progress: Progress, timeout_s: float) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    last = ""
    last_print = 0.0
    while time.monotonic() < deadline:
        status = serve.status()
        app = status.applications.get(APP_NAME)
        summary = _replica_summary(status, APP_NAME)
        now = time.monotonic()
        if summary != last or now - last_print > 30:
            progress(f"[cluster] {now - cluster.started_at:5.0f} s  {summary}")
            last, last_print = summary, now
        if app is not None and str(app.status).endswith("DEPLOY_FAILED"):
            raise RuntimeError(f"deploying the app failed: {app.message}")
        if app is not None and str(app.status).endswith("RUNNING"):
            ok, detail = _http_ready(cluster.base_url)
            if ok:
                return
        time.sleep(2.0)
    raise TimeoutError(f"the local cluster was not ready after {timeout_s:.0f} s: {last}")
