"""`cluster doctor` on recorded API objects (tests/fixtures/doctor/).

healthy.json is a whole snapshot of a healthy h100x8-bf16 release (the JSON `cluster doctor
--save` writes). Each other file is an overlay of one failure: its objects replace those of
the same kind and name in healthy.json, or are added; `rayservice`, `serve` and
`serve_error` replace the healthy ones. The fixtures' shape is checked against the real
schemas: KubeRay v1.7.0's CRD status schemas, the Kubernetes OpenAPI (kubernetes-validate,
strict) and Ray Serve's ServeInstanceDetails.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from cluster.ops import cli
from cluster.ops.doctor import ClusterSnapshot, Finding, Thresholds, _pool_of_deployment, diagnose, report

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "doctor"
SCHEMAS = REPO / "tests" / "schemas"
LIST_KEYS = ("rayclusters", "pods", "events", "pdbs")

# scenario -> (the findings it must produce, exactly; the runbook of the first one)
SCENARIOS: dict[str, tuple[set[str], str]] = {
    "gpu-pods-pending": ({"gpu-pods-pending"}, "runbooks/pods-pending.md"),
    "workers-not-ready": ({"workers-not-ready"}, "runbooks/workers-not-ready.md"),
    "head-oomkilled": (
        {"head-oomkilled", "rayservice-not-ready", "serve-status-unavailable"},
        "runbooks/head-oomkilled.md",
    ),
    "image-pull": ({"image-pull-failing"}, "runbooks/image-pull.md"),
    "weights-fetch": ({"weights-fetch-failing"}, "runbooks/weights-fetch.md"),
    "weights-mount": ({"weights-fetch-failing"}, "runbooks/weights-fetch.md"),
    "redis-down": ({"redis-down"}, "runbooks/redis-down.md"),
    "autoscaler-stuck": ({"autoscaler-down", "autoscaler-stuck"}, "runbooks/autoscaler-stuck.md"),
    "pdb-blocks-drains": ({"pdb-blocks-drains"}, "runbooks/drain-blocked.md"),
}


def _key(obj: dict[str, Any]) -> tuple[str, str]:
    return obj.get("kind", ""), obj["metadata"]["name"]


def load_raw(scenario: str) -> dict[str, Any]:
    base = json.loads((FIXTURES / "healthy.json").read_text())
    if scenario == "healthy":
        return base
    overlay = json.loads((FIXTURES / f"{scenario}.json").read_text())
    for key, value in overlay.items():
        if key in LIST_KEYS:
            replaced = {_key(o): o for o in value}
            kept = [replaced.pop(_key(o), o) for o in base[key]]
            base[key] = kept + list(replaced.values())
        else:
            base[key] = value
    return base


def load(scenario: str) -> ClusterSnapshot:
    return ClusterSnapshot.from_json(load_raw(scenario))


def codes(findings: list[Finding]) -> set[str]:
    return {f.code for f in findings}


# ---------------------------------------------------------------- diagnosis


def test_a_healthy_release_has_no_finding() -> None:
    snap = load("healthy")
    assert diagnose(snap) == []
    assert report(snap, []).endswith("no known failure found")


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_each_failure_is_named_with_its_runbook(scenario: str) -> None:
    expected, runbook = SCENARIOS[scenario]
    findings = diagnose(load(scenario))
    assert codes(findings) == expected
    assert runbook in {f.runbook for f in findings}
    for f in findings:
        assert (REPO / f.runbook).is_file(), f"{f.code} points at a missing runbook {f.runbook}"
    assert findings[0].severity == "critical" or all(f.severity == "warning" for f in findings)


def test_pending_gpu_pods_name_the_pod_the_scheduler_and_the_node_autoscaler() -> None:
    (finding,) = diagnose(load("gpu-pods-pending"))
    assert finding.severity == "critical"  # 17 minutes unschedulable
    assert finding.objects == ("pod/mls-mistral-large-serve-x7k2p-gpu-standard-worker-zt6pq",)
    text = "\n".join(finding.evidence)
    assert "Insufficient nvidia.com/gpu" in text
    assert "max node group size reached" in text  # cluster-autoscaler's NotTriggerScaleUp


def test_a_pod_pending_for_less_than_the_threshold_is_a_warning() -> None:
    snap = load("gpu-pods-pending")
    (finding,) = diagnose(snap, Thresholds(pending=timedelta(minutes=30)))
    assert finding.severity == "warning"


def test_not_ready_workers_cite_the_readiness_probe_only_after_the_threshold() -> None:
    snap = load("workers-not-ready")
    (finding,) = diagnose(snap)
    assert len(finding.objects) == 3
    assert any("Readiness probe failed" in e for e in finding.evidence)
    assert diagnose(snap, Thresholds(not_ready=timedelta(hours=3))) == []


def test_head_oom_states_the_memory_limit() -> None:
    findings = {f.code: f for f in diagnose(load("head-oomkilled"))}
    oom = findings["head-oomkilled"]
    assert "64Gi" in oom.summary
    assert oom.objects == ("pod/mls-mistral-large-serve-x7k2p-head-q9w2r",)
    assert "503" in findings["serve-status-unavailable"].evidence[0]


def test_image_pull_and_weights_fetch_cite_the_container_state() -> None:
    (pull,) = diagnose(load("image-pull"))
    assert "mistral-large-serve:0.1.1" in pull.evidence[0] and "ImagePullBackOff" in pull.evidence[0]
    (fetch,) = diagnose(load("weights-fetch"))
    assert "fetch-weights" in fetch.evidence[0] and "exit 1" in fetch.evidence[0] and "restarts 5" in fetch.evidence[0]


def test_a_weights_volume_that_cannot_mount_is_named() -> None:
    (finding,) = diagnose(load("weights-mount"))
    text = "\n".join(finding.evidence)
    assert "claim mistral-large-weights" in text and "Multi-Attach error" in text
    # A claim that does not exist keeps the pod unschedulable: named as weights, not GPU capacity.
    raw = load_raw("weights-mount")
    pod = next(p for p in raw["pods"] if p["metadata"]["name"].endswith("w8j4t"))
    pod["status"]["conditions"] = [
        {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "lastProbeTime": None,
            "lastTransitionTime": "2026-12-01T10:05:30Z",
            "message": '0/14 nodes are available: persistentvolumeclaim "mistral-large-weights" not found. '
            "preemption: 0/14 nodes are available: 14 Preemption is not helpful for scheduling.",
        }
    ]
    raw["events"] = load_raw("healthy")["events"]
    (finding,) = diagnose(ClusterSnapshot.from_json(raw))
    assert finding.code == "weights-fetch-failing"
    assert 'persistentvolumeclaim "mistral-large-weights" not found' in finding.evidence[0]


def test_a_fetch_that_failed_once_and_then_completed_is_not_reported() -> None:
    raw = load_raw("weights-fetch")
    pod = next(p for p in raw["pods"] if p["metadata"]["name"].endswith("r5nq2"))
    for c in pod["status"]["conditions"]:
        if c["type"] == "Initialized":
            c.update(status="True", reason=None, message=None)
    (fetch,) = pod["status"]["initContainerStatuses"]
    fetch["state"] = {"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": "2026-12-01T10:26:00Z"}}
    assert "weights-fetch-failing" not in codes(diagnose(ClusterSnapshot.from_json(raw)))


def test_redis_down_says_why_the_pod_is_not_running() -> None:
    (finding,) = diagnose(load("redis-down"))
    assert finding.severity == "critical"
    assert "volume node affinity conflict" in finding.evidence[0]


def test_autoscaler_stuck_without_a_crashing_sidecar() -> None:
    """Serve waits for resources, no worker pod is pending and the group has room."""
    raw = load_raw("autoscaler-stuck")
    raw["pods"] = load_raw("healthy")["pods"]  # the sidecar runs
    findings = diagnose(ClusterSnapshot.from_json(raw))
    assert codes(findings) == {"autoscaler-stuck"}
    assert findings[0].summary.endswith("although gpu-standard has 2/16 pods")
    # The same wait with every group at maxReplicas is a capacity ceiling, not a stuck autoscaler.
    for group in raw["rayservice"]["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        group["maxReplicas"] = sum(
            p["metadata"]["labels"].get("ray.io/group") == group["groupName"] for p in raw["pods"]
        )
    findings = diagnose(ClusterSnapshot.from_json(raw))
    assert codes(findings) == {"pools-at-max-pods"}
    assert findings[0].runbook == "runbooks/queue-growing.md"


def test_a_waiting_pool_is_matched_to_its_own_worker_group() -> None:
    from deployments.gateway import engine_deployment_name  # the names the app really deploys

    assert _pool_of_deployment(f"mistral-large/{engine_deployment_name('long')}") == "long"
    assert _pool_of_deployment("mistral-large/gateway") is None
    raw = load_raw("autoscaler-stuck")
    raw["pods"] = load_raw("healthy")["pods"]
    (finding,) = diagnose(ClusterSnapshot.from_json(raw))
    assert "gpu-standard" in finding.summary and "gpu-long" not in finding.summary  # engine-standard waits


def test_a_worker_still_joining_is_not_a_stuck_autoscaler() -> None:
    raw = load_raw("autoscaler-stuck")
    raw["pods"] = load_raw("workers-not-ready")["pods"]  # Running, NotReady since 08:02 (> 10 min)
    assert "autoscaler-stuck" in codes(diagnose(ClusterSnapshot.from_json(raw)))
    assert "autoscaler-stuck" not in codes(
        diagnose(ClusterSnapshot.from_json(raw), Thresholds(not_ready=timedelta(hours=3)))
    )


def test_pending_pods_are_not_reported_as_a_stuck_autoscaler() -> None:
    # gpu-pods-pending carries the same Serve "taken more than 30s to be scheduled" message.
    assert "autoscaler-stuck" not in codes(diagnose(load("gpu-pods-pending")))


def test_a_missing_rayservice_is_named() -> None:
    raw = load_raw("healthy")
    raw.update(rayservice=None, rayclusters=[], serve=None, serve_error="no active RayCluster with a head Service")
    assert codes(diagnose(ClusterSnapshot.from_json(raw))) == {"rayservice-missing"}


def test_unhealthy_serve_deployments_are_named() -> None:
    raw = load_raw("healthy")
    dep = raw["serve"]["applications"]["mistral-large"]["deployments"]["engine-long"]
    dep.update(
        status="UNHEALTHY", message="The deployment failed to start 3 times in a row. Error: CUDA out of memory."
    )
    raw["serve"]["applications"]["mistral-large"]["status"] = "UNHEALTHY"
    (finding,) = diagnose(ClusterSnapshot.from_json(raw))
    assert finding.code == "serve-deployment-unhealthy"
    assert finding.objects == ("deployment/mistral-large/engine-long",)
    assert any("CUDA out of memory" in e for e in finding.evidence)


def test_an_application_that_never_deployed_points_at_the_rayservice_runbook() -> None:
    raw = load_raw("healthy")
    app = raw["serve"]["applications"]["mistral-large"]
    app.update(status="DEPLOY_FAILED", message="ModuleNotFoundError: No module named 'deployments'")
    (finding,) = diagnose(ClusterSnapshot.from_json(raw))
    assert finding.code == "serve-deployment-unhealthy"
    assert finding.runbook == "runbooks/rayservice-not-ready.md"


def test_a_not_ready_gateway_pod_is_a_worker_not_ready() -> None:
    raw = load_raw("healthy")
    (pod, _) = [p for p in raw["pods"] if p["metadata"]["labels"]["app.kubernetes.io/component"] == "ray-gateway"]
    ready = next(c for c in pod["status"]["conditions"] if c["type"] == "Ready")
    ready.update(status="False", reason="ContainersNotReady", lastTransitionTime="2026-12-01T10:00:00Z")
    (finding,) = diagnose(ClusterSnapshot.from_json(raw))
    assert finding.code == "workers-not-ready"
    assert finding.objects == (f"pod/{pod['metadata']['name']}",)


def _finding_rows() -> dict[str, set[str]]:
    """runbooks/README.md's finding table: code -> the runbooks its row links."""
    rows: dict[str, set[str]] = {}
    for line in (REPO / "runbooks" / "README.md").read_text().splitlines():
        cells = line.split("|")
        if len(cells) == 4 and "`" in cells[1]:
            links = set(re.findall(r"\]\(([\w-]+\.md)\)", cells[2])) or {"README.md"}
            for code in re.findall(r"`([a-z-]+)`", cells[1]):
                rows[code] = links
    return rows


