"""Observability end to end on the real local cluster: the gateway's /metrics on the API
port (where AIPerf-style clients look), one trace per request from the client through the
gateway into the vLLM engine (spans received by a real OTLP/HTTP receiver), and a real
Prometheus (Debian's `prometheus`) scraping the gateway and Ray's metrics endpoint:
every metric the chart's alerts and dashboards name exists in the scrape, and every alert
expression evaluates without error through Prometheus's query API. A renamed metric
fails here."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from cluster.ops.local import free_port
from tests import helm_tools
from tests.otlp_receiver import OTLPReceiver

pytestmark = pytest.mark.e2e

CHART = helm_tools.REPO / "helm" / "mistral-large-serve"
RELEASE, NAMESPACE = "mls", "llm"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
SCRAPE_INTERVAL_S = 2

# Metrics of exporters that do not run in the local cluster (they run beside it in
# Kubernetes); each named with its exporter so a typo in a Ray/vLLM/gateway name still fails.
EXTERNAL_PREFIXES = {
    "kube_": "kube-state-metrics",
    "kuberay_": "the KubeRay operator",
    "redis_": "redis_exporter (the chart's Redis sidecar)",
}


# Counters vLLM exports through Ray only from their first event: the local cluster's tiny
# model never runs out of KV cache. tests/test_helm.py checks their names against vLLM's source.
FIRST_EVENT_COUNTERS = {"ray_vllm_num_preemptions_total": "a preemption (KV cache full)"}


def _headers(cluster: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {cluster.api_key}"}


metric_names = helm_tools.promql_metric_names


def _grafana_to_promql(expr: str) -> str:
    """Grafana's variables, as a dashboard of this release would resolve them."""
    for var, val in {
        "$__rate_interval": "1m",
        "$__interval": "10s",
        "$namespace": NAMESPACE,
        "$instance": RELEASE,
        "$pool": ".*",
        "$tenant": ".*",
    }.items():
        expr = expr.replace("${" + var[1:] + "}", val).replace(var, val)
    return expr


def dashboard_exprs() -> dict[str, str]:
    """{where: PromQL} of every dashboard's panels and variable queries."""
    out: dict[str, str] = {}
    for path in sorted((CHART / "dashboards").glob("*.json")):
        dashboard = json.loads(path.read_text())
        panels = list(dashboard.get("panels", []))
        for row in list(panels):
            panels.extend(row.get("panels", []))  # collapsed rows keep their panels inside
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    out[f"{path.name}: {panel.get('title')} [{target.get('refId', '')}]"] = _grafana_to_promql(
                        target["expr"]
                    )
        for var in dashboard.get("templating", {}).get("list", []):
            query = var.get("query")
            query = query.get("query") if isinstance(query, dict) else query
            m = re.fullmatch(r"\s*label_values\((.+),\s*\w+\)\s*", query or "")
            if m:
                out[f"{path.name}: variable {var['name']}"] = _grafana_to_promql(m.group(1))
    return out


