"""Derive the Helm chart's values from the typed config.

The chart (helm/mistral-large-serve) takes the Ray Serve config as an opaque string
rendered by `render_serve_config`, so the RayService's serveConfigV2 and a local
`serve deploy` are the same document. Everything the chart sizes from the profile
(worker groups per pool, whole-node GPU requests, /dev/shm, weight volume size) is
computed here; site settings (image, secrets, ingress, storage class) stay in the
chart's defaults or the operator's own values file layered on top.

    python -m cluster.ops.helm_values --profile h100x8-bf16 > my-values.yaml
"""

from __future__ import annotations

import argparse
import math
import posixpath
import sys
from typing import Any

import yaml

from autoscaling.cold_start import cold_start
from cluster.config import ClusterConfig, GiB, PoolConfig, is_object_store_uri
from deployments.serve_config import (
    GATEWAY_RAY_RESOURCE,
    render_serve_config_yaml,
)

# Ray version the serve config is written for (the pin in pyproject's extras).
RAY_VERSION = "2.60.0"

# Kubelet, system daemons and DaemonSets (GPU operator, CNI, node exporter) keep part of
# every node: a pod asking for the whole capacity never schedules. 10% plus 2 CPUs / 16 GiB
# matches typical allocatable on 8-GPU nodes.
NODE_CPU_HEADROOM_FRACTION = 0.10
NODE_CPU_HEADROOM_MIN = 2
NODE_MEMORY_HEADROOM_FRACTION = 0.10
NODE_MEMORY_HEADROOM_MIN_GIB = 16

# Ray's object store lives in /dev/shm; NCCL needs shared memory on top of it for
# intra-node tensor parallelism.
GPU_OBJECT_STORE_GIB = 32
GPU_SHM_EXTRA_GIB = 32
HEAD_OBJECT_STORE_GIB = 4
CPU_OBJECT_STORE_MIB = 512

# A CPU engine replica: weights + fixed KV space + the engine and Ray worker processes.
CPU_REPLICA_OVERHEAD_GIB = 3

HEADER = (
    "# Generated from the typed config by `cluster render --profile {profile} --format helm-values`\n"
    "# (or `python -m cluster.ops.helm_values --profile {profile}`). Do not edit: change the profile\n"
    "# or config and regenerate; put site settings (image, secrets, storage) in your own values\n"
    "# file layered on top: helm install -f <this file> -f my-site.yaml\n"
)


def _quantity_gib(gib: float) -> str:
    return f"{int(math.ceil(gib))}Gi"


def pod_resources(cfg: ClusterConfig, pool: PoolConfig) -> dict[str, Any]:
    """Requests and limits of one worker pod of a pool.

    GPU: the pod takes a whole node (all its GPUs, allocatable CPU and memory) so a
    replica's tensor-parallel group always shares one NVLink domain. CPU: one engine
    replica per pod, memory from its weights and KV space.
    """
    node = cfg.node
    if node.accelerator == "gpu":
        cpu = node.cpus_per_node - max(
            NODE_CPU_HEADROOM_MIN, math.ceil(node.cpus_per_node * NODE_CPU_HEADROOM_FRACTION)
        )
        mem_gib = node.memory_gib - max(NODE_MEMORY_HEADROOM_MIN_GIB, node.memory_gib * NODE_MEMORY_HEADROOM_FRACTION)
        amount = {"cpu": str(cpu), "memory": _quantity_gib(mem_gib), "nvidia.com/gpu": str(node.gpus_per_node)}
        return {"requests": dict(amount), "limits": dict(amount)}
    plan = cfg.memory_plan(pool)
    mem_gib = (plan.weight_bytes_total + plan.kv_bytes_per_replica) / GiB + CPU_REPLICA_OVERHEAD_GIB
    return {
        "requests": {"cpu": "1", "memory": _quantity_gib(mem_gib)},
        "limits": {"cpu": str(node.cpus_per_node), "memory": _quantity_gib(mem_gib)},
    }