def test_the_runbook_index_names_each_finding_with_its_runbook() -> None:
    findings = [f for scenario in SCENARIOS for f in diagnose(load(scenario))]
    raw = load_raw("healthy")
    raw["serve"]["applications"]["mistral-large"]["deployments"]["engine-long"]["status"] = "UNHEALTHY"
    findings += diagnose(ClusterSnapshot.from_json(raw))
    rows = _finding_rows()
    assert {"rayservice-not-ready", "serve-status-unavailable", "serve-deployment-unhealthy"} <= {
        f.code for f in findings
    }
    for f in findings:
        assert f.code in rows, f"runbooks/README.md has no row for {f.code}"
        assert f.runbook.removeprefix("runbooks/") in rows[f.code], (f.code, f.runbook, rows[f.code])


def test_fixtures_name_what_the_chart_renders(tmp_path: Path) -> None:
    """healthy.json is an h100x8-bf16 release: its groups, labels, containers and budgets are
    the chart's, and every overlay's pods and budgets are of those groups."""
    from tests import helm_tools

    site = helm_tools.site_required_file(tmp_path)
    example = REPO / "helm" / "examples" / "h100x8-bf16.yaml"
    chart = REPO / "helm" / "mistral-large-serve"
    proc = subprocess.run(
        [str(helm_tools.helm()), "template", "mls", str(chart), "-n", "llm", "-f", str(example), "-f", str(site)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    (rendered_rs,) = [d for d in docs if d["kind"] == "RayService"]
    rendered_cluster = rendered_rs["spec"]["rayClusterConfig"]
    templates = {"headgroup": rendered_cluster["headGroupSpec"]["template"]}
    templates |= {g["groupName"]: g["template"] for g in rendered_cluster["workerGroupSpecs"]}
    budgets = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "PodDisruptionBudget"}
    (redis_sts,) = [d for d in docs if d["kind"] == "StatefulSet"]

    healthy = load_raw("healthy")
    assert healthy["rayservice"]["metadata"]["name"] == rendered_rs["metadata"]["name"]
    for cluster in (healthy["rayservice"]["spec"]["rayClusterConfig"], healthy["rayclusters"][0]["spec"]):
        groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
        assert set(groups) == set(templates) - {"headgroup"}
        for g in rendered_cluster["workerGroupSpecs"]:
            mine = groups[g["groupName"]]
            assert (mine["minReplicas"], mine["maxReplicas"]) == (g["minReplicas"], g["maxReplicas"])
            assert mine["template"]["metadata"]["labels"] == g["template"]["metadata"]["labels"]
    assert {p["metadata"]["name"]: p["spec"] for p in healthy["pdbs"]} == budgets

    for path in sorted(FIXTURES.glob("*.json")):
        raw = load_raw(path.stem)
        for pod in raw["pods"]:
            labels = pod["metadata"]["labels"]
            containers = {c["name"] for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]}
            if labels["app.kubernetes.io/component"] == "redis":
                assert containers == {c["name"] for c in redis_sts["spec"]["template"]["spec"]["containers"]}
                continue
            template = templates[labels["ray.io/group"]]
            assert template["metadata"]["labels"].items() <= labels.items(), (path.name, pod["metadata"]["name"])
            spec = template["spec"]
            allowed = {c["name"] for c in spec.get("initContainers", []) + spec["containers"]}
            if labels["ray.io/group"] == "headgroup":
                allowed.add("autoscaler")  # KubeRay's sidecar (enableInTreeAutoscaling)
            # weights.source objectStore adds the fetch-weights init container.
            assert containers <= allowed | {"fetch-weights"}, (path.name, pod["metadata"]["name"], containers)
        for pdb in raw["pdbs"]:
            name = pdb["metadata"]["name"]
            assert name in budgets, f"{path.name}: {name} is not a budget the chart renders"
            assert pdb["spec"]["selector"] == budgets[name]["selector"], (path.name, name)


