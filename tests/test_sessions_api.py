"""The /v1/sessions endpoints and the session step of the real gateway app, over HTTP
(httpx's ASGI transport) against a real redis-server.

`chat_app` is the gateway's own FastAPI app and pipeline (cluster.gateway) with a fake
engine in place of Ray Serve: it echoes how many messages it received, which makes the
prepended history visible. The real engine path is covered by tests/test_e2e_sessions.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from cluster.auth import hash_api_key
from cluster.config import AuthConfig, SessionConfig
from cluster.profiles import load_profile
from cluster.sessions import SessionFlow, SessionStore, TruncationPolicy
from cluster.sessions.connection import build_redis
from cluster.sessions.keys import new_session_id
from tests.gateway_fakes import FakeEngine, fake_gateway_app
from tests.redis_server import RedisServer, persistent_redis, redis_server  # noqa: F401  (fixtures)

KEYS = {"acme": "key-acme-123", "globex": "key-globex-456"}


def bearer(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def auth_config(enabled: bool = True) -> AuthConfig:
    return AuthConfig(enabled=enabled, tenants={t: [hash_api_key(k)] for t, k in KEYS.items()}, api_keys_env=None)


def chat_app(flow: SessionFlow, auth: AuthConfig) -> Any:
    cfg = load_profile("cpu-tiny")
    cfg.auth = auth
    return fake_gateway_app(cfg, FakeEngine(), sessions=flow)


def make_flow(url: str) -> SessionFlow:
    cfg = SessionConfig(redis_url=url, redis_url_env=None, retries=1, connect_timeout_s=0.5, socket_timeout_s=1.0)
    store = SessionStore(build_redis(cfg), ttl_s=600, policy=TruncationPolicy(50, 100_000), retry_after_s=7)
    return SessionFlow(store)


def make_auth(enabled: bool = True) -> AuthConfig:
    return auth_config(enabled)


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[httpx.AsyncClient]:  # noqa: F811
    flow = make_flow(redis_server.url)
    transport = httpx.ASGITransport(app=chat_app(flow, make_auth()))
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
        yield c
    await flow.aclose()


async def test_create_read_delete(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/sessions", json={"system_prompt": "Be brief.", "metadata": {"app": "t"}},
                          headers=bearer("acme"))  # fmt: skip
    assert r.status_code == 201
    s = r.json()
    assert s["object"] == "session" and s["id"].startswith("sess_") and s["version"] == 0
    assert s["messages"] == [{"role": "system", "content": "Be brief."}] and s["metadata"] == {"app": "t"}
    r = await client.get(f"/v1/sessions/{s['id']}", headers=bearer("acme"))
    assert r.status_code == 200 and r.json()["id"] == s["id"] and r.json()["expires_in_s"] > 500
    r = await client.delete(f"/v1/sessions/{s['id']}", headers=bearer("acme"))
    assert r.status_code == 200 and r.json() == {"id": s["id"], "object": "session.deleted", "deleted": True}
    r = await client.get(f"/v1/sessions/{s['id']}", headers=bearer("acme"))
    assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"
    r = await client.delete(f"/v1/sessions/{s['id']}", headers=bearer("acme"))
    assert r.status_code == 404
    r = await client.post("/v1/sessions", headers=bearer("acme"))  # empty body is fine
    assert r.status_code == 201 and r.json()["messages"] == []


async def test_bad_requests_are_400(client: httpx.AsyncClient) -> None:
    for body in ({"system_prompt": 3}, {"colour": "red"}, {"metadata": {"k": 1}}, ["not", "an", "object"]):
        r = await client.post("/v1/sessions", json=body, headers=bearer("acme"))
        assert r.status_code == 400, body
        assert r.json()["error"]["type"] == "invalid_request_error"
    r = await client.post("/v1/sessions", content=b"{nope", headers=bearer("acme"))
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = await client.get("/v1/sessions/bad!id", headers=bearer("acme"))
    assert r.status_code == 400


async def test_auth_required(client: httpx.AsyncClient) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEYS["acme"]}):
        for method, path in (("POST", "/v1/sessions"), ("GET", f"/v1/sessions/{new_session_id()}")):
            r = await client.request(method, path, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]},
                              headers=headers)  # fmt: skip
        assert r.status_code == 401


async def test_tenant_cannot_touch_another_tenants_session(client: httpx.AsyncClient) -> None:
    sid = (await client.post("/v1/sessions", headers=bearer("acme"))).json()["id"]
    turn = {"messages": [{"role": "user", "content": "acme secret"}]}
    assert (await client.post("/v1/chat/completions", json=turn, headers={**bearer("acme"), "X-Session-ID": sid})
            ).status_code == 200  # fmt: skip
    spy = {**bearer("globex"), "X-Session-ID": sid}
    assert (await client.get(f"/v1/sessions/{sid}", headers=bearer("globex"))).status_code == 404
    r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}, headers=spy)
    assert r.status_code == 404 and "acme secret" not in r.text
    assert (await client.delete(f"/v1/sessions/{sid}", headers=bearer("globex"))).status_code == 404
    mine = (await client.get(f"/v1/sessions/{sid}", headers=bearer("acme"))).json()
    assert mine["version"] == 1 and [m["content"] for m in mine["messages"]][0] == "acme secret"


async def test_three_turn_conversation_header_body_and_stream(client: httpx.AsyncClient) -> None:
    sid = (await client.post("/v1/sessions", json={"system_prompt": "S"}, headers=bearer("acme"))).json()["id"]
    h = {**bearer("acme"), "X-Session-ID": sid}
    r1 = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "one"}]}, headers=h)
    assert r1.json()["choices"][0]["message"]["content"] == "seen 2: one"  # system + new message
    r2 = await client.post(  # body field instead of the header
        "/v1/chat/completions",
        json={"session_id": sid, "messages": [{"role": "user", "content": "two"}]},
        headers=bearer("acme"),
    )
    assert r2.json()["choices"][0]["message"]["content"] == "seen 4: two"
    r3 = await client.post(
        "/v1/chat/completions", json={"stream": True, "messages": [{"role": "user", "content": "three"}]}, headers=h
    )
    assert r3.status_code == 200 and r3.text.rstrip().endswith("data: [DONE]")
    stored = (await client.get(f"/v1/sessions/{sid}", headers=bearer("acme"))).json()
    assert [m["content"] for m in stored["messages"]] == [
        "S", "one", "seen 2: one", "two", "seen 4: two", "three", "seen 6: three",
    ]  # fmt: skip
    assert stored["version"] == 3 and stored["turns"] == 3
    # A stateless request is untouched by sessions.
    r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "solo"}]},
                          headers=bearer("acme"))  # fmt: skip
    assert r.json()["choices"][0]["message"]["content"] == "seen 1: solo"


async def test_redis_outage_503_then_recovery(persistent_redis: RedisServer) -> None:  # noqa: F811
    flow = make_flow(persistent_redis.url)
    transport = httpx.ASGITransport(app=chat_app(flow, make_auth()))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            sid = (await client.post("/v1/sessions", headers=bearer("acme"))).json()["id"]
            h = {**bearer("acme"), "X-Session-ID": sid}
            msg = {"messages": [{"role": "user", "content": "before"}]}
            assert (await client.post("/v1/chat/completions", json=msg, headers=h)).status_code == 200

            persistent_redis.stop()
            for method, path, kw in (
                ("POST", "/v1/chat/completions", {"json": msg, "headers": h}),
                ("GET", f"/v1/sessions/{sid}", {"headers": bearer("acme")}),
                ("POST", "/v1/sessions", {"headers": bearer("acme")}),
            ):
                r = await client.request(method, path, **kw)  # type: ignore[arg-type]
                assert r.status_code == 503, path
                assert r.headers["retry-after"] == "7"
                assert r.json()["error"]["code"] == "session_store_unavailable"
                assert "Redis" in r.json()["error"]["message"]
            stateless = await client.post("/v1/chat/completions", json=msg, headers=bearer("acme"))
            assert stateless.status_code == 200

            persistent_redis.start()
            r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "after"}]},
                                  headers=h)  # fmt: skip
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "seen 3: after"
            stored = (await client.get(f"/v1/sessions/{sid}", headers=bearer("acme"))).json()
            assert [m["content"] for m in stored["messages"]] == ["before", "seen 1: before", "after", "seen 3: after"]
    finally:
        await flow.aclose()


async def test_sessions_disabled_and_auth_off(redis_server: RedisServer) -> None:  # noqa: F811
    transport = httpx.ASGITransport(app=chat_app(SessionFlow(None), make_auth(enabled=False)))
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        r = await client.post("/v1/sessions")
        assert r.status_code == 400 and r.json()["error"]["code"] == "sessions_disabled"
        r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 200  # auth off: default tenant, stateless path
    flow = make_flow(redis_server.url)
    transport = httpx.ASGITransport(app=chat_app(flow, make_auth(enabled=False)))
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        r = await client.post("/v1/sessions")
        assert r.status_code == 201  # no Authorization header needed with auth off
        assert (await client.get(f"/v1/sessions/{r.json()['id']}")).status_code == 200
    await flow.aclose()
