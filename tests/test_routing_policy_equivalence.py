"""The cache-aware policy decides exactly as the frozen reference (`tests/reference_cache_aware.py`,
the policy before the decision-latency work, with the slot-turnover wait): over randomized replica states, requests,
sessions, finishes and pool changes, and over every option that switches a term off, each
decision has the same replica, matched blocks, reason and scores (bit for bit), and leaves
the same state behind (running means, backlog, KV owed, decode exposure, the rng)."""

from __future__ import annotations

import random
from collections import deque
from typing import Any

import pytest

from cluster.routing import cache_aware, replica_scores
from cluster.routing.cache_aware import CacheAwarePolicy
from cluster.routing.policy import ReplicaView, RouteDecision, RouteRequest
from tests.reference_cache_aware import CacheAwarePolicy as ReferencePolicy

B = 16

OPTIONS: list[dict[str, Any]] = [
    {},
    {"kv_overload": 0.8, "balance_abs": 4, "balance_rel": 1.5},
    {"externality_weight": 0.0, "backlog_weight": 0.0},
    {"tpot_weight": 0.0, "kv_wait_weight": 0.0, "pin_in_flight": False},
    {"learn_duration": True, "mean_prompt_tokens": 300, "index_capacity_fraction": 0.5},
    {"use_affinity": False, "batch_tokens": 64, "kv_high": 0.5, "max_sessions": 3},
    {"slot_turnover": False, "learn_duration": True},
    {"slot_externality": False, "max_sessions": 3},
]


class _Clock:
    """One time for both policies, set by the test (never advanced by a read)."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _view(rng: random.Random, rid: str, capacity: int) -> ReplicaView:
    hot = rng.random() < 0.15  # past the share floor, the slot limit, the KV thresholds
    return ReplicaView(
        rid,
        num_waiting=rng.randrange(0, 40 if hot else 6),
        num_running=rng.randrange(0, 300 if hot else 40),
        kv_usage=rng.choice([0.0, rng.random(), 0.5 + rng.random() / 2, 1.0]),
        max_num_seqs=rng.choice([256, 256, 8, 1]),
        kv_capacity_blocks=rng.choice([capacity, capacity, 0, 7]),
        in_flight=rng.randrange(0, 4),
    )


def _snapshot(p: Any) -> tuple[Any, ...]:
    states = sorted(
        (rid, s.backlog_until, s.kv_owed, s.decodes.total, s.decodes.live, s.slot_rate, s.slot_count)
        for rid, s in p._state.items()
    )
    return (
        p.mean_uncached_tokens,
        p.decode_token_s(),
        p.mean_turn_tokens,
        p.request_duration_s,
        states,
        list(p._in_flight),
        list(p._sessions.items()),
        p._rng.getstate(),
    )


def _same(a: RouteDecision, b: RouteDecision) -> bool:
    exact = {k: v.hex() for k, v in a.scores.items()} == {k: v.hex() for k, v in b.scores.items()}
    return a == b and exact and list(a.scores) == list(b.scores)


@pytest.fixture(params=["python", "compiled"])
def scorer(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The policy with each version of its scoring loop (`cluster.routing.replica_scores`)."""
    if request.param == "compiled":
        # `make install` builds it (setup.py); a silent fallback to Python would go unseen.
        assert replica_scores.score_replicas_c is not None, "cluster/routing/_replica_scores.c was not built"
        monkeypatch.setattr(cache_aware, "score_replicas", replica_scores.score_replicas_c)
    else:
        monkeypatch.setattr(cache_aware, "score_replicas", replica_scores.score_replicas_py)
    return str(request.param)


