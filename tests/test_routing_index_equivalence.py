"""The prefix index decides exactly as the frozen reference (`tests/reference_prefix_index.py`,
the per-replica index before the replica bitmasks): the same matches after any mix of
guesses, pins, engine events and replica changes, and the same cache-aware decisions on a
simulated trace and on the latency benchmark's workload, bit for bit."""

from __future__ import annotations

import itertools
import random
from collections import deque
from collections.abc import Iterator
from typing import Any

import pytest

from bench import router_latency
from bench.sim.simulator import ClusterSimulator, default_policy_factory
from bench.traces import SyntheticSpec, synthetic_multiturn
from cluster.profiles import load_profile
from cluster.routing import prefix_index
from cluster.routing.cache_aware import CacheAwarePolicy
from cluster.routing.policy import ReplicaView, RouteDecision, RouteRequest
from cluster.routing.prefix_index import PrefixIndex
from tests.reference_prefix_index import PrefixIndex as ReferenceIndex


@pytest.fixture(autouse=True, params=["python", "compiled"])
def lookup(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test with each version of the mask lookup (`_prefix_match.c` or the grouped
    search in Python)."""
    if request.param == "compiled":
        # `make install` builds it (setup.py); a silent fallback to Python would go unseen.
        assert prefix_index.match_masks_c is not None, "cluster/routing/_prefix_match.c was not built"
        monkeypatch.setattr(prefix_index, "_match_masks", prefix_index.match_masks_c)
    else:
        monkeypatch.setattr(prefix_index, "_match_masks", None)
    return str(request.param)


def _chains(rng: random.Random, n: int) -> list[list[int]]:
    roots = [[rng.getrandbits(60) for _ in range(rng.randrange(1, 12))] for _ in range(6)]
    return [rng.choice(roots) + [rng.getrandbits(60) for _ in range(rng.randrange(0, 40))] for _ in range(n)]


@pytest.mark.parametrize("mask_replicas", [1, 16, 10**6])  # masks always, from the 16th replica, never
@pytest.mark.parametrize("seed", range(4))
def test_matches_equal_the_reference_under_any_operations(seed: int, mask_replicas: int) -> None:
    rng = random.Random(seed)
    new, ref = PrefixIndex(200, generations=4, mask_replicas=mask_replicas), ReferenceIndex(200, generations=4)
    ids = [f"r{i}" for i in range(70)]  # more replicas than a 64-bit mask
    chains = _chains(rng, 300)
    pins: list[tuple[str, list[int]]] = []
    for step in range(3000):
        rid, chain = rng.choice(ids[:20] if step % 3 else ids), rng.choice(chains)
        u = rng.random()
        if u < 0.35:
            for idx in (new, ref):
                idx.insert(rid, chain)
        elif u < 0.55:
            for idx in (new, ref):
                idx.pin(rid, chain)
            pins.append((rid, chain))
        elif u < 0.7 and pins:
            prid, pchain = pins.pop(rng.randrange(len(pins)))
            for idx in (new, ref):
                idx.unpin(prid, pchain)
        elif u < 0.76:  # engine events: holes anywhere in a chain
            cut = [h for h in chain if rng.random() < 0.3]
            stored = chain[: rng.randrange(len(chain) + 1)]
            for idx in (new, ref):
                idx.store(rid, stored)
                idx.remove(rid, cut)
        elif u < 0.79:
            cap = rng.choice([0, 50, 120, 400])
            for idx in (new, ref):
                idx.set_capacity(rid, cap)
        elif u < 0.8:
            for idx in (new, ref):
                idx.drop(rid)
        elif u < 0.805:
            keep = rng.sample(ids, 40)
            for idx in (new, ref):
                idx.retain(keep)
        elif u < 0.81:
            exact = rng.random() < 0.5
            for idx in (new, ref):
                idx.follow_engine(rid, exact)
        if step % 5 == 0:
            order = rng.sample(ids, rng.randrange(1, len(ids)))
            probe = rng.choice(chains)[: rng.randrange(0, 50)]
            assert new.match_many(order, probe) == ref.match_many(order, probe), step
        if step % 97 == 0:
            assert len(new) == len(ref)
            assert [new.num_blocks(r) for r in ids] == [ref.num_blocks(r) for r in ids]
            assert [new.pinned_blocks(r) for r in ids] == [ref.pinned_blocks(r) for r in ids]


@pytest.mark.parametrize("seed", range(6))
def test_many_answers_and_holes_equal_the_reference(seed: int) -> None:
    """Replicas holding prefixes of one chain, of few or many lengths, with holes (engine
    evictions anywhere): the answers depend on the order the candidates come in, each
    replica's search trying the previous one's answer first. Candidates may repeat or be
    unknown to the index."""
    rng = random.Random(seed)
    new, ref = PrefixIndex(10_000, mask_replicas=1), ReferenceIndex(10_000)
    chain = [rng.getrandbits(60) for _ in range(rng.choice([40, 200]))]
    ids = [f"r{i}" for i in range(rng.choice([20, 64, 70]))]
    lengths = [rng.randrange(len(chain) + 1) for _ in range(rng.choice([2, 5, 40]))]
    for rid in ids:
        held = chain[: rng.choice(lengths)]
        holes = [h for h in held if rng.random() < 0.03]
        for idx in (new, ref):
            idx.insert(rid, held)
            idx.remove(rid, holes)
    for _ in range(300):
        order = rng.sample(ids, rng.randrange(1, len(ids) + 1))
        if rng.random() < 0.2:
            order += rng.sample(order, 2) if len(order) > 1 else order
            order.append("unknown")
            rng.shuffle(order)
        probe = chain[: rng.randrange(1, len(chain) + 1)]
        assert new.match_many(order, probe) == ref.match_many(order, probe)


class _Recorder:
    """Wraps a policy's choose() and keeps every decision."""

    def __init__(self, policy: Any) -> None:
        self.policy = policy
        self.decisions: list[RouteDecision] = []
        inner = policy.choose

        def choose(request: RouteRequest, replicas: list[ReplicaView]) -> RouteDecision:
            d = inner(request, replicas)
            self.decisions.append(d)
            return d

        policy.choose = choose


def _decisions(reference: bool) -> list[RouteDecision]:
    spec = SyntheticSpec(
        conversations=120,
        conversation_rate_per_s=4.0,
        mean_turns=5,
        system_prompts=5,
        system_prompt_tokens=4096,
        mean_user_tokens=800,
        mean_output_tokens=200,
        mean_think_s=3.0,
        block_size=512,
        max_prompt_tokens=30000,
        seed=5,
    )
    recorders: list[_Recorder] = []

    def factory(name: str, *, block_size: int, seed: int, **options: Any) -> Any:
        # A small index fraction: the index evicts all the time, pins and all.
        policy: Any = default_policy_factory(name, block_size=block_size, seed=seed, index_capacity_fraction=0.003)
        if reference:
            policy.index = ReferenceIndex(policy.index._default_capacity, policy.index._generations)
        recorders.append(_Recorder(policy))
        return policy

    sim = ClusterSimulator(
        load_profile("h100x8-bf16"),
        synthetic_multiturn(spec),
        policy="cache-aware",
        replicas={"standard": 6, "long": 2},
        policy_factory=factory,
    )
    sim.run()
    return [d for r in recorders for d in r.decisions]


def test_simulated_trace_decisions_equal_the_reference() -> None:
    new, ref = _decisions(False), _decisions(True)
    assert len(new) == len(ref) > 300
    assert sum(d.matched_blocks > 0 for d in new) > 100
    assert new == ref


def test_benchmark_workload_decisions_equal_the_reference() -> None:
    out = []
    for reference in (False, True):
        rng = random.Random(3)
        work = router_latency.Workload(rng)
        ids = [f"replica-{i:03d}" for i in range(64)]
        ticks = itertools.count()  # a fake clock: the backlog terms replay exactly

        def clock(t: Iterator[int] = ticks) -> float:
            return next(t) * 0.002

        policy = CacheAwarePolicy(block_size=router_latency.BLOCK_SIZE, seed=3, clock=clock)
        if reference:
            policy.index = ReferenceIndex()  # type: ignore[assignment]
        router_latency.fill(policy, work, ids, 64 * 400)
        views = [router_latency.views_for(rng, ids, 400) for _ in range(8)]
        outstanding: deque[tuple[RouteRequest, str]] = deque()
        decisions = []
        for i in range(1500):
            req = work.request(i)
            d = policy.choose(req, views[i % 8])
            decisions.append(d)
            outstanding.append((req, d.replica_id))
            while len(outstanding) > 4 * 64:
                r, rid = outstanding.popleft()
                policy.on_finished(r, rid, r.block_hashes)
        out.append(decisions)
    assert out[0] == out[1]
