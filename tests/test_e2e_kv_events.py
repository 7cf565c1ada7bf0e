"""End to end: with `router.kv_events` on, the router's prefix index follows the engines'
own KV cache events, so what it predicts cached for a request is what vLLM then reports
cached (`usage.prompt_tokens_details.cached_tokens`), also under eviction pressure.

A cluster of its own (`standard_pool_cluster`, tests/conftest.py, shared with the drain
module, which runs after this one): the standard pool's two engines publish KV events
(each replica on its own ports, reported through its routing stats) and hold only a few
hundred KV blocks each (`num_gpu_blocks_override`), so the conversations evict each
other's blocks. Each request's prediction comes back in `X-Predicted-Cached-Tokens`.
"""

from __future__ import annotations

import asyncio
import random
import sys
from typing import Any

import httpx
import pytest

from bench.live.router_cluster import Agreement, stream_turn
from tests.conftest import STANDARD_POOL_KV_BLOCKS

pytestmark = [pytest.mark.e2e, pytest.mark.own_cluster]

KV_BLOCKS = STANDARD_POOL_KV_BLOCKS  # per engine: 3,072 tokens, a few conversations' worth
_WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()


@pytest.fixture
def events_cluster(standard_pool_cluster: Any) -> Any:
    """The standard-pool cluster (tests/conftest.py; shared with the drain module, which
    runs after this one): KV events on, KV_BLOCKS blocks per engine, both replicas fresh."""
    cfg = standard_pool_cluster.cfg
    assert cfg.router.kv_events.enabled
    assert [p.name for p in cfg.pools] == ["standard"]
    assert cfg.pools[0].engine.extra["num_gpu_blocks_override"] == KV_BLOCKS
    return standard_pool_cluster


def _body(model: str, messages: list[dict[str, str]]) -> dict[str, Any]:
    return {
        "model": model,
        "messages": list(messages),
        "max_tokens": 16,
        "temperature": 0,
        "ignore_eos": True,  # random weights may stop at once; an empty reply cannot be sent back
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def _conversations(base_url: str, model: str, n: int, turns: int) -> tuple[list[tuple[int, int]], int]:
    """(predicted, engine) cached tokens per request; then the first turns of the first
    conversations again: how many of them the engines had evicted by then."""
    rng = random.Random(11)
    pairs: list[tuple[int, int]] = []
    first_turns: list[list[dict[str, str]]] = []

    async def send(client: httpx.AsyncClient, messages: list[dict[str, str]]) -> Any:
        turn = await stream_turn(client, _body(model, messages))
        assert turn.error is None, turn.error
        assert turn.predicted is not None and turn.cached is not None
        pairs.append((turn.predicted, turn.cached))
        return turn

    async def one(client: httpx.AsyncClient, k: int) -> None:
        system = f"Conversation {k}. " + " ".join(rng.choice(_WORDS) for _ in range(300))
        messages = [{"role": "system", "content": system}]
        for t in range(turns):
            messages.append({"role": "user", "content": " ".join(rng.choice(_WORDS) for _ in range(60))})
            if t == 0:
                first_turns.append(list(messages))
            turn = await send(client, messages)
            messages.append({"role": "assistant", "content": turn.content or "..."})

    async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
        # Three conversations at a time: together they hold more blocks than the engines.
        for start in range(0, n, 3):
            await asyncio.gather(*(one(client, k) for k in range(start, min(n, start + 3))))
        evicted = 0
        for messages in first_turns[:3]:
            turn = await send(client, messages)
            evicted += turn.cached < turn.prompt_tokens - 32
    return pairs, evicted


def test_event_driven_predictions_match_the_engines_cached_tokens(events_cluster: Any) -> None:
    model = str(events_cluster.cfg.model.served_name)
    pairs, evicted = asyncio.run(_conversations(events_cluster.base_url, model, n=12, turns=3))
    agreement = Agreement.of(pairs, block_size=32)
    print(f"\nKV events: {agreement}; first turns evicted by the end: {evicted}/3", file=sys.stderr)
    assert agreement.requests == 36 + 3
    assert agreement.engine_tokens > 0  # the engines did reuse prefixes
    assert evicted > 0  # and evicted some: the pressure the exact index is for
    # Loose: a prediction is made a moment before the engine schedules the request.
    assert agreement.within_block >= 0.8
