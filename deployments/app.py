"""The Ray Serve application, built from the one typed config.

`build_app(args)` is the import path `serve deploy` and KubeRay's RayService use
(deployments.serve_config renders `args = {"cluster_config": cfg.to_dict()}`); the local
runner (cluster.ops.local) calls it the same way.

Each pool is one ray.serve.llm `LLMConfig` -> `build_llm_deployment` (engine replicas =
`deployments.engine.PoolEngine`, a thin LLMServer subclass). Every pool serves under the
one public model id, so responses carry the public name; deployments are named
`engine-<pool>`. The gateway (`deployments.gateway`) is the ingress.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve.deployment import Application
from ray.serve.llm import LLMConfig, build_llm_deployment

from cluster.config import RAY_KV_AWARE_POLICY, RAY_PREFIX_AWARE_POLICY, ClusterConfig, PoolConfig
from cluster.telemetry import otlp_endpoint
from cluster.tiny_model import resolve_model_source
from cluster.upstream import ray_serve as upstream_ray
from deployments.engine import KV_EVENTS_KEY, KV_LIFECYCLE_TO_KEY, WEDGED_AFTER_KEY, PoolEngine
from deployments.gateway import GATEWAY_DEPLOYMENT_NAME, GatewayDeployment, engine_deployment_name
from deployments.serve_autoscaling import serve_autoscaling_config
from deployments.serve_config import GATEWAY_DEPLOYMENT, drain_options, engine_env, gateway_options

POLICY_ROUTER_CLASS = "deployments.request_router:PolicyRequestRouter"
RAY_KV_AWARE_ROUTER_CLASS = "deployments.ray_kv_router:PoolKVAwareRouter"
# The prompt-token side channel of Ray's KV-aware engines sits this far above the events ports.
_KV_TOKEN_PORT_OFFSET = 2000


def engine_kwargs(cfg: ClusterConfig, pool: PoolConfig) -> dict[str, Any]:
    """vLLM engine arguments of one pool (everything but model/served_model_name, which
    ray.serve.llm sets from model_loading_config)."""
    e = pool.engine
    m = cfg.model
    kwargs: dict[str, Any] = {
        "tokenizer_mode": m.tokenizer_mode,
        "config_format": m.config_format,
        "load_format": m.load_format,
        "enable_auto_tool_choice": True,
        "tool_call_parser": m.tool_call_parser,
        "tensor_parallel_size": e.tensor_parallel_size,
        "max_model_len": pool.max_model_len,
        "max_num_seqs": e.max_num_seqs,
        "max_num_batched_tokens": e.max_num_batched_tokens,
        "enable_prefix_caching": e.enable_prefix_caching,
        "enable_chunked_prefill": e.enable_chunked_prefill,
        "block_size": e.block_size,
        "enforce_eager": e.enforce_eager,
        "kv_cache_dtype": e.kv_cache_dtype,
        "dtype": e.dtype,
        # Scheduler stats feed the routing stats and vLLM's prefix-cache metrics.
        "disable_log_stats": False,
        # usage.prompt_tokens_details.cached_tokens: the gateway compares it with the
        # router's prediction (mls_gateway_cached_tokens_total).
        "enable_prompt_tokens_details": True,
    }
    traces = otlp_endpoint(cfg.telemetry)
    if traces and cfg.telemetry.engine_traces:
        # vLLM exports an llm_request span per request, a child of the gateway's engine
        # call span (the traceparent header); the protocol is in engine_env.
        kwargs["otlp_traces_endpoint"] = traces
    if e.stream_weights.enabled:
        # The checkpoint format (model.load_format) stays what it is; the streamer reads it.
        kwargs["load_format"] = "runai_streamer"
        extra = e.stream_weights.loader_extra_config()
        if extra:
            kwargs["model_loader_extra_config"] = extra
    if e.quantization is not None:
        kwargs["quantization"] = e.quantization
    kv_events = cfg.router.kv_events.engine_config(cfg.pools.index(pool))
    if kv_events is not None:
        kwargs["kv_events_config"] = kv_events
    if cfg.node.accelerator == "gpu":
        kwargs["gpu_memory_utilization"] = e.gpu_memory_utilization
    kwargs.update(e.extra)
    return kwargs


def placement_group_config(cfg: ClusterConfig, pool: PoolConfig) -> dict[str, Any]:
    """One bundle per TP rank, STRICT_PACK: a replica never spans nodes; with pinning,
    only on nodes of the pool's own worker group."""
    bundle: dict[str, float] = {"GPU": 1} if cfg.node.accelerator == "gpu" else {"CPU": 1}
    if cfg.node.pin_pools:
        bundle[pool.ray_resource] = 1
    return {"bundles": [dict(bundle) for _ in range(pool.engine.tensor_parallel_size)], "strategy": "STRICT_PACK"}


