"""Retry before the first token and stream migration, through the real gateway app with
fake engine replicas that fail on cue (tests/gateway_fakes.TokenEngine). The same on the
real cluster, with real processes killed: tests/test_e2e_faults.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from cluster.config import ClusterConfig
from cluster.gateway import build_gateway
from cluster.gateway.app import build_gateway_app
from cluster.profiles import load_profile
from cluster.routing.hints import HintBoard
from cluster.routing.replica_health import ReplicaHealth
from cluster.upstream import vllm as upstream_vllm
from tests.gateway_fakes import TokenEngine, next_token, shared_tokenizer


def make(cfg: ClusterConfig | None = None, replicas: tuple[str, ...] = ("a", "b")) -> tuple[Any, TokenEngine, Any]:
    cfg = cfg or load_profile("cpu-tiny")
    board, health = HintBoard(), ReplicaHealth()
    engine = TokenEngine(list(replicas), board, health)
    gateway = build_gateway(
        cfg,
        engine,
        request_models=upstream_vllm.request_models(),
        tokenizer=shared_tokenizer(),
        board=board,
        health=health,
    )
    gateway.fleet.update({p.name: p.start_replicas for p in cfg.pools}, 1)
    return build_gateway_app(gateway), engine, gateway


@pytest.fixture
async def setup() -> AsyncIterator[tuple[httpx.AsyncClient, TokenEngine, Any]]:
    app, engine, gateway = make()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        yield client, engine, gateway


def expected_tokens(prompt: list[int], n: int) -> list[int]:
    out: list[int] = []
    for _ in range(n):
        out.append(next_token(prompt + out))
    return out


def chat_prompt(content: str) -> list[int]:
    chat, _ = upstream_vllm.request_models()
    return shared_tokenizer().chat_prompt_ids(chat.model_validate({"messages": [{"role": "user", "content": content}]}))


def events(text: str) -> list[Any]:
    out = []
    for e in text.split("\n\n"):
        if e.startswith("data: "):
            payload = e[6:]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


STREAM_BODY = {
    "messages": [{"role": "user", "content": "go"}],
    "max_tokens": 12,
    "stream": True,
    "stream_options": {"include_usage": True},
}

WHOLE_BODY = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 12}


async def test_a_replica_dying_before_the_first_token_is_retried_elsewhere(setup: Any) -> None:
    client, engine, gateway = setup
    engine.faults["a"] = "before"
    r = await client.post("/v1/chat/completions", json=STREAM_BODY)
    assert r.status_code == 200 and r.headers["x-served-by"] == "b"
    got = events(r.text)
    assert got[-1] == "[DONE]" and not any("error" in e for e in got[:-1] if isinstance(e, dict))
    assert [c[3] for c in engine.calls] == ["a", "b"]
    assert engine.health.is_excluded("a")  # every router of this gateway skips it now
    assert gateway.metrics.retries.labels("standard")._value.get() == 1
    # The next request goes straight to b.
    r2 = await client.post("/v1/chat/completions", json=WHOLE_BODY)
    assert r2.status_code == 200 and [c[3] for c in engine.calls][-1] == "b"


async def test_attempts_spill_to_a_larger_pool_then_503(setup: Any) -> None:
    client, engine, gateway = setup
    engine.replicas = ["a", "b", "c"]
    engine.faults.update({"a": "before", "b": "before"})
    r = await client.post("/v1/chat/completions", json=WHOLE_BODY)
    assert r.status_code == 200, r.text
    pools = [c[0] for c in engine.calls]
    assert pools == ["standard", "standard", "long"] and r.headers["x-pool"] == "long"  # the last attempt spills
    assert gateway.pools.in_flight == {"standard": 0, "long": 0}
    engine.health._until.clear()
    engine.faults.update({"a": "before", "b": "before", "c": "before"})
    r = await client.post("/v1/chat/completions", json=STREAM_BODY)
    assert r.status_code == 503 and r.headers["retry-after"] == "2"
    assert r.json()["error"]["code"] == "engine_unavailable" and "3 attempt(s)" in r.json()["error"]["message"]


async def test_a_cut_stream_is_migrated_with_every_token_once(setup: Any) -> None:
    client, engine, gateway = setup
    engine.faults["a"] = 5  # dies after 5 tokens
    r = await client.post("/v1/chat/completions", json=STREAM_BODY)
    assert r.status_code == 200
    got = events(r.text)
    assert got[-1] == "[DONE]"
    chunks = [e for e in got[:-1] if e.get("choices")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    want = expected_tokens(chat_prompt("go"), 12)
    assert text == "".join(f"<{t}>" for t in want)  # no token twice, none missing
    assert [c["choices"][0].get("finish_reason") for c in chunks].count("length") == 1
    assert {c["id"] for c in chunks} == {"s-a"}  # one stream, as the client saw it begin
    assert all("token_ids" not in c["choices"][0] for c in chunks)  # not asked for: stripped
    usage = [e["usage"] for e in got[:-1] if e.get("usage")]
    prompt_tokens = len(chat_prompt("go"))
    assert usage == [{"prompt_tokens": prompt_tokens, "completion_tokens": 12, "total_tokens": prompt_tokens + 12}]
    (_, kind, body, replica) = engine.calls[-1]
    assert (kind, replica, body.max_tokens) == ("completions", "b", 7)
    assert body.prompt == chat_prompt("go") + want[:5]
    assert gateway.metrics.migrations.labels("standard")._value.get() == 1


async def test_migration_off_or_impossible_ends_with_an_error_event(setup: Any) -> None:
    client, engine, gateway = setup
    for body in ({**STREAM_BODY, "n": 2}, {**STREAM_BODY, "logprobs": True}):
        engine.faults["a"] = 3
        r = await client.post("/v1/chat/completions", json=body)
        got = events(r.text)
        assert r.status_code == 200 and got[-1] == "[DONE]"
        assert got[-2]["error"]["code"] == "engine_unavailable" and "not migrated" in got[-2]["error"]["message"]
        engine.health._until.clear()
    cfg = load_profile("cpu-tiny")
    cfg.resilience.max_migrations = 0
    app, engine2, _ = make(cfg)
    engine2.faults["a"] = 3
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c2:
        got = events((await c2.post("/v1/chat/completions", json=STREAM_BODY)).text)
    assert got[-1] == "[DONE]" and "error" in got[-2] and "max_migrations" in got[-2]["error"]["message"]
    assert not getattr(engine2.calls[0][2], "return_token_ids", False)  # no token ids asked for


async def test_completions_stream_migrates_too(setup: Any) -> None:
    client, engine, _ = setup
    engine.faults["a"] = 2
    prompt = list(range(1, 40))
    r = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 6, "stream": True})
    got = events(r.text)
    text = "".join(e["choices"][0]["text"] for e in got[:-1] if e.get("choices"))
    assert text == "".join(f"<{t}>" for t in expected_tokens(prompt, 6)) and got[-1] == "[DONE]"


async def router_sees_wedged_stats(engine: Any, replica: str, after_s: float = 0.8) -> None:
    """What the router does when the replica's stats say its engine stopped making progress."""
    await asyncio.sleep(after_s)
    engine.health.mark_failed(replica, 30)


