"""End to end on the local cluster: a conversation's follow-up turn lands on the replica
that holds its prefix (the gateway's `X-Served-By` header names the engine replica the
request router chose), with real HTTP, the real gateway, request router and vLLM engines.

No session header: the follow-up is placed by the router's prefix index alone (prompt
blocks indexed at routing, the reply's blocks when the gateway reports the request
finished), not by session affinity.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
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
    # ~400 tokens of conversation-specific text per opening: dozens of blocks to match.
    openings = [f"Conversation {c}. " + " ".join(rng.choice(_WORDS) for _ in range(300)) for c in range(4)]
    # The first turns arrive together, so the router must spread them (cold prompts, and
    # the prefill backlog it has just sent to one replica).
    with ThreadPoolExecutor(len(openings)) as pool:
        firsts = list(pool.map(lambda text: _chat(http, model, [{"role": "user", "content": text}]), openings))
    served = [r.headers.get("x-served-by") for r in firsts]
    assert all(served), [dict(r.headers) for r in firsts]
    assert all(r.headers.get("x-pool") == "standard" for r in firsts)
    assert len(set(served)) == 2, served  # both standard replicas took first turns
    for opening, r1, first in zip(openings, firsts, served, strict=True):
        reply = r1.json()["choices"][0]["message"].get("content") or ""
        messages = [
            {"role": "user", "content": opening},
            {"role": "assistant", "content": reply},
            {"role": "user", "content": "And then?"},
        ]
        for _ in range(2):
            r = _chat(http, model, messages)
            assert r.headers.get("x-served-by") == first, (opening[:16], first, r.headers.get("x-served-by"))
            messages += [
                {"role": "assistant", "content": r.json()["choices"][0]["message"].get("content") or ""},
                {"role": "user", "content": "Go on."},
            ]
