"""End to end on the local cluster: a conversation's follow-up turn lands on the replica
that holds its prefix (the gateway's `X-Served-By` header names the engine replica the
request router chose), with real HTTP, the real gateway, request router and vLLM engines.

No session header: the follow-up is placed by the router's prefix index alone (prompt
blocks indexed at routing, the reply's blocks when the gateway reports the request
finished), not by session affinity.
"""

from __future__ import annotations

import random
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.e2e

_WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november".split()


def _headers(cluster: Any) -> dict[str, str]:
    key = getattr(cluster, "api_key", None)
    return {"Authorization": f"Bearer {key}"} if key else {}


def _chat(http: httpx.Client, model: str, messages: list[dict[str, str]]) -> httpx.Response:
    body = {"model": model, "messages": messages, "max_tokens": 16, "temperature": 0}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r


def test_follow_up_turn_lands_on_the_replica_holding_its_prefix(local_cluster: Any) -> None:
    model = str(local_cluster.cfg.model.served_name)
    rng = random.Random(7)
    http = httpx.Client(base_url=local_cluster.base_url, headers=_headers(local_cluster), timeout=300)
    first_replicas = set()
    for conv in range(4):
        # ~400 tokens of conversation-specific text: dozens of 16-token blocks to match.
        opening = f"Conversation {conv}. " + " ".join(rng.choice(_WORDS) for _ in range(300))
        messages = [{"role": "user", "content": opening}]
        r1 = _chat(http, model, messages)
        first = r1.headers.get("x-served-by")
        assert first, f"no X-Served-By header: {dict(r1.headers)}"
        assert r1.headers.get("x-pool") == "standard"
        first_replicas.add(first)
        reply = r1.json()["choices"][0]["message"].get("content") or ""
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]
        for _ in range(2):
            r = _chat(http, model, messages)
            assert r.headers.get("x-served-by") == first, (conv, first, r.headers.get("x-served-by"))
            messages += [
                {"role": "assistant", "content": r.json()["choices"][0]["message"].get("content") or ""},
                {"role": "user", "content": "Go on."},
            ]
    # Not a routing requirement, but shows the pool really has more than one replica to choose from.
    print(f"first turns were served by {sorted(first_replicas)}")
