"""Render a ClusterConfig as the Ray Serve config that `serve deploy` (and KubeRay's
RayService serveConfigV2) takes. The whole typed config travels as the application's
args, so the deployments are built from the same object everywhere."""

from __future__ import annotations

from typing import Any

import yaml

from cluster.config import ClusterConfig, PoolConfig, is_object_store_uri

APP_IMPORT_PATH = "deployments.app:build_app"
APP_NAME = "mistral-large"

# Deployment names of deployments.app (deployments.gateway defines them; importing it here
# would pull Ray into the CLI; tests/test_serve_config.py checks they agree).
GATEWAY_DEPLOYMENT = "gateway"


def engine_deployment(pool: str) -> str:
    return f"engine-{pool}"


# On GPU clusters the gateway replicas run on a CPU worker group of their own: each of its
# pods advertises one unit of this Ray resource and each gateway replica asks for one, so
# gateways never land on (and never pin) GPU nodes, and two of them never share a pod.
GATEWAY_RAY_RESOURCE = "gateway"
# Elsewhere (the CPU backend) the gateway runs on the head node, which alone advertises
# this resource (Ray's documented way to pin an actor to the head). Without it Serve's
# spread scheduling may put the gateway on a pool's node, where it takes CPUs an engine
# placement group needs and dies with that node.
HEAD_NODE_RESOURCE = "node:__internal_head__"


def engine_env(cfg: ClusterConfig, pool: PoolConfig | None = None) -> dict[str, str]:
    """Environment every Ray worker of the app needs; with a pool, its engines' too."""
    env = {"VLLM_USE_V1": "1"}
    if cfg.node.accelerator == "cpu":
        kv_gib = max(p.engine.cpu_kv_cache_space_gib for p in cfg.pools)
        # nobind: on a shared 2-core box pinning OMP threads starves the other replicas.
        env.update({"VLLM_CPU_KVCACHE_SPACE": str(kv_gib), "VLLM_CPU_OMP_THREADS_BIND": "nobind"})
    else:
        # NVLink multicast (NVLS) off: it needs fabric manager support many pools lack.
        env.update({"NCCL_NVLS_ENABLE": "0"})
    # vLLM picks its OTLP exporter by this variable (grpc when unset).
    env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] = cfg.telemetry.otlp_protocol
    if pool is not None and pool.engine.compile_cache.enabled:
        # vLLM puts its compiled graphs and the inductor cache under this root.
        env["VLLM_CACHE_ROOT"] = pool.engine.compile_cache.dir
    if pool is not None and is_object_store_uri(cfg.model.source):
        # The streamer's endpoint and addressing; its credentials come from the pod (a Secret).
        env.update(cfg.model.object_store.engine_env(cfg.model.source))
    return env


def controller_env() -> dict[str, str]:
    """Environment of the Serve controller (the head's Ray): a replica that failed its
    health check (dead or wedged engine) is stopped at once, not drained for
    drain.replica_shutdown_s: it can finish nothing (the gateway retries or migrates its
    requests), and while it drained it would hold the GPUs its replacement needs."""
    return {"RAY_SERVE_FORCE_STOP_UNHEALTHY_REPLICAS": "1"}


def gateway_options(cfg: ClusterConfig) -> dict[str, Any]:
    """Serve options of the gateway deployment, from `cfg.gateway`; on GPU clusters pinned
    to the gateway worker group, one replica per pod (on the CPU backend the head hosts it)."""
    g = cfg.gateway
    actor: dict[str, Any] = {"num_cpus": g.num_cpus}
    options: dict[str, Any] = {"max_ongoing_requests": g.max_ongoing_requests, "ray_actor_options": actor}
    if g.min_replicas == g.max_replicas:
        options["num_replicas"] = g.min_replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": g.min_replicas,
            "max_replicas": g.max_replicas,
            "target_ongoing_requests": g.target_ongoing_requests,
        }
    if cfg.node.accelerator == "gpu":
        actor["resources"] = {GATEWAY_RAY_RESOURCE: 1}
        options["max_replicas_per_node"] = 1
    else:
        actor["resources"] = {HEAD_NODE_RESOURCE: 0.01}
    return options


def drain_options(cfg: ClusterConfig) -> dict[str, Any]:
    """Serve options of every deployment, from `cfg.drain`: a replica asked to stop (scale
    down, redeploy, a draining node) gets no new requests and finishes those it has for up
    to drain.replica_shutdown_s; a redeploy starts replacements before it stops old replicas.
    deployments.app sets them on the deployments it builds, and the rendered config repeats
    them, so `serve.run` and `serve deploy` / RayService drain the same way."""
    return {
        "graceful_shutdown_timeout_s": cfg.drain.replica_shutdown_s,
        "max_surge_percent": cfg.drain.redeploy_surge_percent,
    }


def deployment_overrides(cfg: ClusterConfig) -> list[dict[str, Any]]:
    """Per-deployment options set from the config: the drain options and gateway placement."""
    drain = drain_options(cfg)
    gateway = {"name": GATEWAY_DEPLOYMENT, **drain, **gateway_options(cfg)}
    return [gateway] + [{"name": engine_deployment(p.name), **drain} for p in cfg.pools]


def render_serve_config(cfg: ClusterConfig) -> dict[str, Any]:
    return {
        # A proxy on every node with a replica. KubeRay's readiness probe of RayService
        # workers checks the local proxy (kuberay#4994): with HeadOnly no worker is ever
        # Ready. Which pods take outside traffic is decided by the chart's serve Service
        # (only pods that declare the `serve` port: head and gateway group).
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": cfg.http_port},
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": APP_IMPORT_PATH,
                "runtime_env": {"env_vars": engine_env(cfg)},
                "args": {"cluster_config": cfg.to_dict()},
                "deployments": deployment_overrides(cfg),
            }
        ],
    }


def render_serve_config_yaml(cfg: ClusterConfig) -> str:
    return yaml.safe_dump(render_serve_config(cfg), sort_keys=False)