def alert_exprs() -> dict[str, str]:
    """{alert: PromQL} of the chart's PrometheusRule, rendered as helm renders it."""
    values = helm_tools.REPO / "helm" / "examples" / "h100x8-bf16.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        site = helm_tools.site_required_file(Path(tmp))
        cmd = [str(helm_tools.helm()), "template", RELEASE, str(CHART), "--namespace", NAMESPACE]
        cmd += ["-f", str(values), "-f", str(site)]
        for kind in ("PrometheusRule", "PodMonitor", "ServiceMonitor"):  # as if the Prometheus Operator were there
            cmd += ["--api-versions", f"monitoring.coreos.com/v1/{kind}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    rules = [d for d in yaml.safe_load_all(proc.stdout) if d and d["kind"] == "PrometheusRule"]
    assert len(rules) == 1
    return {r["alert"]: r["expr"] for g in rules[0]["spec"]["groups"] for r in g["rules"] if "alert" in r}


class Prometheus:
    """A real Prometheus server scraping the given targets, with its HTTP API."""

    def __init__(self, workdir: Path, targets: dict[str, tuple[str, str]]) -> None:
        self.port = free_port()
        config = {
            "global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s", "evaluation_interval": f"{SCRAPE_INTERVAL_S}s"},
            "scrape_configs": [
                {
                    "job_name": job,
                    "metrics_path": path,
                    # The labels the chart's PodMonitor adds from the pod (pool: from the
                    # worker group; locally one node stands in for every group).
                    "static_configs": [
                        {"targets": [address], "labels": {"namespace": NAMESPACE, "app_instance": RELEASE}}
                    ],
                }
                for job, (address, path) in targets.items()
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = (workdir / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.api = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10)

    def query(self, expr: str) -> dict[str, Any]:
        r = self.api.get("/api/v1/query", params={"query": expr})
        return dict(r.json())

    def wait_for_targets(self, timeout_s: float = 60) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        active: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            try:
                r = self.api.get("/api/v1/targets")
                # 503 "Service Unavailable" (plain text) until its storage is open.
                if r.status_code == 200:
                    active = r.json()["data"]["activeTargets"]
                    if active and all(t["health"] == "up" for t in active):
                        return active
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"Prometheus targets not up: {active}")

    def names(self) -> set[str]:
        return set(self.api.get("/api/v1/label/__name__/values").json()["data"])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def traffic(local_cluster: Any) -> dict[str, Any]:
    """A little traffic of every kind: whole and streamed chats (the same long prompt
    twice, so the engine's prefix cache hits), a completion, a refusal; the first carries
    a client traceparent."""
    client = httpx.Client(base_url=local_cluster.base_url, headers=_headers(local_cluster), timeout=120)
    model = local_cluster.cfg.model.served_name
    system = "You are a terse assistant. " * 20  # several cache blocks of shared prefix
    chat = {"model": model, "max_tokens": 6, "messages": [{"role": "system", "content": system}]}
    trace_id, client_span = "5b8aa5a2d2c872e8321cf37308d69df2", "051581bf3cb55c13"
    traced = client.post(
        "/v1/chat/completions",
        json={**chat, "messages": [*chat["messages"], {"role": "user", "content": "traced"}]},
        headers={"traceparent": f"00-{trace_id}-{client_span}-01"},
    )
    assert traced.status_code == 200, traced.text
    for i in range(3):
        body = {
            **chat,
            "messages": [*chat["messages"], {"role": "user", "content": f"turn {i}"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            r.read()
    done = client.post("/v1/completions", json={"model": model, "prompt": "Once upon a time", "max_tokens": 4})
    assert done.status_code == 200, done.text
    refused = client.post("/v1/chat/completions", json={**chat, "model": "gpt-4o"})
    assert refused.status_code == 404
    return {"trace_id": trace_id, "client_span": client_span, "traced": traced}


def test_gateway_metrics_on_the_api_port(local_cluster: Any, traffic: dict[str, Any]) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(f"{local_cluster.base_url}/metrics", timeout=30)  # no key: scrapers carry none
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = [s for f in text_string_to_metric_families(r.text) for s in f.samples]

    def total(name: str, **labels: str) -> float:
        return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())

    assert total("mls_gateway_requests_total", tenant="acme", status_code="200", outcome="ok") >= 5
    assert total("mls_gateway_requests_total", tenant="acme", pool="none", status_code="404") >= 1
    assert total("mls_gateway_time_to_first_token_seconds_count", pool="standard", tenant="acme") >= 3
    assert total("mls_gateway_inter_token_latency_seconds_count", pool="standard") >= 3
    assert total("mls_gateway_queue_time_seconds_count", pool="standard") >= 5
    assert total("mls_gateway_routing_decisions_total", pool="standard") >= 5
    assert total("mls_gateway_prompt_tokens_total", pool="standard", tenant="acme") > 0
    assert total("mls_gateway_completion_tokens_total", pool="standard", tenant="acme") > 0
    # The engines report cached tokens (enable_prompt_tokens_details); the shared system
    # prompt was cached after the first request, and the router predicted hits too.
    assert total("mls_gateway_cached_tokens_total", source="engine") > 0
    assert total("mls_gateway_cached_tokens_total", source="predicted") > 0
    reasons = {s.labels["reason"] for s in samples if s.name == "mls_gateway_routing_decisions_total"}
    assert reasons <= {"cache", "affinity", "min-ttft", "fallback"}, reasons


def test_one_trace_from_the_client_through_the_gateway_into_vllm(
    local_cluster: Any, traffic: dict[str, Any], otlp_receiver: OTLPReceiver
) -> None:
    trace_id = traffic["trace_id"]
    names = {"gateway.chat", "engine.chat", "llm_request"}
    spans = otlp_receiver.wait_for(trace_id, lambda got: names <= {s.name for s in got}, timeout_s=60)
    by_name = {s.name: s for s in spans}
    assert names <= set(by_name), [(s.name, s.service) for s in spans]
    gateway, call, engine = by_name["gateway.chat"], by_name["engine.chat"], by_name["llm_request"]
    assert gateway.parent_span_id == traffic["client_span"]
    assert call.parent_span_id == gateway.span_id
    assert engine.parent_span_id == call.span_id  # vLLM continued the traceparent the gateway sent
    assert gateway.attributes["replica"] == traffic["traced"].headers["x-served-by"]
    assert gateway.attributes["pool"] == traffic["traced"].headers["x-pool"] == call.attributes["pool"]
    assert gateway.attributes["attempts"] == 1 and gateway.attributes["tenant"] == "acme"
    assert "cached_tokens.predicted" in gateway.attributes and "cached_tokens.engine" in gateway.attributes
    # vLLM's id is "chatcmpl-<request id>"; the id is returned once (by Serve's proxy).
    (request_id,) = traffic["traced"].headers.get_list("x-request-id")
    assert engine.attributes["gen_ai.request.id"] == f"chatcmpl-{request_id}"
    assert engine.attributes["gen_ai.usage.prompt_tokens"] == int(traffic["traced"].headers["x-prompt-tokens"])


@pytest.fixture(scope="module")
def prometheus(local_cluster: Any, traffic: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    assert local_cluster.metrics_export_port, "the local cluster records Ray's metrics export port"
    server = Prometheus(
        tmp_path_factory.mktemp("prometheus"),
        {
            "gateway": (f"127.0.0.1:{local_cluster.http_port}", "/metrics"),
            "ray": (f"127.0.0.1:{local_cluster.metrics_export_port}", "/metrics"),
        },
    )
    try:
        server.wait_for_targets()
        # vLLM's metrics reach Ray's endpoint through its metrics agent, every few seconds.
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and "ray_vllm_time_to_first_token_seconds_bucket" not in server.names():
            time.sleep(1)
        time.sleep(3 * SCRAPE_INTERVAL_S)  # a few scrapes after the traffic, for rate()
        yield server
    finally:
        server.stop()


def test_every_metric_the_alerts_and_dashboards_use_is_scraped(prometheus: Prometheus) -> None:
    exprs = {**{f"alert {a}": e for a, e in alert_exprs().items()}, **dashboard_exprs()}
    assert len(exprs) > 10
    scraped = prometheus.names()
    missing: dict[str, list[str]] = {}
    for where, expr in exprs.items():
        for name in metric_names(expr):
            external = any(name.startswith(p) for p in EXTERNAL_PREFIXES)
            if name not in scraped and not external and name not in FIRST_EVENT_COUNTERS:
                missing.setdefault(name, []).append(where)
    assert missing == {}, f"named in the chart but not exported by the running cluster: {missing}"
    # The gateway's own series, and Ray's, came from the two targets.
    assert {"mls_gateway_requests_total", "ray_vllm_num_requests_running", "ray_serve_num_http_requests_total"} <= (
        scraped
    )


def test_every_alert_expression_evaluates(prometheus: Prometheus) -> None:
    failures = {}
    for alert, expr in alert_exprs().items():
        answer = prometheus.query(expr)
        if answer.get("status") != "success":
            failures[alert] = answer.get("error")
    assert failures == {}
    # And one with data: the gateway's requests per pool, as a dashboard panel asks.
    answer = prometheus.query(f'sum by (pool) (mls_gateway_requests_total{{namespace="{NAMESPACE}"}})')
    assert answer["status"] == "success" and {r["metric"].get("pool") for r in answer["data"]["result"]} >= {"standard"}
