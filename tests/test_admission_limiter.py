"""TenantLimiter against a real redis-server: limits shared by several gateways, tokens
reserved then corrected, concurrency slots, usage per day, and the documented behaviour
while Redis is unreachable (each gateway enforces 1/N of every limit alone)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from cluster.admission.headers import duration, rate_limit_headers
from cluster.admission.limiter import LocalBudget, TenantLimiter
from cluster.config import SessionConfig, TenantLimits
from cluster.sessions.connection import build_redis
from tests.redis_server import RedisServer, free_port, redis_server  # noqa: F401  (fixture)


def limiter_on(url: str, gateways: int = 1, timeout_s: float = 2.0, **kw: float) -> TenantLimiter:
    """Generous timeouts (a loaded test machine) except where an outage is the point."""
    conn = SessionConfig(
        redis_url=url, redis_url_env=None, retries=0, socket_timeout_s=timeout_s, connect_timeout_s=timeout_s
    )
    return TenantLimiter(build_redis(conn), gateways=lambda: gateways, timeout_s=timeout_s, **kw)  # type: ignore[arg-type]


@pytest.fixture
async def two_gateways(redis_server: RedisServer) -> AsyncIterator[tuple[TenantLimiter, TenantLimiter]]:  # noqa: F811
    a, b = limiter_on(redis_server.url, 2), limiter_on(redis_server.url, 2)
    yield a, b
    await a.aclose()
    await b.aclose()


async def test_a_burst_across_two_gateways_gets_exactly_the_requests_per_minute(two_gateways) -> None:  # type: ignore[no-untyped-def]
    a, b = two_gateways
    limits = TenantLimits(requests_per_minute=10)
    burst = [(a if i % 2 else b).admit("burst-rpm", limits, 1) for i in range(30)]
    decisions = [d for d, _ in await asyncio.gather(*burst)]
    assert sum(d.allowed for d in decisions) == 10
    assert all(d.source == "redis" for d in decisions)
    refused = [d for d in decisions if not d.allowed]
    assert {d.reason for d in refused} == {"requests"} and all(d.requests_left == 0 for d in refused)
    # One request's worth refills in 60/10 s: that is the wait a refusal announces.
    assert all(0 < d.retry_after_s <= 6.0 for d in refused)


async def test_tokens_are_reserved_then_corrected_with_real_usage(two_gateways) -> None:  # type: ignore[no-untyped-def]
    a, b = two_gateways
    limits = TenantLimits(tokens_per_minute=1000)
    first, ticket = await a.admit("tpm", limits, 600)
    assert first.allowed and first.tokens_left == 400 and ticket is not None
    second, _ = await b.admit("tpm", limits, 600)
    assert not second.allowed and second.reason == "tokens"
    await a.release(ticket, used=100, prompt=60, completion=40)  # 500 of the 600 were not used
    third, _ = await b.admit("tpm", limits, 600)
    assert third.allowed and 300 <= (third.tokens_left or 0) <= 310  # 900 - 600, plus a little refill
    too_large, _ = await a.admit("tpm", limits, 1001)
    assert not too_large.allowed and too_large.reason == "too_large"
    usage = await a.usage("tpm")
    assert usage == {"requests": 1, "prompt_tokens": 60, "completion_tokens": 40, "cached_tokens": 0}


async def test_concurrency_slots_are_shared_and_freed(two_gateways) -> None:  # type: ignore[no-untyped-def]
    a, b = two_gateways
    limits = TenantLimits(max_concurrent=2)
    d1, t1 = await a.admit("conc", limits, 1)
    d2, _ = await b.admit("conc", limits, 1)
    d3, _ = await a.admit("conc", limits, 1)
    assert (d1.allowed, d2.allowed, d3.allowed) == (True, True, False) and d3.reason == "concurrency"
    assert t1 is not None
    await a.release(t1, used=1, prompt=1, completion=0)
    d4, _ = await b.admit("conc", limits, 1)
    assert d4.allowed


async def test_unlimited_tenant_never_touches_redis() -> None:
    dead = limiter_on(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.3)
    d, ticket = await dead.admit("free", TenantLimits(), 10_000)
    assert d.allowed and d.source == "none" and ticket is not None and not dead.degraded
    assert rate_limit_headers(d) == {}


async def test_redis_down_each_gateway_enforces_its_share_then_redis_again() -> None:
    server = RedisServer().start()
    try:
        a, b = limiter_on(server.url, 2, 0.3, fallback_s=0.5), limiter_on(server.url, 2, 0.3, fallback_s=0.5)
        limits = TenantLimits(requests_per_minute=10, max_concurrent=4)
        server.stop(kill=True)
        started = asyncio.get_running_loop().time()
        got = {"a": 0, "b": 0}
        for i in range(20):
            gw = "a" if i % 2 else "b"
            d, _ = await (a if gw == "a" else b).admit("outage", limits, 1)
            assert d.source == "local"
            got[gw] += d.allowed
        # 1/2 of 10 rpm each; concurrency 4/2 = 2 each caps first.
        assert got == {"a": 2, "b": 2}
        # Only the first decision waited for the dead Redis (one timeout), the rest were local.
        assert asyncio.get_running_loop().time() - started < 2.0
        assert a.degraded and b.degraded
        server.start()
        for _ in range(5):  # the fallback window ends: Redis decides again
            await asyncio.sleep(0.6)
            d, _ = await a.admit("outage", limits, 1)
            if d.source == "redis":
                break
        assert d.source == "redis" and d.allowed and not a.degraded
        await a.aclose()
        await b.aclose()
    finally:
        server.cleanup()


def test_local_budget_is_one_nth_of_each_limit() -> None:
    now = [0.0]
    local = LocalBudget(clock=lambda: now[0])
    limits = TenantLimits(requests_per_minute=60, tokens_per_minute=3000)
    admitted = sum(local.admit("t", limits, 10, share=3).allowed for _ in range(100))
    assert admitted == 20  # 60 / 3
    now[0] = 3.0  # 3 s refill 1/3 request per second each: one more
    assert local.admit("t", limits, 10, share=3).allowed
    assert not local.admit("t", limits, 10, share=3).allowed


def test_openai_duration_format() -> None:
    assert [duration(x) for x in (0.02, 1, 59.5, 360, 61.25)] == ["20ms", "1s", "59.5s", "6m0s", "1m1.25s"]


# -- the typed config and the Helm values ---------------------------------------------------


def test_limits_are_typed_and_reach_the_helm_values() -> None:
    import yaml
    from pydantic import ValidationError

    from cluster.config import AdmissionConfig
    from cluster.ops.helm_values import render_helm_values
    from cluster.profiles import load_profile

    with pytest.raises(ValidationError, match="max_tokens_default 64 > max_tokens_cap 32"):
        TenantLimits(max_tokens_cap=32, max_tokens_default=64)
    with pytest.raises(ValidationError, match="default priority"):
        TenantLimits(priority="batch", allowed_priorities=["interactive"])
    with pytest.raises(ValidationError, match="must match"):
        AdmissionConfig(tenants={"bad:name": TenantLimits()})
    cfg = load_profile("h100x8-bf16")
    cfg.admission.tenants = {"acme": TenantLimits(requests_per_minute=600, weight=2.0)}
    assert cfg.admission.limits("acme").requests_per_minute == 600
    assert cfg.admission.limits("other") == cfg.admission.default_limits
    serve = yaml.safe_load(render_helm_values(cfg)["serveConfigV2"])
    gateway_args = [
        d for app in serve["applications"] for d in [app["args"]] if "cluster_config" in d
    ]  # the ingress's typed config, as the chart ships it
    admission = gateway_args[0]["cluster_config"]["admission"]
    assert admission["tenants"]["acme"]["requests_per_minute"] == 600 and admission["tenants"]["acme"]["weight"] == 2.0


async def test_cli_reads_a_tenants_usage_of_the_day(
    redis_server: RedisServer,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    import json

    limiter = limiter_on(redis_server.url)
    limits = TenantLimits(requests_per_minute=100)
    _, ticket = await limiter.admit("cli-tenant", limits, 10)
    assert ticket is not None
    await limiter.release(ticket, used=7, prompt=5, completion=2, cached=3)
    await limiter.aclose()
    from cluster.ops.cli import build_parser, cmd_usage

    args = build_parser().parse_args(
        [
            "usage",
            "--profile",
            "cpu-tiny",
            "--tenant",
            "cli-tenant",
            "--tenant",
            "nobody",
            "--redis-url",
            redis_server.url,
        ]
    )
    await asyncio.to_thread(cmd_usage, args)
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows[0]["tenant"] == "cli-tenant" and rows[0]["prompt_tokens"] == 5 and rows[0]["cached_tokens"] == 3
    assert rows[1] == {"tenant": "nobody", "day": rows[0]["day"]}
