"""The chart's alert rules, unit-tested with `promtool test rules` on synthetic series.

Each alert gets a case where it must fire and one where it must stay quiet, evaluated by
Prometheus' own rule engine (Debian's `prometheus` package ships promtool; `make
system-deps` installs it). The rules are rendered by the real helm from the H100 example,
as a cluster with the Prometheus Operator CRDs would render them.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import helm_tools

REPO = helm_tools.REPO
CHART = REPO / "helm" / "mistral-large-serve"
EXAMPLE = REPO / "helm" / "examples" / "h100x8-bf16.yaml"
RELEASE, NAMESPACE = "mls", "llm"
FULLNAME = f"{RELEASE}-mistral-large-serve"
MONITORING_APIS = ("PrometheusRule", "PodMonitor", "ServiceMonitor")


def _promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool missing: `make system-deps` installs Debian's prometheus package"
    return path


@pytest.fixture(scope="module")
def rules_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    helm = helm_tools.helm()
    tmp = tmp_path_factory.mktemp("alerts")
    site = helm_tools.site_required_file(tmp)
    args = [str(helm), "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "-f", str(EXAMPLE), "-f", str(site)]
    for kind in MONITORING_APIS:
        args += ["--api-versions", f"monitoring.coreos.com/v1/{kind}"]
    proc = subprocess.run(args, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    (rule,) = [d for d in yaml.safe_load_all(proc.stdout) if d and d["kind"] == "PrometheusRule"]
    groups = rule["spec"]["groups"]
    # Annotations are checked by tests/test_helm.py (runbook links); promtool compares
    # them verbatim, so the expressions and labels are what is tested here.
    for group in groups:
        for r in group["rules"]:
            r.pop("annotations", None)
    path = tmp / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}))
    return path


def _alert(name: str, at: str, labels: dict[str, str] | None) -> dict[str, Any]:
    """Expect alert `name` firing at `at` with exactly `labels` (None: not firing)."""
    exp = [] if labels is None else [{"exp_labels": labels}]
    return {"eval_time": at, "alertname": name, "exp_alerts": exp}


def _series(metric: str, values: str, labels: dict[str, str]) -> dict[str, str]:
    selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{metric}{{{selector}}}", "values": values}


def ray(metric: str, values: str, **labels: str) -> dict[str, str]:
    """A series of a Ray pod, with the labels the PodMonitor adds."""
    return _series(metric, values, {"namespace": NAMESPACE, "app_instance": RELEASE, **labels})


def kube(metric: str, values: str, **labels: str) -> dict[str, str]:
    """A series from kube-state-metrics or the KubeRay operator (no app_instance)."""
    return _series(metric, values, {"namespace": NAMESPACE, **labels})


def replicas(deployment: str, starts: str, healthy: dict[str, str]) -> list[dict[str, str]]:
    """Serve's start counter (`starts` for each replica) and health gauge (per replica)
    for the replicas of one deployment of application "a"."""
    labels = {"application": "a", "deployment": deployment}
    return [
        *(ray("ray_serve_deployment_replica_starts_total", starts, **labels, replica=r) for r in healthy),
        *(ray("ray_serve_deployment_replica_healthy", v, **labels, replica=r) for r, v in healthy.items()),
    ]


# name -> (input series, expectations). Interval 1m: "a+bxN" is N+1 samples from minute 0.
CASES: dict[str, tuple[list[dict[str, str]], list[dict[str, Any]]]] = {
    "ttft": (
        [
            # standard: every first token in 10-20 s; long: all under 1 s.
            ray("ray_vllm_time_to_first_token_seconds_bucket", "0+0x40", pool="standard", le="1"),
            ray("ray_vllm_time_to_first_token_seconds_bucket", "0+60x40", pool="standard", le="20"),
            ray("ray_vllm_time_to_first_token_seconds_bucket", "0+60x40", pool="standard", le="+Inf"),
            ray("ray_vllm_time_to_first_token_seconds_bucket", "0+60x40", pool="long", le="1"),
            ray("ray_vllm_time_to_first_token_seconds_bucket", "0+60x40", pool="long", le="20"),
            ray("ray_vllm_time_to_first_token_seconds_bucket", "0+60x40", pool="long", le="+Inf"),
        ],
        [
            _alert("MistralServeHighTTFT", "8m", None),  # not yet for 10 minutes
            _alert("MistralServeHighTTFT", "20m", {"pool": "standard", "severity": "warning"}),
        ],
    ),
    "queue": (
        [
            ray("ray_vllm_num_requests_waiting", "70+1x40", pool="standard", pod="w1"),
            ray("ray_vllm_num_requests_waiting", "100x40", pool="long", pod="w2"),  # high but flat
        ],
        [
            _alert("MistralServeQueueGrowing", "5m", None),
            _alert("MistralServeQueueGrowing", "30m", {"pool": "standard", "severity": "warning"}),
        ],
    ),
    "kv": (
        [
            ray("ray_vllm_kv_cache_usage_perc", "0.97x30", pool="long", pod="w2"),
            ray("ray_vllm_kv_cache_usage_perc", "0.80x30", pool="standard", pod="w1"),
        ],
        [
            _alert("MistralServeKVCacheNearFull", "10m", None),
            _alert("MistralServeKVCacheNearFull", "20m", {"pool": "long", "pod": "w2", "severity": "warning"}),
        ],
    ),
    "replica-restarts": (
        [
            # gateway: r1, r2 die at minute 30 and are replaced by r3, r4 and r5 (r5 never
            # gets healthy): three new replicas, healthy count unchanged -> three restarts.
            *replicas("gateway", "1x29", {"r1": "1x29", "r2": "1x29"}),
            *replicas("gateway", "_x30 1x30", {"r3": "_x30 1x30", "r4": "_x30 1x30", "r5": "_x30 0x30"}),
            # engine-standard scales up from 2 to 5 at minute 30: no restart.
            *replicas("engine-standard", "1x60", {"s1": "1x60", "s2": "1x60"}),
            *replicas("engine-standard", "_x30 1x30", dict.fromkeys(("s3", "s4", "s5"), "_x30 1x30")),
            # engine-long is deployed at minute 30 (no history): its first replicas are no restarts.
            *replicas("engine-long", "_x30 1x30", dict.fromkeys(("l1", "l2", "l3"), "_x30 1x30")),
        ],
        [
            _alert("MistralServeReplicaRestarts", "25m", None),
            _alert(
                "MistralServeReplicaRestarts",
                "40m",
                {"application": "a", "deployment": "gateway", "severity": "warning"},
            ),
        ],
    ),
    "container-died": (
        [
            # The head was OOM-killed at minute 5; KubeRay deleted the pod at minute 7.
            kube(
                "kube_pod_container_status_terminated_reason",
                "_x5 1x2",
                pod=f"{FULLNAME}-x7k2p-head-abcde",
                container="ray-head",
                reason="OOMKilled",
            ),
            # A worker that exited cleanly (scale-down) is no alert.
            kube(
                "kube_pod_container_status_terminated_reason",
                "_x5 1x2",
                pod=f"{FULLNAME}-x7k2p-gpu-long-worker-q1",
                container="ray-worker",
                reason="Completed",
            ),
        ],
        [
            _alert("MistralServeRayContainerDied", "3m", None),
            _alert(
                "MistralServeRayContainerDied",
                "12m",
                {
                    "pod": f"{FULLNAME}-x7k2p-head-abcde",
                    "container": "ray-head",
                    "reason": "OOMKilled",
                    "severity": "warning",
                },
            ),
        ],
    ),
    "errors": (
        [
            ray(
                "ray_serve_num_http_requests_total",
                "0+100x30",
                application="a",
                route="/",
                method="POST",
                status_code="200",
            ),
            ray(
                "ray_serve_num_http_requests_total",
                "_x10 0+20x20",
                application="a",
                route="/",
                method="POST",
                status_code="503",
            ),
            # Health-check failures do not count.
            ray(
                "ray_serve_num_http_requests_total",
                "0+500x30",
                application="a",
                route="/-/healthz",
                method="GET",
                status_code="500",
            ),
        ],
        [
            _alert("MistralServeHighErrorRate", "9m", None),
            _alert("MistralServeHighErrorRate", "25m", {"severity": "critical"}),
        ],
    ),
    "unavailable": (
        [
            # engine-long's only replica goes at minute 20 and its series vanish.
            ray(
                "ray_serve_deployment_replica_healthy", "1x20", application="a", deployment="engine-long", replica="l1"
            ),
            ray(
                "ray_serve_deployment_replica_healthy",
                "1x60",
                application="a",
                deployment="engine-standard",
                replica="s1",
            ),
            # gateway: one replica unhealthy, one healthy: still available.
            ray("ray_serve_deployment_replica_healthy", "0x60", application="a", deployment="gateway", replica="g1"),
            ray("ray_serve_deployment_replica_healthy", "1x60", application="a", deployment="gateway", replica="g2"),
        ],
        [
            _alert("MistralServeDeploymentUnavailable", "15m", None),
            _alert(
                "MistralServeDeploymentUnavailable",
                "35m",
                {"application": "a", "deployment": "engine-long", "severity": "critical"},
            ),
        ],
    ),
    "rayservice": (
        [
            kube("kuberay_service_condition_ready", "1x5 _x20", name=FULLNAME, uid="u", condition="true"),
            kube("kuberay_service_condition_ready", "_x5 1x20", name=FULLNAME, uid="u", condition="false"),
            # Another release's RayService is none of ours.
            kube("kuberay_service_condition_ready", "1x25", name="other", uid="v", condition="false"),
        ],
        [
            _alert("MistralServeRayServiceNotReady", "4m", None),
            _alert("MistralServeRayServiceNotReady", "15m", {"severity": "critical"}),
        ],
    ),
    "head": (
        [
            ray("up", "1x10 0x20", component="ray-head", pod="h1"),
            ray("up", "1x30", component="ray-worker", pod="w1"),
        ],
        [
            _alert("MistralServeHeadDown", "9m", None),
            _alert("MistralServeHeadDown", "20m", {"severity": "critical"}),
        ],
    ),
    "redis": (
        [ray("redis_up", "1x5 0x10", pod="redis-0")],
        [
            _alert("MistralServeRedisDown", "4m", None),
            _alert("MistralServeRedisDown", "12m", {"severity": "critical"}),
        ],
    ),
}


def test_alert_rules_are_valid(rules_file: Path) -> None:
    proc = subprocess.run([_promtool(), "check", "rules", str(rules_file)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_has_a_firing_case() -> None:
    rule_names = {
        "MistralServeHighTTFT",
        "MistralServeQueueGrowing",
        "MistralServeKVCacheNearFull",
        "MistralServeReplicaRestarts",
        "MistralServeRayContainerDied",
        "MistralServeHighErrorRate",
        "MistralServeDeploymentUnavailable",
        "MistralServeRayServiceNotReady",
        "MistralServeHeadDown",
        "MistralServeRedisDown",
    }
    firing = {a["alertname"] for _, checks in CASES.values() for a in checks if a["exp_alerts"]}
    quiet = {a["alertname"] for _, checks in CASES.values() for a in checks if not a["exp_alerts"]}
    assert firing == rule_names == quiet


def test_rendered_rules_are_exactly_the_tested_ones(rules_file: Path) -> None:
    groups = yaml.safe_load(rules_file.read_text())["groups"]
    names = {r["alert"] for g in groups for r in g["rules"]}
    tested = {a["alertname"] for _, checks in CASES.values() for a in checks}
    assert names == tested


@pytest.mark.parametrize("case", CASES)
def test_alert_fires_on_synthetic_series(case: str, rules_file: Path, tmp_path: Path) -> None:
    series, checks = CASES[case]
    spec = {
        "rule_files": [str(rules_file)],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "alert_rule_test": checks}],
    }
    test_file = tmp_path / f"{case}.test.yaml"
    test_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    proc = subprocess.run([_promtool(), "test", "rules", str(test_file)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout
