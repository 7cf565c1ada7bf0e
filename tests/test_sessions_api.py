"""The /v1/sessions endpoints and the gateway contract of SessionFlow, over HTTP (httpx's
ASGI transport) against a real redis-server.

`chat_app` mounts the session router next to a stand-in chat endpoint that calls the
flow exactly as the gateway must (see cluster/sessions/flow.py); its "engine" echoes how
many messages it received, which makes the prepended history visible. The real engine
path is covered by tests/test_e2e_sessions.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from cluster.auth import TenantAuthenticator, hash_api_key
from cluster.config import AuthConfig, SessionConfig
from cluster.sessions import ApiError, SessionFlow, SessionStore, TruncationPolicy, session_id_from_request
from cluster.sessions.api import build_session_router, error_response
from cluster.sessions.connection import build_redis
from cluster.sessions.keys import new_session_id
from tests.redis_server import RedisServer, persistent_redis, redis_server  # noqa: F401  (fixtures)

KEYS = {"acme": "key-acme-123", "globex": "key-globex-456"}


def bearer(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def fake_engine(messages: list[dict[str, Any]]) -> dict[str, Any]:
    return {"role": "assistant", "content": f"seen {len(messages)}: {messages[-1].get('content')}"}


async def fake_sse(reply: dict[str, Any]) -> AsyncIterator[str]:
    for piece in (reply["content"][:4], reply["content"][4:]):
        chunk = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": piece}}]}
        yield f"data: {json.dumps(chunk)}\n\n"
    last = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    yield f"data: {json.dumps(last)}\n\n"
    yield "data: [DONE]\n\n"


def chat_app(flow: SessionFlow, auth: TenantAuthenticator) -> FastAPI:
    app = FastAPI()
    app.include_router(build_session_router(flow, lambda: auth))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        try:
            tenant = auth.authenticate(request.headers.get("authorization"))
            body = await request.json()
            sid = session_id_from_request(request.headers, body)
            if sid is None:  # stateless: the session store is never touched
                return JSONResponse({"choices": [{"index": 0, "message": fake_engine(body["messages"])}]})
            prepared = await flow.prepare(tenant, sid, body["messages"])
            reply = fake_engine(prepared.messages)
            if body.get("stream"):
                return StreamingResponse(
                    flow.stream_and_commit(prepared, fake_sse(reply), replica_id="replica-1"),
                    media_type="text/event-stream",
                )
            await flow.commit(prepared, reply, replica_id="replica-1")
            return JSONResponse({"choices": [{"index": 0, "message": reply}]})
        except ApiError as exc:
            return error_response(exc)

    return app


def make_flow(url: str) -> SessionFlow:
    cfg = SessionConfig(redis_url=url, redis_url_env=None, retries=1, connect_timeout_s=0.5, socket_timeout_s=1.0)
    store = SessionStore(build_redis(cfg), ttl_s=600, policy=TruncationPolicy(50, 100_000), retry_after_s=7)
    return SessionFlow(store)


def make_auth(enabled: bool = True) -> TenantAuthenticator:
    cfg = AuthConfig(enabled=enabled, tenants={t: [hash_api_key(k)] for t, k in KEYS.items()}, api_keys_env=None)
    return TenantAuthenticator.from_config(cfg, environ={})


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