def request_router_config(cfg: ClusterConfig, pool: PoolConfig) -> dict[str, Any]:
    """Our policy router (kwargs reach its `initialize_state`), or one of Ray's:
    "ray-default" (power of two choices), "ray-prefix-aware" (PrefixCacheAffinityRouter,
    router.options as its kwargs), "ray-kv-aware" (KVAwareRouter, deployments.ray_kv_router)."""
    rc: dict[str, Any] = {
        "request_routing_stats_period_s": cfg.router.stats_period_s,
        "request_routing_stats_timeout_s": cfg.router.stats_timeout_s,
    }
    policy = cfg.router.policy
    if policy == RAY_PREFIX_AWARE_POLICY:
        rc["request_router_class"] = upstream_ray.PREFIX_AWARE_ROUTER_CLASS
        if cfg.router.options:
            rc["request_router_kwargs"] = dict(cfg.router.options)
    elif policy == RAY_KV_AWARE_POLICY:
        rc["request_router_class"] = RAY_KV_AWARE_ROUTER_CLASS
    elif not cfg.router.ray_router:
        rc["request_router_class"] = POLICY_ROUTER_CLASS
        ev = cfg.router.kv_events
        rc["request_router_kwargs"] = {
            "policy": policy,
            "block_size": cfg.router.index_block_size or pool.engine.block_size,
            "options": dict(cfg.router.options),
            "pool": pool.name,
            "exclude_failed_s": cfg.resilience.exclude_failed_s,
            "kv_events": {"enabled": ev.enabled, "topic": ev.topic},
        }
    return rc


def experimental_configs(cfg: ClusterConfig, pool: PoolConfig) -> dict[str, Any]:
    out: dict[str, Any] = {WEDGED_AFTER_KEY: cfg.resilience.wedged_after_s}
    if cfg.router.kv_events.enabled:
        out[KV_EVENTS_KEY] = True
    if cfg.router.policy == RAY_KV_AWARE_POLICY:
        out[KV_LIFECYCLE_TO_KEY] = GATEWAY_DEPLOYMENT
        base = cfg.router.kv_events.pool_port(cfg.pools.index(pool))
        # One indexer thread per pool on the CPU backend: the engines need the cores.
        threads = 1 if cfg.node.accelerator == "cpu" else 4
        out.update(upstream_ray.kv_aware_experimental_configs(base, base + _KV_TOKEN_PORT_OFFSET, threads))
    return out


def llm_config(cfg: ClusterConfig, pool: PoolConfig, model_source: str) -> LLMConfig:
    return LLMConfig(
        model_loading_config={"model_id": cfg.model.served_name, "model_source": model_source},
        engine_kwargs=engine_kwargs(cfg, pool),
        placement_group_config=placement_group_config(cfg, pool),
        deployment_config={
            "autoscaling_config": serve_autoscaling_config(cfg, pool),
            "request_router_config": request_router_config(cfg, pool),
            "max_ongoing_requests": pool.engine.serve_max_ongoing_requests,
            # A wedged engine fails its check (deployments.engine); Serve replaces a replica
            # after 3 failed checks in a row, so check often enough to act within seconds.
            "health_check_period_s": engine_health_check_period_s(cfg),
            **drain_options(cfg),
        },
        runtime_env={"env_vars": engine_env(cfg, pool)},
        server_cls=PoolEngine,
        experimental_configs=experimental_configs(cfg, pool),
        log_engine_metrics=True,
    )


def engine_health_check_period_s(cfg: ClusterConfig) -> float:
    return min(10.0, max(1.0, cfg.resilience.wedged_after_s / 5))


def build_app(args: dict[str, Any]) -> Application:
    cfg = ClusterConfig.model_validate(args["cluster_config"])
    model_source = resolve_model_source(cfg.model.source, cfg.model.architecture)
    pools = {
        pool.name: build_llm_deployment(
            llm_config(cfg, pool, model_source),
            override_serve_options={"name": engine_deployment_name(pool.name)},
        )
        for pool in cfg.pools
    }
    options = {**gateway_options(cfg), **drain_options(cfg)}
    options["ray_actor_options"]["runtime_env"] = {"env_vars": engine_env(cfg)}
    gateway = serve.deployment(name=GATEWAY_DEPLOYMENT_NAME, **options)(GatewayDeployment)
    return gateway.bind(cluster_config=cfg.to_dict(), pools=pools)
