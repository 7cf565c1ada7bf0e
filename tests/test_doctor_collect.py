"""The doctor's collector, with the real kubernetes client, against a stand-in API server.

The stand-in answers the API paths a real API server answers (custom objects, lists with
label selectors, the service proxy to the head's dashboard) with the recorded objects of
tests/fixtures/doctor/, so the test checks the requests the collector makes and that the
client's models keep every field the diagnosis reads.
"""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import yaml

from cluster.ops import cli
from cluster.ops.doctor import diagnose, rayservice_name
from cluster.ops.doctor_collect import ClusterUnreachable, collect
from tests import helm_tools
from tests.test_doctor import load_raw
from tests.test_helm import CHART, EXAMPLES_DIR

NS, RELEASE = "llm", "mls"
HEAD_SERVICE = "mls-mistral-large-serve-x7k2p-head-svc"


class FakeApiServer(ThreadingHTTPServer):
    snapshot: dict[str, Any]
    requests: list[str]


class Handler(BaseHTTPRequestHandler):
    server: FakeApiServer

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        self.server.requests.append(self.path)
        snap = self.server.snapshot
        if snap.get("forbidden"):  # RBAC: the caller may not list pods
            return self._send(403, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 403})
        selector = parse_qs(url.query).get("labelSelector", [""])[0]
        base = f"/api/v1/namespaces/{NS}"
        rs = snap["rayservice"]
        routes: dict[str, Any] = {
            f"/apis/ray.io/v1/namespaces/{NS}/rayservices/{rs['metadata']['name']}": rs,
            f"{base}/pods": self._list("PodList", snap["pods"], selector),
            f"/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets": self._list(
                "PodDisruptionBudgetList", snap["pdbs"], selector
            ),
            # Another release's event in the namespace: the collector must drop it.
            f"{base}/events": self._list("EventList", snap["events"] + [_foreign_event()], ""),
        }
        for rc in snap["rayclusters"]:
            routes[f"/apis/ray.io/v1/namespaces/{NS}/rayclusters/{rc['metadata']['name']}"] = rc
        # The head Service that exists (KubeRay's <raycluster>-head-svc), whatever the status says.
        routes[f"{base}/services/{HEAD_SERVICE}:dashboard/proxy/api/serve/applications/"] = snap["serve"]
        path = unquote(url.path)  # the client escapes the ':' of "<service>:<port>"
        if path not in routes:
            return self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404})
        self._send(200, routes[path])

    @staticmethod
    def _list(kind: str, items: list[dict[str, Any]], selector: str) -> dict[str, Any]:
        wanted = dict(term.split("=", 1) for term in selector.split(",") if term)
        chosen = [i for i in items if wanted.items() <= (i["metadata"].get("labels") or {}).items()]
        # A real list response carries no apiVersion/kind on its items.
        bare = [{k: v for k, v in i.items() if k not in ("apiVersion", "kind")} for i in chosen]
        return {"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": bare}

    def _send(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _foreign_event() -> dict[str, Any]:
    return {
        "metadata": {"name": "other.1", "namespace": NS},
        "involvedObject": {"kind": "Pod", "name": "other-release-redis-0", "namespace": NS},
        "reason": "BackOff",
        "message": "Back-off restarting failed container",
        "type": "Warning",
    }


@pytest.fixture
def api_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeApiServer]:
    server = FakeApiServer(("127.0.0.1", 0), Handler)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": {"server": f"http://127.0.0.1:{server.server_address[1]}"}}],
        "users": [{"name": "test", "user": {"token": "not-a-real-token"}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test", "namespace": NS}}],
        "current-context": "test",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(kubeconfig))
    monkeypatch.setenv("KUBECONFIG", str(path))
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("scenario", ["healthy", "head-oomkilled", "weights-fetch", "pdb-blocks-drains"])
def test_collected_snapshot_diagnoses_like_the_recorded_one(api_server: FakeApiServer, scenario: str) -> None:
    raw = load_raw(scenario)
    if raw["serve"] is None:
        raw["serve"] = load_raw("healthy")["serve"]  # the stand-in proxy answers; drop serve-status-unavailable
    api_server.snapshot = raw
    snap = collect(NS, RELEASE)
    assert snap.rayservice is not None and snap.rayservice["metadata"]["name"] == "mls-mistral-large-serve"
    assert [c["metadata"]["name"] for c in snap.rayclusters] == [c["metadata"]["name"] for c in raw["rayclusters"]]
    assert {p["metadata"]["name"] for p in snap.pods} == {p["metadata"]["name"] for p in raw["pods"]}
    assert all(p["kind"] == "Pod" and p["apiVersion"] == "v1" for p in snap.pods)
    assert {e["metadata"]["name"] for e in snap.events} == {e["metadata"]["name"] for e in raw["events"]}
    assert snap.serve == raw["serve"] and snap.serve_error is None
    expected = {f.code for f in diagnose(type(snap).from_json(raw))}
    assert {f.code for f in diagnose(snap)} == expected
    # Pods and PDBs are listed by the release's label, never the whole namespace.
    lists = [urlsplit(r) for r in api_server.requests if r.split("?")[0].endswith(("/pods", "/poddisruptionbudgets"))]
    assert len(lists) == 2
    assert all(parse_qs(r.query)["labelSelector"] == ["app.kubernetes.io/instance=mls"] for r in lists)


def test_an_unreachable_serve_status_is_reported_not_raised(api_server: FakeApiServer) -> None:
    raw = load_raw("healthy")
    raw["rayclusters"][0]["status"]["head"]["serviceName"] = "gone-head-svc"
    api_server.snapshot = raw
    snap = collect(NS, RELEASE)
    assert snap.serve is None
    assert snap.serve_error is not None and "404" in snap.serve_error
    assert {f.code for f in diagnose(snap)} == {"serve-status-unavailable"}


@pytest.mark.parametrize("release", ["mls", "mistral-large-serve-prod", "a-very-long-release-name-for-production"])
def test_rayservice_name_is_the_charts(release: str, tmp_path: Path) -> None:
    """The name the collector reads is the one the chart renders (mls.fullname)."""
    site = helm_tools.site_required_file(tmp_path)
    proc = subprocess.run(
        [
            str(helm_tools.helm()),
            "template",
            release,
            str(CHART),
            *("-f", str(EXAMPLES_DIR / "cpu-demo.yaml"), "-f", str(site)),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    (rayservice,) = [d for d in yaml.safe_load_all(proc.stdout) if d and d["kind"] == "RayService"]
    assert rayservice_name(release) == rayservice["metadata"]["name"]


def test_an_unreachable_api_server_is_exit_3(api_server: FakeApiServer, capsys: pytest.CaptureFixture[str]) -> None:
    api_server.shutdown()
    api_server.server_close()  # nothing listens on the kubeconfig's server any more
    with pytest.raises(ClusterUnreachable, match="does not answer"):
        collect(NS, RELEASE)
    assert cli.main(["doctor", "--release", RELEASE, "-n", NS]) == 3
    assert "cluster doctor: cannot read the cluster: the API server does not answer" in capsys.readouterr().err


def test_a_refused_read_is_exit_3(api_server: FakeApiServer) -> None:
    api_server.snapshot = {**load_raw("healthy"), "forbidden": True}
    with pytest.raises(ClusterUnreachable, match="refused a read: 403"):
        collect(NS, RELEASE)
