"""The gateway's pipeline and each of its steps, alone, with fakes for the engines (and a
real redis-server for the session step). End to end: tests/test_e2e_*.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from cluster import errors
from cluster.config import ClusterConfig, SessionConfig
from cluster.gateway.context import EngineChunk, RequestContext
from cluster.gateway.engine import EngineError, EngineUnavailable
from cluster.gateway.pipeline import Pipeline, Step
from cluster.gateway.steps.session import Session
from cluster.profiles import load_profile
from cluster.routing.block_hash import chain_block_hashes
from cluster.routing.hints import HintBoard, RoutingHint
from cluster.sessions import SessionFlow, SessionStore, TruncationPolicy
from cluster.sessions.connection import build_redis
from cluster.upstream import vllm as upstream_vllm
from tests.gateway_fakes import FakeEngine, fake_gateway, fake_gateway_app, shared_tokenizer
from tests.redis_server import RedisServer, redis_server  # noqa: F401  (fixture)

ChatRequest, CompletionRequest = upstream_vllm.request_models()
TENANT = "acme"


def cfg() -> ClusterConfig:
    return load_profile("cpu-tiny")


def chat_body(content: str = "hi", **extra: Any) -> Any:
    return ChatRequest.model_validate({"messages": [{"role": "user", "content": content}], **extra})


def chunk(delta: dict[str, object], finish: str | None = None) -> dict[str, Any]:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


STREAM = [
    chunk({"role": "assistant", "content": ""}),
    chunk({"content": "Hel"}),
    chunk({"content": "lo"}),
    chunk({"tool_calls": [{"index": 0, "id": "abcdefghi", "type": "function", "function": {"name": "f"}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": " 1}"}}]}, finish="tool_calls"),
]


class Scripted(Step):
    """Stands in for dispatch: replays chunks, then optionally fails; records closing."""

    name = "scripted"

    def __init__(self, chunks: list[dict[str, Any]], *, fail: Exception | None = None, replica: str = "rX") -> None:
        self.chunks, self.fail, self.replica, self.closed = chunks, fail, replica, False

    async def on_request(self, ctx: RequestContext) -> None:
        ctx.hint = RoutingHint(prompt_token_ids=[], pool="standard", chosen_replica=self.replica)
        ctx.upstream = self._stream()

    async def _stream(self) -> AsyncIterator[EngineChunk]:
        try:
            for c in self.chunks:
                yield EngineChunk(c)
            if self.fail is not None:
                raise self.fail
        finally:
            self.closed = True


class Recorder(Step):
    name = "recorder"

    def __init__(self, log: list[str], tag: str) -> None:
        self.log, self.tag = log, tag

    async def on_request(self, ctx: RequestContext) -> None:
        self.log.append(f"{self.tag}.request")

    def on_finish(self, ctx: RequestContext) -> None:
        self.log.append(f"{self.tag}.finish:{ctx.outcome}")


class Refuse(Step):
    name = "refuse"

    async def on_request(self, ctx: RequestContext) -> None:
        raise errors.bad_request("no")


def events(text: str) -> list[Any]:
    out: list[Any] = []
    for e in text.split("\n\n"):
        if e.startswith("data: "):
            payload = e[len("data: ") :]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


async def body_of(response: Any) -> str:
    return "".join([piece async for piece in response.body_iterator])


# -- the pipeline ---------------------------------------------------------------------------


async def test_refusal_finishes_only_started_steps_in_reverse_order() -> None:
    log: list[str] = []
    pipeline = Pipeline([Recorder(log, "a"), Refuse(), Recorder(log, "c")])
    with pytest.raises(errors.APIError) as exc:
        await pipeline.run(RequestContext(kind="chat", body=chat_body(), headers={}))
    assert exc.value.status == 400
    assert log == ["a.request", "a.finish:error"]


async def test_stream_is_encoded_with_one_done_and_finishes_once() -> None:
    log: list[str] = []
    pipeline = Pipeline([Recorder(log, "a"), Scripted(STREAM)])
    response = await pipeline.run(RequestContext(kind="chat", body=chat_body(stream=True), headers={}))
    got = events(await body_of(response))
    assert got[:-1] == STREAM and got[-1] == "[DONE]"
    assert log == ["a.request", "a.finish:ok"]


async def test_engine_failure_mid_stream_ends_with_an_error_event_then_done() -> None:
    scripted = Scripted(STREAM[:2], fail=EngineUnavailable("replica died"))
    ctx = RequestContext(kind="chat", body=chat_body(stream=True), headers={})
    got = events(await body_of(await Pipeline([scripted]).run(ctx)))
    assert got[:2] == STREAM[:2] and got[-1] == "[DONE]"
    assert got[-2]["error"]["code"] == "engine_unavailable" and ctx.outcome == "error"
    assert scripted.closed


async def test_client_leaving_closes_the_engine_stream() -> None:
    log: list[str] = []
    scripted = Scripted(STREAM)
    ctx = RequestContext(kind="chat", body=chat_body(stream=True), headers={})
    response = await Pipeline([Recorder(log, "a"), scripted]).run(ctx)
    gen = response.body_iterator
    assert [await gen.__anext__() for _ in range(3)]  # the client reads three events, then goes away
    await gen.aclose()
    await asyncio.sleep(0)  # the engine stream is closed in a task of its own
    assert scripted.closed and ctx.outcome == "cancelled" and log[-1] == "a.finish:cancelled"


# -- the session step with a real Redis -------------------------------------------------------


@pytest.fixture
async def flow(redis_server: RedisServer) -> AsyncIterator[SessionFlow]:  # noqa: F811
    c = SessionConfig(redis_url=redis_server.url, redis_url_env=None, retries=1)
    f = SessionFlow(SessionStore(build_redis(c), ttl_s=600, policy=TruncationPolicy(50, 100_000), retry_after_s=3))
    yield f
    await f.aclose()


async def run_turn(flow: SessionFlow, sid: str, chunks: list[dict[str, Any]], **kw: Any) -> tuple[Any, RequestContext]:
    ctx = RequestContext(kind="chat", body=chat_body("hi", stream=True), headers={"X-Session-ID": sid}, tenant=TENANT)
    response = await Pipeline([Session(flow), Scripted(chunks, **kw)]).run(ctx)
    return events(await body_of(response)), ctx


async def test_streamed_turn_is_stored_whole_with_its_replica(flow: SessionFlow) -> None:
    sid = (await flow.create(TENANT)).session_id
    got, _ = await run_turn(flow, sid, STREAM)
    assert got[-1] == "[DONE]" and len(got) == len(STREAM) + 1
    after = await flow.read(TENANT, sid)
    call = {"id": "abcdefghi", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    assert after.history() == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello", "tool_calls": [call]},
    ]
    assert after.last_replica == "rX"


async def test_cut_or_errored_stream_stores_nothing(flow: SessionFlow) -> None:
    sid = (await flow.create(TENANT)).session_id
    await run_turn(flow, sid, STREAM[:2], fail=EngineUnavailable("died"))  # no finish reason
    await run_turn(flow, sid, [*STREAM[:2], {"error": {"message": "engine failed"}}])  # in-band error
    after = await flow.read(TENANT, sid)
    assert after.version == 0 and after.turns == []


async def test_commit_conflict_is_reported_in_band(flow: SessionFlow) -> None:
    sid = (await flow.create(TENANT)).session_id
    loser = await flow.prepare(TENANT, sid, [{"role": "user", "content": "one"}])
    winner = await flow.prepare(TENANT, sid, [{"role": "user", "content": "two"}])
    await flow.commit(winner, {"role": "assistant", "content": "won"})

    class Prepared(Session):
        async def on_request(self, ctx: RequestContext) -> None:
            ctx.session_id, ctx.session = sid, loser

    ctx = RequestContext(kind="chat", body=chat_body(stream=True), headers={}, tenant=TENANT)
    got = events(await body_of(await Pipeline([Prepared(flow), Scripted(STREAM)]).run(ctx)))
    assert got[-1] == "[DONE]" and got[-2]["error"]["code"] == "session_conflict"
    assert len((await flow.read(TENANT, sid)).history()) == 2  # only the winner's turn


# -- the steps through the real gateway app ---------------------------------------------------


@pytest.fixture
async def gw() -> AsyncIterator[tuple[httpx.AsyncClient, FakeEngine, Any]]:
    engine = FakeEngine(board=HintBoard())
    gateway = fake_gateway(cfg(), engine)
    from cluster.gateway.app import build_gateway_app

    app = build_gateway_app(gateway)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        yield client, engine, gateway


async def test_steps_in_request_order(gw: Any) -> None:
    _, _, gateway = gw
    order = [
        "trace",
        "measure",
        "authenticate",
        "validate",
        "session",
        "tokenize",
        "admit",
        "choose_pool",
        "fair_share",
        "isolate",
        "route",
        "trace_engine_call",
        "dispatch",
        "finish",
    ]
    assert gateway.chat.step_names == order and gateway.completions.step_names == order


async def test_chat_whole_and_streamed_headers_and_body(gw: Any) -> None:
    client, engine, gateway = gw
    msg = {"model": "mistral-large-2411", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    r = await client.post("/v1/chat/completions", json=msg)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "seen 1: hello"
    expected = len(shared_tokenizer().chat_prompt_ids(chat_body("hello")))
    assert r.headers["x-pool"] == "standard" and int(r.headers["x-prompt-tokens"]) == expected
    assert r.headers["x-served-by"] == "replica-1" and r.headers["x-request-id"]
    s = await client.post("/v1/chat/completions", json={**msg, "stream": True})
    got = events(s.text)
    assert got[-1] == "[DONE]" and "".join(c["choices"][0]["delta"].get("content", "") for c in got[:-1]) == (
        "seen 1: hello"
    )
    assert gateway.pools.in_flight == {"standard": 0, "long": 0}  # every request closed its count
    _, kind, body = engine.calls[-1]
    assert kind == "chat" and body.model == "mistral-large-2411" and body.request_id == s.headers["x-request-id"]


async def test_finish_reports_the_held_conversation_to_the_pools_router(gw: Any) -> None:
    client, engine, gateway = gw
    heard: list[tuple[str, list[int], int]] = []
    engine.board.subscribe("standard", lambda hint, hashes, n: heard.append((hint.chosen_replica, list(hashes), n)))
    other: list[Any] = []
    engine.board.subscribe("long", lambda *a: other.append(a))
    r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "remember me"}]})
    assert r.status_code == 200
    for _ in range(100):  # reported from a background task, off the event loop
        if heard:
            break
        await asyncio.sleep(0.02)
    tok = shared_tokenizer()
    prompt = tok.chat_prompt_ids(chat_body("remember me"))
    held = tok.chat_held_ids(chat_body("remember me"), prompt, "seen 1: remember me")
    block = cfg().pools[0].engine.block_size
    assert heard == [("replica-1", chain_block_hashes(held, block), len(held))]
    assert other == [] and len(engine.board) == 0


async def test_refusals_have_openai_bodies(gw: Any) -> None:
    client, engine, gateway = gw
    cases = [
        ({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}, 404, "model_not_found"),
        ({"messages": []}, 400, None),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10_000}, 400, "context_length_exceeded"),
        ({"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": True}}, 400, None),
    ]
    for body, status, code in cases:
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == status, (body, r.text)
        assert r.json()["error"]["message"] and (code is None or r.json()["error"]["code"] == code)
    r = await client.post("/v1/completions", json={"prompt": "x"}, headers={"X-Session-ID": "sess_abcdefgh"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "session_id"
    assert engine.calls == [] and gateway.pools.in_flight == {"standard": 0, "long": 0}


async def test_engine_errors_before_the_first_chunk_are_never_500(gw: Any) -> None:
    client, engine, _ = gw
    msg = {"messages": [{"role": "user", "content": "x"}]}
    engine.fail = lambda: EngineError(400, "bad sampling parameter")
    r = await client.post("/v1/chat/completions", json=msg)
    assert r.status_code == 400 and "sampling" in r.json()["error"]["message"]
    engine.fail = lambda: EngineUnavailable("actor died")
    r = await client.post("/v1/chat/completions", json={**msg, "stream": True})
    assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["code"] == "engine_unavailable"


async def test_long_prompt_goes_to_the_long_pool_and_completions_route_by_the_longest(gw: Any) -> None:
    client, engine, _ = gw
    standard = cfg().pools[0].max_model_len
    long_text = "word " * standard
    r = await client.post("/v1/completions", json={"prompt": ["short", long_text], "max_tokens": 2})
    assert r.status_code == 200 and r.headers["x-pool"] == "long"
    assert engine.calls[-1][1] == "completions"


async def test_spill_when_the_smallest_pool_is_saturated() -> None:
    engine = FakeEngine(board=HintBoard())
    gateway = fake_gateway(cfg(), engine)
    pools = gateway.pools
    per_pool = cfg().pools[0].engine.max_num_seqs * cfg().pools[0].start_replicas
    pools.in_flight["standard"] = per_pool  # every standard engine's batch is full
    ctx = RequestContext(kind="chat", body=chat_body(), headers={})
    ctx.select_tokens = 10
    await pools.on_request(ctx)
    assert (ctx.pool, ctx.spilled_from) == ("long", "standard") and pools.in_flight["long"] == 1
    pools.on_finish(ctx)
    assert pools.in_flight["long"] == 0


def test_fake_gateway_app_serves_models() -> None:
    app = fake_gateway_app(cfg(), FakeEngine(board=HintBoard()))
    assert app.title == "mistral-large-serve"


def _memory_exporter() -> Any:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):  # the process-wide provider is set once
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


async def test_one_span_per_request_child_of_the_clients_traceparent(gw: Any) -> None:
    client, _, _ = gw
    exporter = _memory_exporter()
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    headers = {"traceparent": f"00-{trace_id}-{parent_id}-01"}
    body = {"messages": [{"role": "user", "content": "traced"}], "stream": True}
    r = await client.post("/v1/chat/completions", json=body, headers=headers)
    assert r.status_code == 200 and r.text.rstrip().endswith("[DONE]")
    spans = [s for s in exporter.get_finished_spans() if s.name == "gateway.chat"]
    assert len(spans) == 1
    span = spans[0]
    assert f"{span.context.trace_id:032x}" == trace_id and f"{span.parent.span_id:016x}" == parent_id
    attrs = dict(span.attributes or {})
    assert attrs["pool"] == "standard" and attrs["replica"] == "replica-1" and attrs["outcome"] == "ok"
    assert attrs["attempts"] == 1 and attrs["prompt_tokens"] > 0 and attrs["request.id"] == r.headers["x-request-id"]
