"""The per-pool autoscaling policy of the typed config, rendered into what Serve loads and
into the Helm chart (real Ray AutoscalingConfig, real helm)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from ray.serve.config import AutoscalingConfig

from autoscaling.cold_start import cold_start
from autoscaling.queue_kv_policy import QueueKVAutoscalingPolicy
from autoscaling.serve_rules import ongoing_requests_policy
from autoscaling.slo_policy import SLOAutoscalingPolicy
from cluster.config import ClusterConfig
from cluster.ops.helm_values import render_helm_values
from cluster.profiles import load_profile
from deployments.serve_autoscaling import make_policy, serve_autoscaling_config
from tests import helm_tools

CHART = helm_tools.REPO / "helm" / "mistral-large-serve"


def on_policy(policy: str, profile: str = "h100x8-bf16") -> ClusterConfig:
    cfg = load_profile(profile)
    for p in cfg.pools:
        p.autoscaling.policy = policy  # type: ignore[assignment]
    return ClusterConfig.model_validate(cfg.model_dump())


@pytest.mark.parametrize(
    ("policy", "cls"),
    [("queue-kv", QueueKVAutoscalingPolicy), ("slo", SLOAutoscalingPolicy)],
)
def test_serve_loads_the_configured_policy_class_with_its_parameters(policy: str, cls: type) -> None:
    cfg = on_policy(policy)
    pool = cfg.pool("standard")
    config = AutoscalingConfig(**serve_autoscaling_config(cfg, pool))
    loaded = config.policy.get_policy()  # what Serve's controller deserializes and instantiates
    assert loaded is cls
    instance = loaded(**config.policy.policy_kwargs)
    # The simulator builds the same object from the same config.
    sim_policy = make_policy(cfg, pool)
    assert type(sim_policy) is cls and vars(sim_policy) == vars(instance)
    assert config.look_back_period_s == pool.autoscaling.look_back_period_s
    assert config.metrics_interval_s == pool.autoscaling.metrics_interval_s


def test_ongoing_requests_is_serves_own_policy() -> None:
    cfg = on_policy("ongoing-requests")
    pool = cfg.pool("standard")
    config = AutoscalingConfig(**serve_autoscaling_config(cfg, pool))
    assert config.policy.is_default_policy_function()
    assert make_policy(cfg, pool) is ongoing_requests_policy


@pytest.mark.parametrize("profile", ["h100x8-bf16", "h100x4-fp8", "h200x4-fp8", "cpu-tiny"])
def test_the_default_policy_is_the_evaluated_best(profile: str) -> None:
    """autoscaling/README.md#evaluation: the SLO policy is the one that holds the SLO on
    both the diurnal and the burst day, with the fewest GPU-hours of those that do."""
    cfg = load_profile(profile)
    assert {p.autoscaling.policy for p in cfg.pools} == {"slo"}
    pool = cfg.pool("standard")
    assert type(make_policy(cfg, pool)) is SLOAutoscalingPolicy


def test_each_gpu_profiles_target_is_derived_from_its_measured_capacity() -> None:
    """autoscaling/README.md#evaluation: one rule, 1.75 x the requests in flight per replica
    at the SLO, gives the cheapest target that held 99% on both days on each profile swept."""
    from cluster.profiles import IN_FLIGHT_AT_SLO, standard_target_ongoing

    targets = {
        name: load_profile(name).pool("standard").autoscaling.target_ongoing_requests for name in IN_FLIGHT_AT_SLO
    }
    assert targets == {"h100x8-bf16": 7.0, "h100x4-fp8": 6.5, "h200x4-fp8": 5.0}
    assert targets == {name: standard_target_ongoing(v) for name, v in IN_FLIGHT_AT_SLO.items()}
    assert {load_profile(name).pool("long").autoscaling.target_ongoing_requests for name in IN_FLIGHT_AT_SLO} == {1.0}


def test_slo_policy_looks_ahead_by_the_pools_cold_start() -> None:
    cfg = on_policy("slo")
    pool = cfg.pool("long")
    kwargs = serve_autoscaling_config(cfg, pool)["policy"]["policy_kwargs"]
    start = cold_start(cfg, pool)
    # 123B bf16: 245.6 GB of weights at 0.6 GB/s, + 120 s engine start + 180 s node.
    assert start.weight_load_s == pytest.approx(cfg.memory_plan(pool).weight_bytes_total / 0.6e9)
    assert 400 < start.weight_load_s < 420
    assert kwargs["lead_s"] == pytest.approx(start.on_new_node_s)
    pool.autoscaling.slo.lead_s = 60.0
    assert serve_autoscaling_config(cfg, pool)["policy"]["policy_kwargs"]["lead_s"] == 60.0


def test_fp8_halves_the_weight_load() -> None:
    bf16, fp8 = load_profile("h100x8-bf16"), load_profile("h100x4-fp8")
    a = cold_start(bf16, bf16.pool("standard")).weight_load_s
    b = cold_start(fp8, fp8.pool("standard")).weight_load_s
    assert b == pytest.approx(a / 2, rel=0.02)


def test_unknown_policy_is_refused_by_the_config() -> None:
    data = load_profile("cpu-tiny").model_dump()
    data["pools"][0]["autoscaling"]["policy"] = "magic"
    with pytest.raises(ValueError, match="ongoing-requests"):
        ClusterConfig.model_validate(data)


def test_helm_values_and_worker_pods_name_the_policy(tmp_path: Path) -> None:
    cfg = on_policy("slo")
    cfg.pool("long").autoscaling.policy = "queue-kv"
    values = render_helm_values(cfg)
    groups = {g["pool"]: g for g in values["workerGroups"]}
    assert groups["standard"]["autoscaling"]["policy"] == "slo"
    assert groups["long"]["autoscaling"] == {
        "policy": "queue-kv",
        "minReplicas": 1,
        "maxReplicas": 8,
        "coldStartSeconds": round(cold_start(cfg, cfg.pool("long")).on_new_node_s),
    }
    # The serve config inside the values carries the same choice to Serve.
    serve = yaml.safe_load(values["serveConfigV2"])
    pools = serve["applications"][0]["args"]["cluster_config"]["pools"]
    assert {p["name"]: p["autoscaling"]["policy"] for p in pools} == {"standard": "slo", "long": "queue-kv"}
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    site = helm_tools.site_required_file(tmp_path)
    proc = subprocess.run(
        [str(helm_tools.helm()), "template", "mls", str(CHART), "-f", str(path), "-f", str(site)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    service = next(d for d in yaml.safe_load_all(proc.stdout) if d and d["kind"] == "RayService")
    labels = {
        g["groupName"]: g["template"]["metadata"]["labels"]["mistral-large-serve/autoscaling-policy"]
        for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
        if g["groupName"] != "cpu-gateway"  # the gateways' group is no pool: Serve's default policy
    }
    assert labels == {"gpu-standard": "slo", "gpu-long": "queue-kv"}