# ---------------------------------------------------------------- CLI


def test_cli_diagnoses_a_saved_snapshot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "snap.json"
    path.write_text(json.dumps(load_raw("redis-down")))
    saved = tmp_path / "again.json"
    assert cli.main(["doctor", "--from-file", str(path), "--save", str(saved)]) == 2
    out = capsys.readouterr().out
    assert "[CRITICAL] redis-down" in out and "runbook:  runbooks/redis-down.md" in out
    assert ClusterSnapshot.load(saved) == ClusterSnapshot.from_json(load_raw("redis-down"))
    path.write_text(json.dumps(load_raw("healthy")))
    assert cli.main(["doctor", "--from-file", str(path)]) == 0
    path.write_text(json.dumps(load_raw("pdb-blocks-drains")))
    assert cli.main(["doctor", "--from-file", str(path)]) == 1  # warnings only


# ---------------------------------------------------------------- fixture shapes


def _all_objects() -> list[dict[str, Any]]:
    objs: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(FIXTURES.glob("*.json")):
        raw = load_raw(path.stem)
        for key in LIST_KEYS:
            for o in raw[key]:
                objs[(path.stem, *_key(o))] = o  # type: ignore[index]
        if raw["rayservice"]:
            objs[(path.stem, "RayService", raw["rayservice"]["metadata"]["name"])] = raw["rayservice"]  # type: ignore[index]
    return list(objs.values())


