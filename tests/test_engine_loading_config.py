"""Faster cold start options per pool (engine.stream_weights, engine.compile_cache), rendered
into vLLM's engine arguments (checked against vLLM's own EngineArgs and its runai_streamer
loader), the engines' environment and the Helm chart (real helm)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from cluster.config import ClusterConfig, CompileCacheConfig
from cluster.profiles import load_profile
from deployments.app import engine_kwargs, llm_config
from deployments.serve_config import engine_env
from tests import helm_tools
from tests.test_helm import one, ray_templates
from tests.test_helm_resilience import render_config


@pytest.fixture(scope="module")
def helm() -> Path:
    return helm_tools.helm()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("values")


def faster_start_config() -> ClusterConfig:
    """h100x8-bf16 with streamed weights on both pools and a compile cache: the standard
    pool's on a shared claim, the long pool's on a node path."""
    cfg = load_profile("h100x8-bf16")
    standard, long = cfg.pool("standard"), cfg.pool("long")
    standard.engine.stream_weights.enabled = True
    standard.engine.stream_weights.concurrency = 32
    standard.engine.stream_weights.distributed = True
    long.engine.stream_weights.enabled = True
    standard.engine.compile_cache = CompileCacheConfig(enabled=True, volume="pvc", claim_name="vllm-compile")
    long.engine.compile_cache = CompileCacheConfig(enabled=True, dir="/cache/vllm", host_path="/mnt/vllm")
    return ClusterConfig.model_validate(cfg.to_dict())


def test_streamed_weights_are_vllms_runai_streamer_load_format() -> None:
    from vllm.config.load import LoadConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader.runai_streamer_loader import RunaiModelStreamerLoader

    cfg = faster_start_config()
    standard = engine_kwargs(cfg, cfg.pool("standard"))
    assert standard["load_format"] == "runai_streamer"
    assert standard["model_loader_extra_config"] == {"concurrency": 32, "distributed": True}
    assert "model_loader_extra_config" not in engine_kwargs(cfg, cfg.pool("long"))
    # vLLM takes the arguments and its loader accepts the extra config.
    loading = {k: standard[k] for k in ("load_format", "model_loader_extra_config")}
    load_config = EngineArgs(model="/models/x", **loading).create_load_config()
    assert isinstance(load_config, LoadConfig)
    RunaiModelStreamerLoader(load_config)
    # Off by default: the checkpoint's own format.
    plain = load_profile("h100x8-bf16")
    assert engine_kwargs(plain, plain.pool("standard"))["load_format"] == "mistral"


def test_the_compile_cache_is_the_pools_engines_vllm_cache_root() -> None:
    cfg = faster_start_config()
    assert engine_env(cfg, cfg.pool("standard"))["VLLM_CACHE_ROOT"] == "/var/cache/vllm"
    assert engine_env(cfg, cfg.pool("long"))["VLLM_CACHE_ROOT"] == "/cache/vllm"
    assert "VLLM_CACHE_ROOT" not in engine_env(cfg)  # the gateway and the app's other actors
    env: dict[str, Any] = llm_config(cfg, cfg.pool("long"), "/models/x").runtime_env["env_vars"]
    assert env["VLLM_CACHE_ROOT"] == "/cache/vllm"
    plain = load_profile("h100x8-bf16")
    assert "VLLM_CACHE_ROOT" not in engine_env(plain, plain.pool("standard"))


@pytest.mark.parametrize(
    "fields",
    [{"enabled": True, "volume": "pvc"}, {"dir": "relative/path"}],
    ids=["pvc-without-claim", "relative-dir"],
)
def test_a_compile_cache_that_cannot_be_mounted_is_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        CompileCacheConfig(**fields)


def test_the_chart_mounts_each_pools_compile_cache_at_its_engines_root(helm: Path, files: Path) -> None:
    docs = render_config(helm, files, faster_start_config(), "compile-cache")
    templates = ray_templates(one(docs, "RayService"))
    expect = {
        "gpu-standard": ("/var/cache/vllm", {"persistentVolumeClaim": {"claimName": "vllm-compile"}}),
        "gpu-long": ("/cache/vllm", {"hostPath": {"path": "/mnt/vllm", "type": "DirectoryOrCreate"}}),
    }
    for group, (mount, source) in expect.items():
        spec = templates[group]["spec"]
        volume = next(v for v in spec["volumes"] if v["name"] == "engine-compile-cache")
        assert {k: v for k, v in volume.items() if k != "name"} == source, group
        assert {"name": "engine-compile-cache", "mountPath": mount} in spec["containers"][0]["volumeMounts"], group
    # Nothing for the head or gateway pods, nor without the option.
    assert all(v["name"] != "engine-compile-cache" for v in templates["head"]["spec"]["volumes"])
    plain = ray_templates(
        one(render_config(helm, files, load_profile("h100x8-bf16"), "no-compile-cache"), "RayService")
    )
    assert all(v["name"] != "engine-compile-cache" for t in plain.values() for v in t["spec"]["volumes"])


def test_a_node_compile_cache_without_a_path_fails_the_render(helm: Path, files: Path) -> None:
    cfg = load_profile("h100x8-bf16")
    cfg.pool("standard").engine.compile_cache = CompileCacheConfig(enabled=True)
    with pytest.raises(AssertionError) as err:  # helm exits non-zero with the chart's message
        render_config(helm, files, cfg, "compile-cache-no-path")
    assert "nodeCache.path" in str(err.value)
    # With the chart's node cache it is <nodeCache.path>/vllm.
    docs = render_config(helm, files, cfg, "compile-cache-node", {"nodeCache": {"path": "/var/cache/mls"}})
    spec = ray_templates(one(docs, "RayService"))["gpu-standard"]["spec"]
    volume = next(v for v in spec["volumes"] if v["name"] == "engine-compile-cache")
    assert volume["hostPath"] == {"path": "/var/cache/mls/vllm", "type": "DirectoryOrCreate"}


def test_engine_load_benchmark_variants_set_the_pool_options() -> None:
    from bench.calibration.engine_load import VARIANTS, variant_config

    cfg = load_profile("cpu-tiny")
    s3 = ("s3://mls-engine-load/tiny", "http://127.0.0.1:9000")
    seen = {}
    for variant in VARIANTS:
        vcfg = variant_config(cfg, "standard", variant, "/tmp/cache", s3)
        e = vcfg.pool("standard").engine
        seen[variant] = (e.stream_weights.enabled, e.compile_cache.enabled, e.enforce_eager, vcfg.model.source)
        assert e.compile_cache.dir == "/tmp/cache"
    assert seen == {
        "default": (False, False, True, "embedded:tiny"),
        "streamed": (True, False, True, "embedded:tiny"),
        "compiled-cold": (False, True, False, "embedded:tiny"),
        "compiled-warm": (False, True, False, "embedded:tiny"),
        "streamed-compiled-warm": (True, True, False, "embedded:tiny"),
        "streamed-s3": (True, False, True, s3[0]),
    }
    assert cfg.pool("standard").engine.enforce_eager  # the profile itself untouched


def test_the_s3_engine_load_variant_streams_every_pool_from_the_endpoint() -> None:
    from bench.calibration.engine_load import variant_config

    vcfg = variant_config(
        load_profile("cpu-tiny"), "standard", "streamed-s3", "/tmp/c", ("s3://b/tiny", "http://127.0.0.1:9000")
    )
    assert all(p.engine.stream_weights.enabled for p in vcfg.pools)  # a URI source needs every pool streaming
    env = engine_env(vcfg, vcfg.pool("standard"))
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000"
    assert env["RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING"] == "0"
    assert engine_kwargs(vcfg, vcfg.pool("standard"))["load_format"] == "runai_streamer"
    with pytest.raises(ValueError, match="streamed-s3 needs"):
        variant_config(load_profile("cpu-tiny"), "standard", "streamed-s3", "/tmp/c")


@pytest.mark.parametrize("path", ["safetensors", "streamer-disk"])
def test_weight_read_reads_every_byte_of_the_checkpoint(path: str, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from bench.calibration.weight_read import read_once

    tensors = {"a": torch.ones(64, 32, dtype=torch.bfloat16), "b": torch.zeros(1000, dtype=torch.float32)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    got = read_once(path, str(tmp_path / "model.safetensors"))
    assert got["bytes"] == 64 * 32 * 2 + 1000 * 4
    assert got["seconds"] > 0
