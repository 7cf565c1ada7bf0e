"""Render a ClusterConfig as the Ray Serve config that `serve deploy` (and KubeRay's
RayService serveConfigV2) takes. The whole typed config travels as the application's
args, so the deployments are built from the same object everywhere."""

from __future__ import annotations

from typing import Any

import yaml

from cluster.config import ClusterConfig

APP_IMPORT_PATH = "deployments.app:build_app"
APP_NAME = "mistral-large"


def engine_env(cfg: ClusterConfig) -> dict[str, str]:
    """Environment every Ray worker of the app needs."""
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
    return env


def render_serve_config(cfg: ClusterConfig) -> dict[str, Any]:
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "0.0.0.0", "port": cfg.http_port},
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": APP_IMPORT_PATH,
                "runtime_env": {"env_vars": engine_env(cfg)},
                "args": {"cluster_config": cfg.to_dict()},
            }
        ],
    }


def render_serve_config_yaml(cfg: ClusterConfig) -> str:
    return yaml.safe_dump(render_serve_config(cfg), sort_keys=False)
