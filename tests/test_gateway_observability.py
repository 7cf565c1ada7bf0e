"""The gateway's metrics (/metrics, cluster.gateway.metrics + the measure step) and its
trace (the trace steps) through the real gateway app with a fake engine; spans go through
the SDK's real OTLP/HTTP exporter to a real receiver (tests/otlp_receiver.py).
End to end against the real cluster and a real Prometheus: tests/test_e2e_observability.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.config import ClusterConfig, SessionConfig, TelemetryConfig
from cluster.gateway.app import build_gateway_app
from cluster.gateway.context import RequestContext
from cluster.gateway.metrics import GatewayMetrics
from cluster.profiles import load_profile
from cluster.routing.hints import HintBoard
from cluster.sessions import SessionFlow, SessionStore, TruncationPolicy
from cluster.sessions.connection import build_redis
from cluster.telemetry import tracer_provider
from cluster.upstream import vllm as upstream_vllm
from tests.gateway_fakes import FakeEngine, fake_gateway
from tests.otlp_receiver import OTLPReceiver
from tests.redis_server import RedisServer, free_port, redis_server  # noqa: F401  (fixture)

ChatRequest, CompletionRequest = upstream_vllm.request_models()
CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of a Prometheus text exposition."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(scrape: dict[Any, float], name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in scrape.items() if n == name and set(labels.items()) <= set(ls))


def client_of(cfg: ClusterConfig, engine: FakeEngine, **kw: Any) -> tuple[httpx.AsyncClient, Any]:
    gateway = fake_gateway(cfg, engine, **kw)
    app = build_gateway_app(gateway)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw"), gateway


@pytest.fixture
async def gw() -> AsyncIterator[tuple[httpx.AsyncClient, FakeEngine, Any]]:
    engine = FakeEngine(board=HintBoard())
    client, gateway = client_of(load_profile("cpu-tiny"), engine)
    async with client:
        yield client, engine, gateway


async def test_metrics_of_requests_as_the_client_saw_them(gw: Any) -> None:
    client, engine, gateway = gw
    engine.matched_blocks, engine.cached_tokens = 1, 24  # the router predicted one block, the engine hit 24
    whole = await client.post("/v1/chat/completions", json=CHAT)
    streamed = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    refused = await client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-4o"})
    assert (whole.status_code, streamed.status_code, refused.status_code) == (200, 200, 404)
    r = await client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    scrape = samples(r.text)
    ok = {"pool": "standard", "tenant": "default", "kind": "chat", "status_code": "200", "outcome": "ok"}
    assert value(scrape, "mls_gateway_requests_total", **ok) == 2
    assert value(scrape, "mls_gateway_requests_total", pool="none", status_code="404", outcome="error") == 1
    # Client-side latency of the streamed reply: one first token, one gap (two content chunks).
    assert value(scrape, "mls_gateway_time_to_first_token_seconds_count", pool="standard") == 1
    assert value(scrape, "mls_gateway_inter_token_latency_seconds_count", pool="standard") == 1
    assert value(scrape, "mls_gateway_queue_time_seconds_count", pool="standard") == 2
    assert value(scrape, "mls_gateway_request_duration_seconds_count") == 3
    assert value(scrape, "mls_gateway_routing_decisions_total", pool="standard", reason="min-ttft") == 2
    prompt = int(whole.headers["x-prompt-tokens"]) + int(streamed.headers["x-prompt-tokens"])
    assert value(scrape, "mls_gateway_prompt_tokens_total", pool="standard", tenant="default") == prompt
    assert value(scrape, "mls_gateway_completion_tokens_total", pool="standard") == 2 * 2  # the engine's usage
    block = load_profile("cpu-tiny").pools[0].engine.block_size
    assert value(scrape, "mls_gateway_cached_tokens_total", source="predicted") == 2 * block
    assert value(scrape, "mls_gateway_cached_tokens_total", source="engine") == 2 * 24
    assert value(scrape, "mls_gateway_in_flight_requests", pool="standard") == 0
    # Counters of other steps exist at zero for every configured pool and tenant.
    for name, labels in [
        ("mls_gateway_retries_total", {"pool": "long"}),
        ("mls_gateway_migrations_total", {"pool": "standard"}),
        ("mls_gateway_rate_limited_total", {"tenant": "default"}),
        ("mls_gateway_shed_total", {"pool": "long", "tenant": "other"}),
        ("mls_gateway_spills_total", {"from_pool": "standard", "to_pool": "long"}),
    ]:
        key = (name, tuple(sorted(labels.items())))
        assert scrape.get(key) == 0, key


async def test_a_spill_is_counted_from_and_to_its_pools(gw: Any) -> None:
    client, _, gateway = gw
    cfg = load_profile("cpu-tiny")
    gateway.pools.in_flight["standard"] = cfg.pools[0].engine.max_num_seqs * cfg.pools[0].start_replicas
    r = await client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200 and r.headers["x-pool"] == "long"
    scrape = samples((await client.get("/metrics")).text)
    assert value(scrape, "mls_gateway_spills_total", from_pool="standard", to_pool="long") == 1
    assert value(scrape, "mls_gateway_requests_total", pool="long", status_code="200") == 1


def test_label_values_come_from_the_config_not_from_requests() -> None:
    cfg = load_profile("cpu-tiny")
    cfg.auth.tenants = {"acme": ["0" * 64]}
    metrics = GatewayMetrics.from_config(cfg)
    ctx = RequestContext(kind="chat", body=None, headers={}, tenant="acme", pool="long")
    assert (metrics.tenant(ctx), metrics.pool(ctx)) == ("acme", "long")
    stranger = RequestContext(kind="chat", body=None, headers={}, tenant="from-an-env-secret", pool="nope")
    assert (metrics.tenant(stranger), metrics.pool(stranger)) == ("other", "none")
    metrics.retry(ctx)
    metrics.shed_request(stranger)
    scrape = samples(metrics.exposition().decode())
    assert value(scrape, "mls_gateway_retries_total", pool="long") == 1
    assert value(scrape, "mls_gateway_shed_total", pool="none", tenant="other") == 1
    tenants = {dict(ls).get("tenant") for (_, ls) in scrape} - {None}
    assert tenants == {"acme", "default", "other"}


async def test_metrics_endpoint_can_be_moved_or_turned_off() -> None:
    cfg = load_profile("cpu-tiny")
    cfg.telemetry.metrics.path = "/internal/metrics"
    client, _ = client_of(cfg, FakeEngine(board=HintBoard()))
    async with client:
        assert (await client.get("/internal/metrics")).status_code == 200
        assert (await client.get("/metrics")).status_code == 404
    cfg.telemetry.metrics.path = None
    client, _ = client_of(cfg, FakeEngine(board=HintBoard()))
    async with client:
        assert (await client.get("/internal/metrics")).status_code == 404


def test_metrics_on_a_port_of_their_own() -> None:
    metrics = GatewayMetrics.from_config(load_profile("cpu-tiny"))
    port = free_port()
    assert metrics.serve_on_port(port, addr="127.0.0.1")
    metrics.retry(RequestContext(kind="chat", body=None, headers={}, pool="standard"))
    scrape = samples(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)
    assert value(scrape, "mls_gateway_retries_total", pool="standard") == 1
    assert not metrics.serve_on_port(port, addr="127.0.0.1")  # taken: the caller logs and carries on


async def test_session_outcomes_stored_and_store_down(redis_server: RedisServer) -> None:  # noqa: F811
    cfg = load_profile("cpu-tiny")

    def flow_on(url: str) -> SessionFlow:
        c = SessionConfig(redis_url=url, redis_url_env=None, retries=0, socket_timeout_s=0.5, connect_timeout_s=0.5)
        return SessionFlow(SessionStore(build_redis(c), ttl_s=600, policy=TruncationPolicy(50, 100_000)))

    up, down = flow_on(redis_server.url), flow_on(f"redis://127.0.0.1:{free_port()}/0")
    sid = (await up.create("default")).session_id
    client, gateway = client_of(cfg, FakeEngine(board=HintBoard()), sessions=up)
    async with client:
        r = await client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers={"X-Session-ID": sid})
        assert r.status_code == 200
        scrape = samples((await client.get("/metrics")).text)
    client_down, _ = client_of(cfg, FakeEngine(board=HintBoard()), sessions=down)
    async with client_down:
        r = await client_down.post("/v1/chat/completions", json=CHAT, headers={"X-Session-ID": sid})
        assert r.status_code == 503
        scrape_down = samples((await client_down.get("/metrics")).text)
    assert value(scrape, "mls_gateway_session_outcomes_total", tenant="default", outcome="stored") == 1
    assert value(scrape_down, "mls_gateway_session_outcomes_total", tenant="default", outcome="store_down") == 1
    assert value(scrape_down, "mls_gateway_requests_total", status_code="503") == 1
    await up.aclose()
    await down.aclose()


# -- traces through a real OTLP/HTTP exporter and receiver -----------------------------------


@pytest.fixture
def receiver() -> Iterator[OTLPReceiver]:
    r = OTLPReceiver().start()
    yield r
    r.stop()


async def test_trace_chain_client_gateway_engine_call_and_the_engines_traceparent(receiver: OTLPReceiver) -> None:
    telemetry = TelemetryConfig(otlp_endpoint=receiver.endpoint, otlp_protocol="http/protobuf", service_name="gw")
    provider = tracer_provider(telemetry, receiver.endpoint)
    engine = FakeEngine(board=HintBoard(), replica="replica-7")
    engine.reason, engine.matched_blocks = "cache", 1
    client, _ = client_of(load_profile("cpu-tiny"), engine, tracer=provider.get_tracer("cluster.gateway"))
    trace_id, client_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    async with client:
        r = await client.post(
            "/v1/chat/completions",
            json={**CHAT, "stream": True},
            headers={"traceparent": f"00-{trace_id}-{client_span}-01"},
        )
    assert r.status_code == 200 and r.text.rstrip().endswith("[DONE]")
    provider.force_flush()
    spans = receiver.wait_for(trace_id, lambda s: len(s) >= 2)
    by_name = {s.name: s for s in spans}
    assert set(by_name) == {"gateway.chat", "engine.chat"}, spans
    server, call = by_name["gateway.chat"], by_name["engine.chat"]
    assert server.parent_span_id == client_span and call.parent_span_id == server.span_id
    assert server.service == "gw" and receiver.requests >= 1
    # The engine got the engine-call span's context: vLLM's request span becomes its child.
    assert engine.headers[-1]["traceparent"] == f"00-{trace_id}-{call.span_id}-01"
    block = load_profile("cpu-tiny").pools[0].engine.block_size
    for span in (server, call):
        assert span.attributes["pool"] == "standard" and span.attributes["replica"] == "replica-7"
        assert span.attributes["routing.reason"] == "cache" and span.attributes["cached_tokens.predicted"] == block
        assert span.attributes["attempts"] == 1 and span.attributes["outcome"] == "ok"
    assert server.attributes["http.status_code"] == 200 and server.attributes["prompt_tokens"] > 0
    provider.shutdown()


async def test_a_refused_request_is_one_error_span_without_an_engine_call(receiver: OTLPReceiver) -> None:
    telemetry = TelemetryConfig(otlp_endpoint=receiver.endpoint, otlp_protocol="http/protobuf")
    provider = tracer_provider(telemetry, receiver.endpoint)
    engine = FakeEngine(board=HintBoard())
    client, _ = client_of(load_profile("cpu-tiny"), engine, tracer=provider.get_tracer("cluster.gateway"))
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    async with client:
        r = await client.post(
            "/v1/chat/completions",
            json={**CHAT, "max_tokens": 100_000},
            headers={"traceparent": f"00-{trace_id}-b7ad6b7169203331-01"},
        )
    assert r.status_code == 400
    provider.force_flush()
    spans = receiver.wait_for(trace_id, lambda s: len(s) >= 1)
    assert [s.name for s in spans] == ["gateway.chat"] and engine.calls == []
    assert spans[0].attributes["http.status_code"] == 400
    assert spans[0].attributes["error.code"] == "context_length_exceeded"
    provider.shutdown()