@pytest.mark.parametrize("kind", ["RayService", "RayCluster"])
def test_kuberay_status_matches_the_v1_7_crd(kind: str) -> None:
    schema = json.loads((SCHEMAS / f"{kind.lower()}-status.ray.io-v1.json").read_text())
    objs = [o for o in _all_objects() if o["kind"] == kind]
    assert objs
    for o in objs:
        jsonschema.validate(o["status"], schema)
    wrong = copy.deepcopy(objs[0]["status"])
    wrong["readyWorkers"] = 3  # not a KubeRay field
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(wrong, schema)


def test_core_objects_match_the_kubernetes_api(tmp_path: Path) -> None:
    docs = [o for o in _all_objects() if o["kind"] in ("Pod", "Event", "PodDisruptionBudget")]
    manifest = tmp_path / "objects.yaml"
    manifest.write_text(yaml.safe_dump_all(docs))
    exe = Path(sys.executable).with_name("kubernetes-validate")
    proc = subprocess.run(
        [str(exe), "--strict", "--kubernetes-version", "1.33.0", str(manifest)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    passed = [line for line in proc.stdout.splitlines() if " passed " in line]
    assert len(passed) == len(docs), proc.stdout


def test_serve_status_matches_ray_serve_schema() -> None:
    from ray.serve.schema import ServeInstanceDetails

    for path in sorted(FIXTURES.glob("*.json")):
        serve = load_raw(path.stem)["serve"]
        if serve is not None:
            details = ServeInstanceDetails.model_validate(serve)
            assert details.applications["mistral-large"].deployments