def replicas_per_pod(cfg: ClusterConfig, pool: PoolConfig) -> int:
    """Engine replicas one worker pod holds: TP=4 on an 8-GPU node gives two."""
    if cfg.node.accelerator == "gpu":
        return max(1, cfg.node.gpus_per_node // pool.engine.tensor_parallel_size)
    return 1


def bundle_slots_per_pod(cfg: ClusterConfig, pool: PoolConfig) -> int:
    if cfg.node.accelerator == "gpu":
        return cfg.node.gpus_per_node
    return replicas_per_pod(cfg, pool) * pool.engine.tensor_parallel_size


def compile_cache_values(pool: PoolConfig) -> dict[str, Any]:
    c = pool.engine.compile_cache
    if not c.enabled:
        return {"enabled": False}
    return {
        "enabled": True,
        "mountPath": c.dir,
        "volume": c.volume,
        "hostPath": c.host_path or "",
        "claimName": c.claim_name or "",
    }


def worker_group(cfg: ClusterConfig, pool: PoolConfig) -> dict[str, Any]:
    per_pod = replicas_per_pod(cfg, pool)
    gpu = cfg.node.accelerator == "gpu"
    plan = cfg.memory_plan(pool)
    if gpu:
        object_store_bytes = GPU_OBJECT_STORE_GIB * GiB
        shm = _quantity_gib(GPU_OBJECT_STORE_GIB + GPU_SHM_EXTRA_GIB)
    else:
        object_store_bytes = CPU_OBJECT_STORE_MIB * 1024**2
        shm = "1Gi"
    return {
        "pool": pool.name,
        "groupName": f"{'gpu' if gpu else 'cpu'}-{pool.name}",
        "maxModelLen": pool.max_model_len,
        "tensorParallelSize": pool.engine.tensor_parallel_size,
        "replicasPerPod": per_pod,
        # Serve scales replicas within [min, max]; the KubeRay autoscaler adds or removes
        # whole pods when placement groups cannot be scheduled or nodes sit idle.
        "minPods": math.ceil(pool.min_replicas / per_pod),
        "maxPods": math.ceil(pool.max_replicas / per_pod),
        "initialPods": math.ceil(pool.start_replicas / per_pod),
        # What Serve runs inside the pods (the serve config holds the full setting); shown
        # on the worker pods as labels so `kubectl get pods -L` tells which policy scales them.
        "autoscaling": {
            "policy": pool.autoscaling.policy,
            "minReplicas": pool.min_replicas,
            "maxReplicas": pool.max_replicas,
            "coldStartSeconds": round(cold_start(cfg, pool).on_new_node_s),
        },
        "resources": pod_resources(cfg, pool),
        "shmSize": shm,
        "objectStoreMemoryBytes": object_store_bytes,
        # One unit per bundle slot (per GPU on GPU nodes): the engines' bundles ask for
        # {GPU: 1, pool_<name>: 1} when node.pin_pools is on.
        "rayResources": {pool.ray_resource: bundle_slots_per_pod(cfg, pool)},
        # Faster starts (engine.stream_weights / engine.compile_cache): the chart mounts the
        # compile cache volume at the engines' VLLM_CACHE_ROOT.
        "streamWeights": pool.engine.stream_weights.enabled,
        "compileCache": compile_cache_values(pool),
        # Weight volume when fetched from an object store: the checkpoint plus 10%.
        "weightsSizeLimit": _quantity_gib(plan.weight_bytes_total / GiB * 1.1 + 1),
    }


# A gateway pod: one gateway replica (1 CPU) plus its node's Serve proxy and Ray's own
# processes; memory for the tokenizer and the per-pool prefix indexes.
GATEWAY_POD = {"cpu": "4", "memory": "8Gi"}
GATEWAY_GROUP_NAME = "cpu-gateway"


def gateway_group(cfg: ClusterConfig) -> dict[str, Any]:
    """The CPU worker group that hosts the gateway replicas on GPU clusters (one per pod,
    pods spread over nodes), so a lost GPU node never takes other pools' streams with it
    and gateways never keep a GPU node from scaling down. Disabled on the CPU backend."""
    if cfg.node.accelerator != "gpu":
        return {"enabled": False}
    return {
        "enabled": True,
        "groupName": GATEWAY_GROUP_NAME,
        "minPods": cfg.gateway.min_replicas,
        "maxPods": cfg.gateway.max_replicas,
        "initialPods": cfg.gateway.min_replicas,
        "resources": {"requests": dict(GATEWAY_POD), "limits": dict(GATEWAY_POD)},
        "rayResources": {GATEWAY_RAY_RESOURCE: 1},
    }


def drain_values(cfg: ClusterConfig) -> dict[str, int]:
    """Every drain budget of the chart, from the one drain.grace_period_s."""
    d = cfg.drain
    return {
        "gracePeriodSeconds": d.grace_period_s,
        "requestTimeoutSeconds": d.request_timeout_s,
        "replicaShutdownSeconds": d.replica_shutdown_s,
        "podTerminationSeconds": d.pod_termination_s,
        "clusterDeletionDelaySeconds": d.old_cluster_deletion_delay_s,
    }


def weight_files(cfg: ClusterConfig) -> list[str]:
    """Object-store patterns of the files the engine loads. A Mistral checkpoint folder
    often holds both the consolidated and the Hugging Face shards (2 x 229 GiB): fetching
    `*.safetensors` would pull both and overflow the weights volume."""
    m = cfg.model
    files = ["tekken.json", "tokenizer.model*"]
    if m.load_format == "mistral":
        files.append("consolidated*.safetensors")
    else:
        files += ["model*.safetensors", "model.safetensors.index.json"]
    if m.config_format == "mistral":
        files.append("params.json")
    else:
        files += ["config.json", "generation_config.json"]
    if m.tokenizer_mode != "mistral":
        files += ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    return files


def _weights(cfg: ClusterConfig) -> dict[str, Any]:
    source = cfg.model.source
    if source.startswith("embedded:"):
        # The app generates the tiny model itself; nothing to mount.
        return {"source": "none", "modelPath": "", "mountPath": ""}
    if is_object_store_uri(source):
        # The engines stream the weights from the bucket (config validation made every
        # pool use runai_streamer): no fetch, no weights volume. The gateway counts
        # tokens with the bundled v7 file (or model.tokenizer_file, a local path).
        return {
            "source": "stream",
            "modelPath": "",
            "mountPath": "",
            "stream": {"uri": source, "credentialsSecret": cfg.model.object_store.credentials_secret or ""},
        }
    if not posixpath.isabs(source) or posixpath.dirname(source.rstrip("/")) in ("", "/"):
        raise ValueError(
            f"model.source {source!r} must be an absolute path one level below a mount directory, "
            "e.g. /models/Mistral-Large-Instruct-2411"
        )
    model_path = source.rstrip("/")
    return {
        "source": "pvc",
        "modelPath": model_path,
        "mountPath": posixpath.dirname(model_path),
        "objectStore": {"include": weight_files(cfg)},
    }


def _head(cfg: ClusterConfig) -> dict[str, Any]:
    if cfg.node.accelerator == "gpu":
        amount = {"cpu": "8", "memory": "32Gi"}
        return {
            "resources": {"requests": dict(amount), "limits": dict(amount)},
            "shmSize": "8Gi",
            "objectStoreMemoryBytes": HEAD_OBJECT_STORE_GIB * GiB,
        }
    return {
        "resources": {"requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}},
        "shmSize": "1Gi",
        "objectStoreMemoryBytes": CPU_OBJECT_STORE_MIB * 1024**2,
    }


def render_helm_values(cfg: ClusterConfig) -> dict[str, Any]:
    """Values for helm/mistral-large-serve derived from `cfg` (one source of truth)."""
    gpu = cfg.node.accelerator == "gpu"
    values: dict[str, Any] = {
        "profile": cfg.profile,
        "rayVersion": RAY_VERSION,
        "serveConfigV2": render_serve_config_yaml(cfg),
        "httpPort": cfg.http_port,
        "servedModelName": cfg.model.served_name,
        "node": {
            "accelerator": cfg.node.accelerator,
            "gpuProduct": cfg.node.gpu_product if gpu else "",
            "gpusPerNode": cfg.node.gpus_per_node,
        },
        "head": _head(cfg),
        "workerGroups": [worker_group(cfg, pool) for pool in cfg.pools],
        "gateway": gateway_group(cfg),
        "drain": drain_values(cfg),
        "weights": _weights(cfg),
        # Auth and sessions settings (auth.enabled, the env var names, Sentinel, TLS CA)
        # are not repeated here: the chart reads them from serveConfigV2, the config the
        # gateway itself reads, so the two cannot disagree.
        "telemetry": {
            "otlpEndpoint": cfg.telemetry.otlp_endpoint or "",
            "serviceName": cfg.telemetry.service_name,
            # Where the chart scrapes the gateway's metrics: a port of their own in each
            # gateway replica, else the API port's path (one replica of several per scrape).
            "gatewayMetricsPort": cfg.telemetry.metrics.port or 0,
            "gatewayMetricsPath": cfg.telemetry.metrics.path or "",
        },
    }
    if not gpu:
        # The CPU demo targets a laptop cluster (kind, minikube) without the Prometheus
        # Operator; a small Redis volume is plenty for demo sessions.
        values["monitoring"] = {"enabled": False}
        values["redis"] = {"bundled": {"persistence": {"size": "1Gi"}}}
    return values


class _BlockStringDumper(yaml.SafeDumper):
    """Writes multi-line strings (the embedded serve config) as readable `|` blocks."""


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_BlockStringDumper.add_representer(str, _represent_str)


def render_helm_values_yaml(cfg: ClusterConfig) -> str:
    body = yaml.dump(render_helm_values(cfg), Dumper=_BlockStringDumper, sort_keys=False, width=120)
    return HEADER.format(profile=cfg.profile) + body


def main(argv: list[str] | None = None) -> int:
    from cluster.profiles import PROFILES, load_profile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--profile", choices=sorted(PROFILES), help="named profile")
    source.add_argument("--config", help="ClusterConfig YAML file")
    parser.add_argument("--out", help="write here instead of stdout")
    args = parser.parse_args(argv)
    try:
        cfg = load_profile(args.profile) if args.profile else ClusterConfig.from_file(args.config)
        text = render_helm_values_yaml(cfg)
    except (ValueError, KeyError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
