"""Config validation (impossible configs refused with the arithmetic) and what the config
renders to: the Ray Serve YAML and the per-pool ray.serve.llm arguments."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from cluster.config import ClusterConfig
from cluster.profiles import PROFILES, load_profile
from deployments.serve_config import APP_IMPORT_PATH, render_serve_config, render_serve_config_yaml


def _gpu_config(**overrides: Any) -> dict[str, Any]:
    data = load_profile("h100x8-bf16").to_dict()
    data.update(overrides)
    return data


def _with_engine(data: dict[str, Any], **engine: Any) -> dict[str, Any]:
    for pool in data["pools"]:
        pool["engine"].update(engine)
    return data


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_profile_is_valid_and_round_trips(name: str) -> None:
    cfg = load_profile(name)
    again = ClusterConfig.model_validate(cfg.to_dict())
    assert again == cfg
    assert [p.max_model_len for p in cfg.pools] == sorted(p.max_model_len for p in cfg.pools)


def test_tp_larger_than_a_node_is_refused() -> None:
    data = _with_engine(_gpu_config(), tensor_parallel_size=16)
    with pytest.raises(ValidationError, match=r"tensor_parallel_size 16 is larger than one node \(8 GPUs per node\)"):
        ClusterConfig.model_validate(data)


def test_bf16_123b_on_tp2_80gb_is_refused_with_the_arithmetic() -> None:
    data = _with_engine(_gpu_config(), tensor_parallel_size=2)
    with pytest.raises(ValidationError) as info:
        ClusterConfig.model_validate(data)
    msg = str(info.value)
    # 2 x 80 GiB x 0.90 = 144 GiB usable; bf16 weights = 245,220,139,008 B = 228.4 GiB
    assert "does not fit" in msg
    assert "TP=2 x 72.0 GiB usable = 144.0 GiB" in msg
    assert "weights 228.4 GiB" in msg


def test_fp8_fits_where_bf16_does_not() -> None:
    data = _with_engine(_gpu_config(), tensor_parallel_size=4)
    with pytest.raises(ValidationError, match="does not fit"):
        ClusterConfig.model_validate(data)
    fp8 = _with_engine(_gpu_config(), tensor_parallel_size=4, quantization="fp8", kv_cache_dtype="fp8")
    cfg = ClusterConfig.model_validate(fp8)
    assert all(cfg.memory_plan(p).fits() for p in cfg.pools)


def test_heads_must_divide_over_tp() -> None:
    data = _with_engine(_gpu_config(), tensor_parallel_size=5)
    with pytest.raises(ValidationError, match="96 attention heads do not divide over tensor_parallel_size 5"):
        ClusterConfig.model_validate(data)


def test_pools_must_differ_in_context_and_name() -> None:
    data = _gpu_config()
    data["pools"][1]["max_model_len"] = data["pools"][0]["max_model_len"]
    with pytest.raises(ValidationError, match="pools must differ in max_model_len"):
        ClusterConfig.model_validate(data)
    data = _gpu_config()
    data["pools"][1]["name"] = data["pools"][0]["name"]
    with pytest.raises(ValidationError, match="pool names must be unique"):
        ClusterConfig.model_validate(data)


def test_context_beyond_the_model_is_refused() -> None:
    data = _gpu_config()
    data["pools"][1]["max_model_len"] = 262_144
    with pytest.raises(ValidationError, match="exceeds the model's 131,072 positions"):
        ClusterConfig.model_validate(data)


def test_replica_bounds_and_unknown_fields() -> None:
    data = _gpu_config()
    data["pools"][0]["min_replicas"] = 5
    data["pools"][0]["max_replicas"] = 2
    with pytest.raises(ValidationError, match="min_replicas 5 > max_replicas 2"):
        ClusterConfig.model_validate(data)
    data = _gpu_config()
    data["pools"][0]["engine"]["tensor_paralel_size"] = 8  # typo
    with pytest.raises(ValidationError, match="tensor_paralel_size"):
        ClusterConfig.model_validate(data)
    with pytest.raises(ValidationError, match="at least one pool"):
        ClusterConfig.model_validate(_gpu_config(pools=[]))


def test_cpu_backend_runs_tp_1() -> None:
    data = load_profile("cpu-tiny").to_dict()
    data["pools"][0]["engine"]["tensor_parallel_size"] = 2
    with pytest.raises(ValidationError, match="CPU backend runs tensor_parallel_size 1"):
        ClusterConfig.model_validate(data)


def test_cpu_block_size_must_be_a_multiple_of_32() -> None:
    data = load_profile("cpu-tiny").to_dict()
    data["pools"][0]["engine"]["block_size"] = 16
    with pytest.raises(ValidationError, match="block_size 16 is not a multiple of 32"):
        ClusterConfig.model_validate(data)


def test_config_file_round_trip(tmp_path: Path) -> None:
    cfg = load_profile("h200x4-fp8")
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert ClusterConfig.from_file(path) == cfg


def test_serve_yaml_carries_the_whole_config() -> None:
    cfg = load_profile("h100x8-bf16")
    doc = yaml.safe_load(render_serve_config_yaml(cfg))
    app = doc["applications"][0]
    assert app["import_path"] == APP_IMPORT_PATH
    assert ClusterConfig.model_validate(app["args"]["cluster_config"]) == cfg
    assert app["runtime_env"]["env_vars"]["NCCL_NVLS_ENABLE"] == "0"
    assert (
        render_serve_config(load_profile("cpu-tiny"))["applications"][0]["runtime_env"]["env_vars"][
            "VLLM_CPU_KVCACHE_SPACE"
        ]
        == "1"
    )


# ---- what each pool becomes in ray.serve.llm (no cluster needed) --------------------------


def test_gpu_pool_engine_arguments() -> None:
    from deployments.app import engine_kwargs, llm_config, placement_group_config, request_router_config

    cfg = load_profile("h100x8-bf16")
    pool = cfg.pool("long")
    kw = engine_kwargs(cfg, pool)
    assert kw["tensor_parallel_size"] == 8
    assert kw["max_model_len"] == 131_072
    assert (kw["tokenizer_mode"], kw["config_format"], kw["load_format"]) == ("mistral", "mistral", "mistral")
    assert kw["enable_auto_tool_choice"] is True and kw["tool_call_parser"] == "mistral"
    assert kw["enable_prefix_caching"] is True and kw["enable_chunked_prefill"] is True
    assert kw["disable_log_stats"] is False
    assert "model" not in kw and "served_model_name" not in kw  # ray.serve.llm sets those
    pg = placement_group_config(cfg, pool)
    assert pg == {"bundles": [{"GPU": 1, "pool_long": 1}] * 8, "strategy": "STRICT_PACK"}
    cfg.node.pin_pools = False
    assert placement_group_config(cfg, pool) == {"bundles": [{"GPU": 1}] * 8, "strategy": "STRICT_PACK"}
    rc = request_router_config(cfg, pool)
    assert rc["request_router_class"] == "deployments.request_router:PolicyRequestRouter"
    assert rc["request_router_kwargs"]["policy"] == cfg.router.policy
    assert rc["request_router_kwargs"]["block_size"] == pool.engine.block_size

    llm = llm_config(cfg, pool, "/models/x")
    assert llm.model_id == cfg.model.served_name
    assert llm.deployment_config["autoscaling_config"]["max_replicas"] == pool.max_replicas


def test_fp8_and_cpu_specifics() -> None:
    from deployments.app import engine_kwargs, placement_group_config, request_router_config

    fp8 = load_profile("h100x4-fp8")
    kw = engine_kwargs(fp8, fp8.pool("standard"))
    assert kw["quantization"] == "fp8" and kw["kv_cache_dtype"] == "fp8" and kw["tensor_parallel_size"] == 4
    cpu = load_profile("cpu-tiny")
    pool = cpu.pool("standard")
    kw = engine_kwargs(cpu, pool)
    assert "gpu_memory_utilization" not in kw and kw["enforce_eager"] is True
    assert kw["block_size"] % 32 == 0  # vLLM's CPU attention kernels need multiples of 32
    assert placement_group_config(cpu, pool) == {"bundles": [{"CPU": 1, "pool_standard": 1}], "strategy": "STRICT_PACK"}
    cpu.router.policy = "ray-default"
    assert "request_router_class" not in request_router_config(cpu, pool)


# ---- the CLI's config commands ---------------------------------------------------------------


def test_cli_plan_prints_the_arithmetic(capsys: pytest.CaptureFixture[str]) -> None:
    from cluster.ops.cli import main

    assert main(["plan", "--profile", "h100x8-bf16"]) == 0
    out = capsys.readouterr().out
    assert "360,448" in out  # KV bytes per token, bf16
    assert "940,192" in out  # KV tokens per replica (see test_memory.py)
    assert "28.5" in out  # weight GiB per GPU at TP=8


def test_cli_render_is_the_serve_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    from cluster.ops.cli import main

    assert main(["render", "--profile", "h200x4-fp8"]) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    assert ClusterConfig.model_validate(doc["applications"][0]["args"]["cluster_config"]) == load_profile("h200x4-fp8")


def test_cli_refuses_an_impossible_config_with_the_numbers(tmp_path: Path) -> None:
    from cluster.ops.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text(
        yaml.safe_dump({"pools": [{"name": "a", "max_model_len": 4096, "engine": {"tensor_parallel_size": 2}}]})
    )
    with pytest.raises(SystemExit) as info:
        main(["plan", "--config", str(path)])
    assert "144.0 GiB" in str(info.value.code) and "228.4 GiB" in str(info.value.code)


def test_loaded_profiles_are_independent_copies() -> None:
    first = load_profile("h100x8-bf16")
    first.node.pin_pools = False
    first.pools[0].engine.max_num_seqs = 1
    again = load_profile("h100x8-bf16")
    assert again.node.pin_pools is True
    assert again.pools[0].engine.max_num_seqs != 1


def test_rays_own_routers_are_router_policies() -> None:
    """router.policy picks Ray's PrefixCacheAffinityRouter or KVAwareRouter for the engine
    deployments, through the same rendered Serve config as ours."""
    from cluster.upstream import ray_serve as upstream_ray
    from deployments.app import experimental_configs, request_router_config

    data = load_profile("cpu-tiny").to_dict()
    data["router"]["policy"] = "ray-prefix-aware"
    data["router"]["options"] = {"imbalanced_threshold": 4}
    cfg = ClusterConfig.model_validate(data)
    rc = request_router_config(cfg, cfg.pools[0])
    assert rc["request_router_class"] == upstream_ray.PREFIX_AWARE_ROUTER_CLASS
    assert rc["request_router_kwargs"] == {"imbalanced_threshold": 4}
    app = render_serve_config(cfg)["applications"][0]
    assert app["args"]["cluster_config"]["router"]["policy"] == "ray-prefix-aware"

    data["router"]["policy"], data["router"]["options"] = "ray-kv-aware", {}
    cfg = ClusterConfig.model_validate(data)
    rc = request_router_config(cfg, cfg.pools[1])
    assert rc["request_router_class"] == "deployments.ray_kv_router:PoolKVAwareRouter"
    ports = [experimental_configs(cfg, p)["KV_EVENTS_PORT_BASE"] for p in cfg.pools]
    assert ports == [5557, 5657]  # per pool: replicas of two pools on one node never clash
    assert experimental_configs(cfg, cfg.pools[0])["mls_kv_lifecycle_to"] == "gateway"

    data["router"]["options"] = {"x": 1}
    with pytest.raises(ValueError, match="options do not apply"):
        ClusterConfig.model_validate(data)
    data["router"]["options"] = {}
    data["router"]["kv_events"] = {"enabled": True}
    with pytest.raises(ValueError, match="kv_events"):
        ClusterConfig.model_validate(data)