async def test_a_request_waiting_on_a_replica_marked_wedged_fails_over(setup: Any) -> None:
    client, engine, _ = setup
    engine.faults["a"] = "hang"
    marker = asyncio.create_task(router_sees_wedged_stats(engine, "a"))
    r = await client.post("/v1/chat/completions", json=STREAM_BODY)
    await marker
    assert r.status_code == 200 and r.headers["x-served-by"] == "b" and r.headers["x-attempts"] == "2"
    assert events(r.text)[-1] == "[DONE]"


async def test_a_replica_marked_wedged_is_waited_for_when_no_other_is_usable(setup: Any) -> None:
    # A CI run: the victim of a SIGKILL dead, its replacement loading on the same cores,
    # the survivors' engines starved past the wedge threshold and marked: every stream on
    # them was given up (22 of 24 failed). With nowhere else to go, the request waits.
    client, engine, gateway = setup
    engine.health.mark_failed("b", 30)  # dead
    engine.faults["a"] = "slow-2"  # starved, then steps again
    marker = asyncio.create_task(router_sees_wedged_stats(engine, "a"))
    r = await client.post("/v1/chat/completions", json=STREAM_BODY)
    await marker
    assert r.status_code == 200 and r.headers["x-served-by"] == "a" and r.headers["x-attempts"] == "1"
    got = events(r.text)
    assert got[-1] == "[DONE]" and not any("error" in e for e in got[:-1])
    # Once another replica is usable again, a marked one is given up as before.
    engine.replicas.append("c")
    engine.health.set_pool("standard", engine.replicas)
    engine.health.set_pool("long", engine.replicas)
    engine.faults["a"] = "hang"
    engine.health._until.pop("a")
    marker = asyncio.create_task(router_sees_wedged_stats(engine, "a"))
    r = await client.post("/v1/chat/completions", json=STREAM_BODY)
    await marker
    assert r.status_code == 200 and r.headers["x-served-by"] == "c" and r.headers["x-attempts"] == "2"


async def test_the_last_attempt_waits_on_a_marked_replica_rather_than_fail(setup: Any) -> None:
    client, engine, _ = setup
    engine.replicas[:] = ["a", "b", "c", "d"]
    engine.health.set_pool("standard", engine.replicas)
    engine.health.set_pool("long", engine.replicas)
    engine.faults.update({"a": "before", "b": "before", "c": "slow-2"})
    marker = asyncio.create_task(router_sees_wedged_stats(engine, "c"))
    r = await client.post("/v1/chat/completions", json=STREAM_BODY)
    await marker
    # d is usable, but no attempt is left to go there: giving up on c would be a 503.
    assert r.status_code == 200 and r.headers["x-served-by"] == "c" and r.headers["x-attempts"] == "3"
    assert events(r.text)[-1] == "[DONE]"


async def test_a_stream_whose_replica_is_marked_wedged_mid_reply_is_migrated(setup: Any) -> None:
    # The read pending on the wedged stream is cancelled, and must have unwound before the
    # stream is closed (closing an async generator mid-read raised RuntimeError, and the
    # client saw its connection dropped: `cluster bench chaos`, stop@T).
    client, engine, gateway = setup
    engine.faults["a"] = "hang-after-4"
    marker = asyncio.create_task(router_sees_wedged_stats(engine, "a"))
    r = await client.post("/v1/chat/completions", json=STREAM_BODY)
    await marker
    got = events(r.text)
    assert r.status_code == 200 and got[-1] == "[DONE]" and not any("error" in e for e in got[:-1])
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in got[:-1] if c.get("choices"))
    assert text == "".join(f"<{t}>" for t in expected_tokens(chat_prompt("go"), 12))
    assert gateway.metrics.migrations.labels("standard")._value.get() == 1


async def test_a_call_cancelled_on_the_replica_is_migrated_not_cut(setup: Any) -> None:
    client, engine, _ = setup
    engine.faults["a"] = "cancelled"
    r = await client.post("/v1/chat/completions", json=STREAM_BODY)
    got = events(r.text)
    assert r.status_code == 200 and got[-1] == "[DONE]" and not any("error" in e for e in got[:-1])
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in got[:-1] if c.get("choices"))
    assert text == "".join(f"<{t}>" for t in expected_tokens(chat_prompt("go"), 12))