@pytest.mark.parametrize("num_replicas", [1, 3, 20, 64, 150])
@pytest.mark.parametrize("option", range(len(OPTIONS)))
def test_decisions_equal_the_reference(num_replicas: int, option: int, scorer: str) -> None:
    rng = random.Random(num_replicas * 100 + option)
    clock = _Clock()
    kw = {"block_size": B, "seed": option, "clock": clock, "pin_ttl_s": 50.0, **OPTIONS[option]}
    new, ref = CacheAwarePolicy(**kw), ReferencePolicy(**kw)
    pool = [f"r{i}" for i in range(num_replicas + 2)]
    live = pool[:num_replicas]
    capacity = 200
    roots = [[rng.getrandbits(60) for _ in range(rng.randrange(1, 20))] for _ in range(5)]
    chains: list[list[int]] = []
    outstanding: deque[tuple[RouteRequest, str]] = deque()
    views = [_view(rng, rid, capacity) for rid in live]
    external = rng.random() < 0.5
    for step in range(600):
        clock.t += rng.choice([0.0, 0.001, 0.05, 0.5, 5.0])
        u = rng.random()
        if u < 0.3:  # new stats for some replicas; the other views are the same objects
            views = [_view(rng, v.replica_id, capacity) if rng.random() < 0.3 else v for v in views]
        elif u < 0.33:  # the pool changes (a replica leaves, another joins) or is reordered
            live = rng.sample(pool, rng.randrange(1, len(pool) + 1))
            views = [_view(rng, rid, capacity) for rid in live]
            for p in (new, ref):
                p.on_replicas_changed(live)
        # A follow-up of an earlier chain, a shared root, or cold; sometimes no blocks at all.
        v = rng.random()
        if v < 0.4 and chains:
            chain = rng.choice(chains) + [rng.getrandbits(60) for _ in range(rng.randrange(0, 6))]
        elif v < 0.8:
            chain = rng.choice(roots) + [rng.getrandbits(60) for _ in range(rng.randrange(0, 30))]
        elif v < 0.95:
            chain = [rng.getrandbits(60) for _ in range(rng.randrange(1, 30))]
        else:
            chain = []
        chains.append(chain)
        session = rng.choice([None, "s1", "s2", "s3", f"s{step}"])
        request = RouteRequest(
            request_id=rng.choice([f"q{step}", f"q{step}", f"q{max(0, step - 3)}"]),  # some retries
            prompt_tokens=len(chain) * B + rng.choice([0, 0, 7, -5, 300]),
            block_hashes=chain,
            max_tokens=rng.choice([0, 1, 2, 50, 800]),
            session_id=session,
            affinity_replica=rng.choice([None, rng.choice(pool)]) if session else None,
            arrival_s=clock.t if external else None,
        )
        a, b = new.choose(request, views), ref.choose(request, views)
        assert _same(a, b), (step, a, b)
        new.index.flush()
        outstanding.append((request, a.replica_id))
        while len(outstanding) > rng.randrange(0, 3 * num_replicas + 2):
            req, rid = outstanding.popleft()
            reply = [rng.getrandbits(60) for _ in range(rng.randrange(0, 4))]
            out = (list(req.block_hashes) + reply) if rng.random() < 0.5 else reply
            for p in (new, ref):
                p.on_finished(req, rid, out)
        assert _snapshot(new) == _snapshot(ref), step
        if step % 50 == 0:
            probe = rng.choice(chains)
            assert new.index.match_many(live, probe) == ref.index.match_many(live, probe)


def test_compiled_scorer_rejects_bad_input() -> None:
    """The compiled loop checks what the Python version would trip on, rather than read
    past a list: mismatched lengths, an offset or affinity index out of range, not lists."""
    fn = replica_scores.score_replicas_c
    assert fn is not None, "cluster/routing/_replica_scores.c was not built"
    views = [ReplicaView("a"), ReplicaView("b")]
    params = replica_scores.ScoreParams(
        32, B, 0.5, 32, 3.0, 2.0, 8000.0, 1 / 8192, 100.0, 10.0, 0.9, 20.0, 3.0, 1.0, 8, 1.0, 1.0, 0.0, True, True
    )
    ok = fn(views, ["a", "b"], [0, 1], [None, None], params, -1, None, 0)
    assert ok == replica_scores.score_replicas_py(views, ["a", "b"], [0, 1], [None, None], params, -1, None, 0)
    assert ok.chosen == 1  # b holds a block of the prompt
    with pytest.raises(ValueError):
        fn(views, ["a"], [0, 1], [None, None], params, -1, None, 0)
    with pytest.raises(ValueError):
        fn(views, ["a", "b"], [0, 1], [None, None], params, -1, None, 2)
    with pytest.raises(ValueError):
        fn(views, ["a", "b"], [0, 1], [None, None], params, 5, None, 0)
    with pytest.raises(TypeError):
        fn(tuple(views), ["a", "b"], [0, 1], [None, None], params, -1, None, 0)
    with pytest.raises(TypeError):
        fn(views, ["a", "b"], [0, 1], [None, None], tuple(params)[:-1], -1, None, 0)


def test_candidates_in_any_sequence() -> None:
    """A tuple of candidates decides as the list does (the compiled loop reads lists)."""
    views = [ReplicaView(f"r{i}", num_waiting=i % 3, kv_capacity_blocks=100) for i in range(5)]
    request = RouteRequest("q", 64, [1, 2, 3, 4], max_tokens=8)
    a = CacheAwarePolicy(block_size=B, seed=1).choose(request, tuple(views))
    b = CacheAwarePolicy(block_size=B, seed=1).choose(request, views)
    assert a == b
