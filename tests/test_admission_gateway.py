"""Admission through the real gateway app (fake engines, a real redis-server): limits
shared by two gateway replicas, the 429 and x-ratelimit-* headers, request caps, the
strict public API and its /openapi.json, and the tenant's cache salt."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from bench.live.prefix_counters import prometheus_sum
from cluster.admission.cache_salt import cache_salt
from cluster.auth import hash_api_key
from cluster.config import ClusterConfig, TenantLimits
from cluster.profiles import load_profile
from cluster.routing.block_hash import ROOT_HASH, chain_block_hashes, salt_root
from cluster.routing.hints import HintBoard
from tests.gateway_fakes import FakeEngine, fake_gateway_app
from tests.redis_server import RedisServer, redis_server  # noqa: F401  (fixture)

KEYS = {
    "acme": "key-acme",
    "globex": "key-globex",
    "initech": "key-initech",
    "tight": "key-tight",
    "hooli": "key-hooli",
}
RATE_HEADERS = [
    f"x-ratelimit-{what}-{dim}" for what in ("limit", "remaining", "reset") for dim in ("requests", "tokens")
]


def config(redis_url: str) -> ClusterConfig:
    cfg = load_profile("cpu-tiny")
    cfg.sessions.redis_url, cfg.sessions.redis_url_env = redis_url, None
    cfg.auth.enabled, cfg.auth.api_keys_env = True, None
    cfg.auth.tenants = {t: [hash_api_key(k)] for t, k in KEYS.items()}
    adm = cfg.admission
    # A loaded CI box can hold a Redis answer past the 0.25 s default, which would switch a
    # gateway to its local 1/N fallback mid-burst; these tests are about the shared limits.
    adm.redis_timeout_s = 5.0
    adm.default_limits = TenantLimits(requests_per_minute=1000, tokens_per_minute=1_000_000, max_n=4,
                                      max_tokens_cap=256, max_tokens_default=16, max_prompt_tokens=1000)  # fmt: skip
    adm.tenants = {
        "tight": TenantLimits(requests_per_minute=5, tokens_per_minute=100_000),
        "globex": TenantLimits(cache_group="umbrella", allowed_priorities=["interactive"]),
        "initech": TenantLimits(cache_group="umbrella"),
    }
    return cfg


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def chat(content: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": "mistral-large-2411", "messages": [{"role": "user", "content": content}], **extra}


@pytest.fixture
async def gateways(redis_server: RedisServer) -> AsyncIterator[list[tuple[httpx.AsyncClient, FakeEngine]]]:  # noqa: F811
    redis_server_url = redis_server.url
    out = []
    clients = []
    for _ in range(2):  # two gateway replicas, one Redis
        engine = FakeEngine(board=HintBoard())
        app = fake_gateway_app(config(redis_server_url), engine)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")
        clients.append(client)
        out.append((client, engine))
    yield out
    for c in clients:
        await c.aclose()


async def test_a_burst_over_two_gateways_is_admitted_up_to_the_limit(gateways: Any) -> None:
    (a, _), (b, _) = gateways
    replies = await asyncio.gather(
        *[(a if i % 2 else b).post("/v1/chat/completions", json=chat(), headers=auth("tight")) for i in range(12)]
    )
    codes = [r.status_code for r in replies]
    assert codes.count(200) == 5 and codes.count(429) == 7
    refused = next(r for r in replies if r.status_code == 429)
    err = refused.json()["error"]
    assert err["code"] == "rate_limit_exceeded" and err["type"] == "requests" and "RPM" in err["message"]
    assert 1 <= int(refused.headers["retry-after"]) <= 12
    for r in replies:  # every response, admitted or refused, says where the tenant stands
        assert all(h in r.headers for h in RATE_HEADERS), r.headers
        assert r.headers["x-ratelimit-limit-requests"] == "5"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    # Each gateway counts its refusals on /metrics (cluster.gateway.metrics).
    scraped = [(await gw.get("/metrics")).text for gw in (a, b)]
    assert sum(prometheus_sum(text, "mls_gateway_rate_limited") or 0 for text in scraped) == 7


async def test_streamed_reply_carries_the_headers_and_tokens_are_given_back(gateways: Any) -> None:
    (a, _), _ = gateways
    r = await a.post("/v1/chat/completions", json=chat(max_tokens=200, stream=True), headers=auth("acme"))
    assert r.status_code == 200 and all(h in r.headers for h in RATE_HEADERS)
    reserved_left = int(r.headers["x-ratelimit-remaining-tokens"])
    await asyncio.sleep(0.2)  # the correction runs when the stream ended
    r2 = await a.post("/v1/chat/completions", json=chat(max_tokens=200), headers=auth("acme"))
    # The first request reserved prompt + 200 but used prompt + a few: most came back.
    assert int(r2.headers["x-ratelimit-remaining-tokens"]) > reserved_left - 50


async def test_request_caps(gateways: Any) -> None:
    (a, engine), _ = gateways
    too_many = await a.post("/v1/chat/completions", json=chat(n=5), headers=auth("acme"))
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "n"
    too_long = await a.post("/v1/chat/completions", json=chat(max_tokens=257), headers=auth("acme"))
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "max_tokens"
    big = await a.post("/v1/chat/completions", json=chat("word " * 1200), headers=auth("acme"))
    assert big.status_code == 400 and big.json()["error"]["code"] == "context_length_exceeded"
    ok = await a.post("/v1/chat/completions", json=chat(), headers=auth("acme"))
    assert ok.status_code == 200 and engine.calls[-1][2].max_tokens == 16  # the tenant's default


async def test_priority_header_is_checked_against_the_tenant(gateways: Any) -> None:
    (a, _), _ = gateways
    r = await a.post("/v1/chat/completions", json=chat(), headers={**auth("globex"), "X-Priority": "batch"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "X-Priority"
    r = await a.post("/v1/chat/completions", json=chat(), headers={**auth("acme"), "X-Priority": "batch"})
    assert r.status_code == 200


@pytest.mark.parametrize(
    "field", ["kv_transfer_params", "vllm_xargs", "priority", "request_id", "cache_salt", "ec_transfer_params", "foo"]
)
async def test_internal_and_unknown_fields_are_refused_by_name(gateways: Any, field: str) -> None:
    (a, engine), _ = gateways
    r = await a.post("/v1/chat/completions", json=chat(**{field: "x"}), headers=auth("acme"))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and err["message"] == f"Unrecognized request argument supplied: {field}"
    r = await a.post("/v1/completions", json={"prompt": "hi", field: 1}, headers=auth("acme"))
    assert r.status_code == 400 and r.json()["error"]["param"] == field
    assert engine.calls == []


async def test_our_sampling_extensions_reach_the_engine(gateways: Any) -> None:
    (a, engine), _ = gateways
    body = chat(max_tokens=4, ignore_eos=True, min_tokens=2, top_k=5, min_p=0.1, repetition_penalty=1.1)
    r = await a.post("/v1/chat/completions", json=body, headers=auth("acme"))
    assert r.status_code == 200, r.text
    sent = engine.calls[-1][2]
    assert (sent.ignore_eos, sent.min_tokens, sent.top_k) == (True, 2, 5)


@pytest.mark.parametrize(
    "body", [{"messages": None}, {"messages": []}, {"messages": {}}, {}, [], "x", {"messages": [None]}]
)
async def test_malformed_messages_are_clear_400s(gateways: Any, body: Any) -> None:
    (a, _), _ = gateways
    r = await a.post("/v1/chat/completions", json=body, headers=auth("acme"))
    assert r.status_code == 400, r.text
    assert "list index" not in r.json()["error"]["message"]


async def test_openapi_names_the_project_and_only_public_fields(gateways: Any) -> None:
    (a, _), _ = gateways
    doc = (await a.get("/openapi.json")).json()
    assert doc["info"]["title"] == "mistral-large-serve" and doc["info"]["version"]
    schemas = doc["components"]["schemas"]
    chat_fields = set(schemas["ChatCompletionRequest"]["properties"])
    assert {"messages", "max_tokens", "tools", "session_id"} <= chat_fields
    assert not chat_fields & {"kv_transfer_params", "vllm_xargs", "priority", "request_id", "cache_salt"}
    assert "cache_salt" not in schemas["CompletionRequest"]["properties"]
    paths = doc["paths"]
    body = paths["/v1/sessions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/CreateSessionRequest"}
    assert "system_prompt" in schemas["CreateSessionRequest"]["properties"]
    assert paths["/v1/chat/completions"]["post"]["requestBody"]["required"] is True


async def test_each_tenant_gets_its_own_cache_salt_and_prefix_chain(gateways: Any) -> None:
    (a, engine), _ = gateways
    for tenant in ("acme", "globex", "initech"):
        r = await a.post("/v1/chat/completions", json=chat("the same long prompt " * 20), headers=auth(tenant))
        assert r.status_code == 200
    salts = [call[2].cache_salt for call in engine.calls]
    assert salts[0] == cache_salt("acme") and salts[1] == salts[2] == cache_salt("x", "umbrella")
    assert salts[0] != salts[1] and cache_salt("umbrella") != cache_salt("x", "umbrella")
    ids = list(range(64))
    own = chain_block_hashes(ids, 32, salt_root(salts[0]))
    assert own != chain_block_hashes(ids, 32, salt_root(salts[1])) and own != chain_block_hashes(ids, 32, ROOT_HASH)


class HeldEngine(FakeEngine):
    """Holds every request until `release` is set (a saturated pool)."""

    def __init__(self) -> None:
        super().__init__(board=HintBoard())
        self.release = asyncio.Event()
        self.order: list[str] = []

    async def generate(self, pool: str, kind: Any, body: Any, *, session_id: str | None = None, **kw: Any) -> Any:
        self.order.append(body.messages[-1]["content"])
        await self.release.wait()
        async for chunk in super().generate(pool, kind, body, session_id=session_id):
            yield chunk


async def test_saturated_pool_queues_fairly_and_sheds_after_the_deadline(redis_server: RedisServer) -> None:  # noqa: F811
    cfg = config(redis_server.url)
    cfg.pools = cfg.pools[:1]
    cfg.admission.queue.in_flight_per_replica = 1
    cfg.admission.queue.deadline_s = 0.3
    engine = HeldEngine()
    app = fake_gateway_app(cfg, engine)  # 2 standard replicas x 1: two requests in flight
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:

        def send(tenant: str, tag: str) -> Any:
            return asyncio.create_task(c.post("/v1/chat/completions", json=chat(tag), headers=auth(tenant)))

        running = [send("acme", "a-run-0"), send("acme", "a-run-1")]
        await asyncio.sleep(0.1)
        late = send("acme", "a-late")
        timed_out = await late  # nobody finished within the deadline
        assert timed_out.status_code == 503 and timed_out.json()["error"]["code"] == "queue_timeout"
        assert int(timed_out.headers["retry-after"]) >= 1 and "x-ratelimit-limit-requests" in timed_out.headers
        cfg.admission.queue.deadline_s = 30
        queued = [send("acme", f"a-{i}") for i in range(4)]
        await asyncio.sleep(0.1)
        queued += [send("globex", f"g-{i}") for i in range(2)]
        await asyncio.sleep(0.1)
        engine.release.set()
        replies = await asyncio.gather(*running, *queued)
    assert all(r.status_code == 200 for r in replies)
    # globex queued after four of acme's, yet both of its requests were among the next
    # four served (first come, first served would have served them last).
    served = [t for t in engine.order if t not in ("a-run-0", "a-run-1")]
    assert len(served) == 6 and {"g-0", "g-1"} <= set(served[:4]), served


async def test_usage_per_tenant_and_day_for_chargeback(gateways: Any) -> None:
    (a, _), (b, _) = gateways
    for client in (a, b):
        r = await client.post("/v1/chat/completions", json=chat("count me"), headers=auth("hooli"))
        assert r.status_code == 200
    for _ in range(50):  # counted when each request has ended, in the background
        usage = (await a.get("/v1/usage", headers=auth("hooli"))).json()
        if usage["requests"] == 2:
            break
        await asyncio.sleep(0.02)
    # The fake engine reports 1 prompt + 2 completion tokens per request.
    assert usage["requests"] == 2 and usage["prompt_tokens"] == 2 and usage["completion_tokens"] == 4
    assert usage["tenant"] == "hooli"
    assert (await a.get("/v1/usage", headers=auth("hooli"), params={"day": "2001-01-01"})).json()["requests"] == 0
    assert (await a.get("/v1/usage", params={"day": "x"}, headers=auth("hooli"))).status_code == 400
    assert (await a.get("/v1/usage")).status_code == 401
