"""TTFT floors, SLO attainment and the goodput search: a floor is a true lower bound of
every simulated TTFT, a lone request sits on its floor, and the search finds a
threshold to its tolerance."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest

from bench.sim.floor import prefill_ttft_s, ttft_floors
from bench.sim.goodput import GoodputSearch, SloSpec, bisect_goodput, slo_met
from bench.sim.metrics import format_table, summarize
from bench.sim.simulator import ClusterSimulator
from bench.traces import SyntheticSpec, Trace, TraceRequest, synthetic_multiturn
from cluster.config import ClusterConfig
from cluster.profiles import load_profile

B = 512


class LinearStep:
    def step_ms(self, prefill_chunks: Sequence[tuple[int, int]], num_decode: int, decode_kv_tokens: int) -> float:
        return 10.0 + sum(n for n, _ in prefill_chunks) * 0.01 + num_decode


@pytest.fixture(scope="module")
def cfg() -> ClusterConfig:
    return load_profile("h100x8-bf16")


def test_prefill_floor_chunks_and_last_token() -> None:
    st = LinearStep()
    # 20,000 tokens in chunks of 8,192: three steps.
    assert prefill_ttft_s(st, 20_000, 0, 8192) == pytest.approx((3 * 10.0 + 200.0) / 1000)
    # Everything cached: the last token is still computed, one step.
    assert prefill_ttft_s(st, 20_000, 20_000, 8192) == pytest.approx((10.0 + 0.01) / 1000)


def test_floors_follow_the_prefix_seen_earlier(cfg: ClusterConfig) -> None:
    reqs = [
        TraceRequest("a", 0.0, 4 * B, 10, (1, 2, 3, 4)),
        TraceRequest("b", 100.0, 6 * B, 10, (1, 2, 3, 4, 5, 6)),  # 4 blocks seen
        TraceRequest("c", 200.0, 6 * B, 10, (9, 2, 3, 4, 5, 6)),  # first block differs: nothing
    ]
    f = ttft_floors(cfg, Trace("t", B, reqs), {"standard": 1})
    assert f.cached_tokens == [0, 4 * B, 0]
    assert f.perfect_reuse_s[0] == f.no_cache_s[0]
    assert f.perfect_reuse_s[1] < f.no_cache_s[1]
    assert f.perfect_reuse_s[2] == f.no_cache_s[2] == f.no_cache_s[1]


def test_floor_bounds_every_simulated_ttft(cfg: ClusterConfig) -> None:
    spec = SyntheticSpec(
        conversations=40,
        conversation_rate_per_s=4.0,
        mean_turns=4,
        system_prompts=2,
        system_prompt_tokens=4096,
        mean_user_tokens=800,
        mean_output_tokens=100,
        mean_think_s=2.0,
        block_size=B,
        max_prompt_tokens=30000,
        seed=5,
    )
    trace = synthetic_multiturn(spec)
    replicas = {"standard": 2}
    floors = ttft_floors(cfg, trace, replicas)
    res = ClusterSimulator(cfg, trace, policy="cache-aware", replicas=replicas).run()
    for a, f, floor in zip(res.arrival, res.first_token, floors.perfect_reuse_s, strict=True):
        assert f - a >= floor - 1e-9
    s = summarize(res, floors, SloSpec())
    assert s["ttft_over_floor_p50"] >= 1.0
    assert 0.0 <= s["slo_attainment"] <= 1.0
    assert "SLO" in format_table([s])
    # A lone request sits exactly on its floor.
    lone = Trace("lone", B, [trace.requests[0]])
    lf = ttft_floors(cfg, lone, replicas)
    lr = ClusterSimulator(cfg, lone, policy="cache-aware", replicas=replicas).run()
    assert lr.first_token[0] - lr.arrival[0] == pytest.approx(lf.perfect_reuse_s[0], rel=1e-9)


def test_ceiling_fleets_compute_a_prefix_cached_elsewhere_for_free(cfg: ClusterConfig) -> None:
    # Round-robin over two replicas: b and c land where nothing of theirs is cached.
    reqs = [
        TraceRequest("a", 0.0, 8 * B, 10, tuple(range(1, 9))),
        TraceRequest("b", 50.0, 10 * B, 10, tuple(range(1, 11))),  # a's 8 blocks seen
        TraceRequest("c", 100.0, 10 * B, 10, (99, *range(2, 11))),  # first block new: nothing
    ]
    trace = Trace("t", B, reqs)
    assert trace.perfect_reuse_tokens() == [0, 8 * B, 0]
    replicas = {"standard": 2}
    real = ClusterSimulator(cfg, trace, policy="round-robin", replicas=replicas).run()
    ideal = ClusterSimulator(cfg, trace, policy="round-robin", replicas=replicas, cache="perfect").run()
    assert real.hit_tokens == [0, 0, 0]
    assert ideal.hit_tokens == [0, 8 * B, 0]
    floors = ttft_floors(cfg, trace, replicas)
    # Alone on an idle replica, each request sits on its perfect-reuse floor there.
    for k in range(3):
        ttft = ideal.first_token[k] - ideal.arrival[k]
        assert ttft == pytest.approx(floors.perfect_reuse_s[k], rel=1e-9)
    assert real.first_token[1] - real.arrival[1] == pytest.approx(floors.no_cache_s[1], rel=1e-9)
    # A pooled cache: b is admitted with a's blocks, cached on the other replica.
    pooled = ClusterSimulator(cfg, trace, policy="round-robin", replicas=replicas, cache="pooled").run()
    assert pooled.replica[1] != pooled.replica[0]
    assert pooled.hit_tokens == [0, 8 * B, 0]
    with pytest.raises(ValueError, match="cache must be one of"):
        ClusterSimulator(cfg, trace, policy="round-robin", replicas=replicas, cache="shared")


def test_slo_met_rules() -> None:
    spec = SloSpec(ttft_min_s=2.0, ttft_floor_factor=1.5, tpot_mean_ms=100.0)
    met = slo_met(
        spec,
        arrival=[0.0, 0.0, 0.0, 0.0, 0.0],
        first_token=[1.9, 2.9, 2.9, 1.0, -1.0],
        finish=[2.9, 3.9, 3.9, 100.0, -1.0],
        output_tokens=[11, 11, 11, 11, 11],
        no_cache_floor_s=[0.1, 2.0, 1.0, 0.1, 0.1],
    )
    # ok; ok (3.0 s allowed for a 2 s floor); TTFT over max(2, 1.5); TPOT 9.9 s; unfinished.
    assert met == [True, True, False, False, False]
    assert slo_met(spec, [0.0], [0.5], [1.0], [1], [math.nan]) == [False]  # no pool held it


def test_goodput_search_finds_the_threshold() -> None:
    calls: list[float] = []

    def att(s: float) -> float:
        calls.append(s)
        return 1.0 if s <= 3.3 else 0.5

    g = bisect_goodput(att, lo=0.5, hi=8.0, tol=0.02, known={1.0: 1.0, 4.0: 0.2})
    assert g.bounded and 3.3 * 0.98 <= g.rate_scale <= 3.3
    assert 1.0 not in calls and 4.0 not in calls  # the known runs are reused
    assert bisect_goodput(lambda s: 1.0, hi=8.0).rate_scale == 8.0
    assert not bisect_goodput(lambda s: 1.0, hi=8.0).bounded
    assert bisect_goodput(lambda s: 0.0, lo=0.5).rate_scale == 0.0
    with pytest.raises(ValueError):
        GoodputSearch(lo=2.0, hi=1.0)
