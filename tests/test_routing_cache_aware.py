"""Our policy on crafted cases: cache reuse traded against queueing, affinity, guards."""

from __future__ import annotations

import random

from cluster.routing.block_hash import chain_block_hashes
from cluster.routing.cache_aware import CacheAwarePolicy
from cluster.routing.policy import ReplicaView, RouteRequest

B = 16


def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(32768) for _ in range(n)]


def request(toks: list[int], rid: str = "q", **kw: object) -> RouteRequest:
    return RouteRequest(request_id=rid, prompt_tokens=len(toks), block_hashes=chain_block_hashes(toks, B), **kw)  # type: ignore[arg-type]


def views(n: int = 4, **overrides: dict[str, object]) -> list[ReplicaView]:
    out = []
    for i in range(n):
        rid = f"r{i}"
        fields: dict[str, object] = {"kv_capacity_blocks": 10_000, **overrides.get(rid, {})}
        out.append(ReplicaView(rid, **fields))  # type: ignore[arg-type]
    return out


def policy(**kw: object) -> CacheAwarePolicy:
    return CacheAwarePolicy(block_size=B, seed=0, **kw)  # type: ignore[arg-type]


def test_shared_prefix_goes_to_its_holder() -> None:
    p = policy()
    system = tokens(1, 2048)
    first = p.choose(request(system + tokens(2, 100), arrival_s=0.0), views())
    for k in range(10):
        # One second apart: each earlier prefill (0.27 s at most) is done.
        d = p.choose(request(system + tokens(10 + k, 100), arrival_s=1.0 + k), views())
        assert d.replica_id == first.replica_id
        assert d.matched_blocks == 2048 // B
        assert d.reason == "cache"


def test_overloaded_holder_is_avoided() -> None:
    p = policy()
    system = tokens(1, 2048)
    p.index.insert("r0", chain_block_hashes(system, B))
    hot = views(r0={"num_running": 120, "num_waiting": 10})
    d = p.choose(request(system + tokens(2, 100)), hot)
    assert d.replica_id != "r0"


def test_cache_bonus_is_weighed_against_queue_delay() -> None:
    system = tokens(1, 4096)  # 0.5 s of prefill at the default 8k tokens/s
    # Own TTFT only (externality off): four queued 1k-token requests outweigh the prefix.
    for waiting, expect_holder in ((2, True), (12, False)):
        p = policy(externality_weight=0.0)
        p.index.insert("r0", chain_block_hashes(system, B))
        d = p.choose(request(system + tokens(2, 64)), views(r0={"num_waiting": waiting}))
        assert (d.replica_id == "r0") is expect_holder, (waiting, d.scores)


def test_saturated_cluster_keeps_cache_hits() -> None:
    """With a queue everywhere, the prefill a miss adds delays everyone queued: the
    holder keeps the request even with a longer queue than own-TTFT alone accepts."""
    system = tokens(1, 4096)
    busy = {f"r{i}": {"num_waiting": 8} for i in range(4)}
    busy["r0"] = {"num_waiting": 14}
    for weight, expect_holder in ((0.0, False), (3.0, True)):
        p = policy(externality_weight=weight)
        p.index.insert("r0", chain_block_hashes(system, B))
        d = p.choose(request(system + tokens(2, 64)), views(**busy))
        assert (d.replica_id == "r0") is expect_holder, (weight, d.scores)


def test_full_kv_cache_is_priced_as_waiting() -> None:
    p = policy()
    system = tokens(1, 2048)
    p.index.insert("r0", chain_block_hashes(system, B))
    d = p.choose(request(system + tokens(2, 64)), views(r0={"kv_usage": 0.99}))
    assert d.replica_id != "r0"


def test_session_affinity_wins_even_without_index_knowledge() -> None:
    p = policy()
    d = p.choose(request(tokens(1, 500), session_id="s", affinity_replica="r2"), views())
    assert d.replica_id == "r2" and d.reason == "affinity"


def test_session_affinity_yields_when_overloaded() -> None:
    p = policy()
    d = p.choose(
        request(tokens(1, 500), session_id="s", affinity_replica="r2"),
        views(r2={"num_running": 200, "num_waiting": 40}),
    )
    assert d.replica_id != "r2"


def test_finished_reply_is_indexed_so_next_turn_finds_whole_history() -> None:
    p = policy()
    turn1 = tokens(1, 300)
    d1 = p.choose(request(turn1), views())
    reply = tokens(2, 200)
    held = turn1 + reply
    p.on_finished(request(turn1), d1.replica_id, chain_block_hashes(held, B))
    turn2 = held + tokens(3, 50)
    d2 = p.choose(request(turn2), views())
    assert d2.replica_id == d1.replica_id
    assert d2.matched_blocks == len(held) // B  # prompt and reply, not just the prompt


def test_eviction_forgets_what_the_engine_evicted() -> None:
    p = policy()
    small = views(r0={"kv_capacity_blocks": 64})
    old = tokens(1, 40 * B)
    p.index.set_capacity("r0", 64)
    p.index.insert("r0", chain_block_hashes(old, B))
    for k in range(4):  # 160 newer blocks through a 64-block cache
        p.index.insert("r0", chain_block_hashes(tokens(10 + k, 40 * B), B))
    assert p.index.match("r0", chain_block_hashes(old, B)) == 0
    d = p.choose(request(old), small)
    assert d.matched_blocks == 0 and d.reason == "min-ttft"


def test_cold_requests_spread_by_load() -> None:
    p = policy()
    load = {f"r{i}": 0 for i in range(4)}
    for k in range(40):
        vs = [ReplicaView(rid, num_waiting=n, kv_capacity_blocks=10_000) for rid, n in load.items()]
        d = p.choose(request(tokens(100 + k, 300)), vs)
        load[d.replica_id] += 1
    assert max(load.values()) - min(load.values()) <= 1


def test_departed_replica_is_forgotten() -> None:
    p = policy()
    system = tokens(1, 1024)
    p.index.insert("r0", chain_block_hashes(system, B))
    p.on_replicas_changed(["r1", "r2"])
    d = p.choose(request(system), views(3)[1:])
    assert d.matched_blocks == 0
    assert set(p.index.replica_ids()) == {"r1", "r2"}


def test_scores_are_the_documented_expected_ttft() -> None:
    p = policy()
    system = tokens(1, 1024)
    p.index.insert("r1", chain_block_hashes(system, B))
    vs = views(
        r0={"num_waiting": 3, "num_running": 100, "in_flight": 1},
        r1={"num_running": 30, "num_waiting": 2, "max_num_seqs": 32, "kv_usage": 0.95},
        r2={"kv_usage": 0.5},
    )
    prompt = system + tokens(2, 200)
    mean_before = p.mean_uncached_tokens
    d = p.choose(request(prompt), vs)
    p.mean_uncached_tokens = mean_before
    for v in vs:
        cached = 1024 if v.replica_id == "r1" else 0
        expected = p.expected_ttft_s(v, len(prompt) - cached, mean_queue=p.mean_queue(vs))
        assert abs(d.scores[v.replica_id] - expected) < 1e-12


def test_prefill_backlog_spreads_a_burst_the_statistics_cannot_see_yet() -> None:
    """Stats still say every replica is idle, but the router knows it just sent 10 s of
    prefill (80k tokens) to one of them: the next long prompt goes elsewhere, and once
    that work has drained the first replica is a candidate again."""
    p = policy()
    idle = views(2)
    first = p.choose(request(tokens(1, 80_000), "a", arrival_s=0.0), idle)
    second = p.choose(request(tokens(2, 8_000), "b", arrival_s=0.5), idle)
    assert second.replica_id != first.replica_id
    assert second.scores[first.replica_id] > 9.0  # 9.5 s of backlog left + its own 1 s
    # The inlined scoring loop and the reference formula agree.
    busy = next(v for v in idle if v.replica_id == first.replica_id)
    assert p.backlog_s(first.replica_id, 0.5) == 9.5
    assert abs(second.scores[first.replica_id] - p.expected_ttft_s(busy, 8_000, backlog_s=9.5)) < 1e-12
    later = p.choose(request(tokens(3, 8_000), "c", arrival_s=20.0), idle)
    assert later.scores[first.replica_id] == later.scores[second.replica_id]  # both drained


def test_backlog_can_be_turned_off() -> None:
    p = policy(backlog_weight=0.0)
    idle = views(2)
    p.choose(request(tokens(1, 80_000), "a", arrival_s=0.0), idle)
    d = p.choose(request(tokens(2, 8_000), "b", arrival_s=0.5), idle)
    assert d.scores["r0"] == d.scores["r1"]  # only the (idle) statistics count


def test_kv_owed_to_a_replica_prices_its_admission_wait() -> None:
    """Requests this router sent and that have not finished hold KV: a replica owed more
    than its capacity admits the next one only as they finish."""
    p = policy()
    small = views(2, r0={"kv_capacity_blocks": 10}, r1={"kv_capacity_blocks": 10})  # 10 x 16 tokens
    first = p.choose(request(tokens(1, 150), "a", max_tokens=10, arrival_s=0.0), small)
    second = p.choose(request(tokens(2, 150), "b", max_tokens=10, arrival_s=100.0), small)
    assert second.replica_id != first.replica_id
    p.on_finished(request(tokens(1, 150), "a", max_tokens=10), first.replica_id, [])
    assert p.kv_owed_tokens(first.replica_id) == 0.0


def test_in_flight_chain_is_not_evicted_until_its_request_finishes() -> None:
    """vLLM keeps a running request's blocks resident however much other traffic passes;
    the index must too, else a long queue makes it forget the prefixes worth most."""
    p = policy()
    small = views(1, r0={"kv_capacity_blocks": 100})
    long_prompt = tokens(1, 60 * B)  # 60 blocks
    p.choose(request(long_prompt, "long", arrival_s=0.0), small)
    for k in range(10):  # 10 x 40 blocks of newer traffic through a 100-block cache
        p.choose(request(tokens(100 + k, 40 * B), f"n{k}", arrival_s=1.0 + k), small)
        p.on_finished(request(tokens(100 + k, 40 * B), f"n{k}"), "r0", [])
    held = chain_block_hashes(long_prompt, B)
    assert p.index.match("r0", held) == 60  # still in flight: pinned
    p.on_finished(request(long_prompt, "long"), "r0", [])
    assert p.index.pinned_blocks("r0") == 0
    for k in range(3):  # now it ages out like any released block
        p.choose(request(tokens(200 + k, 40 * B), f"m{k}", arrival_s=20.0 + k), small)
        p.on_finished(request(tokens(200 + k, 40 * B), f"m{k}"), "r0", [])
    assert p.index.match("r0", held) < 60


def test_pins_are_released_on_retry_and_after_their_ttl() -> None:
    p = policy(pin_ttl_s=100.0)
    two = views(2)
    prompt = tokens(1, 32 * B)
    first = p.choose(request(prompt, "a", arrival_s=0.0), two)
    assert p.index.pinned_blocks(first.replica_id) == 32
    # The same request routed again (a retry): the first replica's pin goes.
    p.choose(request(prompt, "a", arrival_s=1.0), [v for v in two if v.replica_id != first.replica_id])
    assert p.index.pinned_blocks(first.replica_id) == 0
    # A finish that never comes: released once the pin is older than the TTL.
    other = next(v.replica_id for v in two if v.replica_id != first.replica_id)
    assert p.index.pinned_blocks(other) == 32
    p.choose(request(tokens(2, 4 * B), "b", arrival_s=150.0), [v for v in two if v.replica_id != other])
    assert p.index.pinned_blocks(other) == 0


def test_a_cold_prefill_keeps_off_a_replica_with_short_replies_decoding() -> None:
    """Two idle replicas; r0 just got a request with a 5-token reply. A 16k-token cold
    prompt sent there would stall that decode for its whole prefill (2 s at 8k tokens/s):
    the reply's mean TPOT would grow by 2 s / 4 intervals = 0.5 s, so it goes to r1."""
    p = policy(backlog_weight=0.0, kv_wait_weight=0.0)
    idle = views(2)
    short = p.choose(request(tokens(1, 64), "short", max_tokens=5, arrival_s=0.0), idle)
    d = p.choose(request(tokens(2, 16_000), "cold", arrival_s=0.001), idle)
    assert d.replica_id != short.replica_id
    stall_s = 16_000 / p.prefill_tokens_per_s
    assert abs(d.scores[short.replica_id] - d.scores[d.replica_id] - stall_s / 4) < 1e-9
    # Once that reply is done (finished, or past its TPOT-target decode window) it no longer counts.
    p.on_finished(request(tokens(1, 64), "short"), short.replica_id, [])
    later = p.choose(request(tokens(3, 16_000), "cold2", arrival_s=0.002), idle)
    assert later.scores["r0"] == later.scores["r1"] or later.replica_id != d.replica_id


def test_tpot_exposure_can_be_turned_off() -> None:
    p = policy(backlog_weight=0.0, kv_wait_weight=0.0, tpot_weight=0.0)
    idle = views(2)
    p.choose(request(tokens(1, 64), "short", max_tokens=5, arrival_s=0.0), idle)
    d = p.choose(request(tokens(2, 16_000), "cold", arrival_s=0.001), idle)
    assert d.scores["r0"] == d.scores["r1"]


def test_slot_wait_is_priced_from_the_durations_of_the_requests_holding_the_slots() -> None:
    """Two full replicas (2 of 2 slots busy, nothing queued): r0 holds two 1,000-token
    replies, r1 two 10-token ones. At the prior 0.1 s per token their slots free at 1 / D
    per second each (D = prefill + decode: ~100 s and ~1 s), so the wait for one is
    1 / 2 x 1 / mean(1 / D): ~50 s on r0, ~0.5 s on r1. The constant duration would
    price both at 1 / 2 x 10 s."""
    p = policy(backlog_weight=0.0, kv_wait_weight=0.0, tpot_weight=0.0, externality_weight=0.0)
    r0, r1 = views(2)
    for k, (view, out) in enumerate([(r0, 1001), (r0, 1001), (r1, 11), (r1, 11)]):
        p.choose(request(tokens(k, B), f"q{k}", max_tokens=out, arrival_s=0.0), [view])
    full = views(2, r0={"num_running": 2, "max_num_seqs": 2}, r1={"num_running": 2, "max_num_seqs": 2})
    d = p.choose(request(tokens(9, B), "new", arrival_s=0.0), full)
    assert d.replica_id == "r1"
    prefill_s = B / p.prefill_tokens_per_s
    own_s = B / (p.prefill_tokens_per_s * (1 - 2 / p.batch_tokens))
    for rid, out in (("r0", 1001), ("r1", 11)):
        wait_s = 0.5 * (prefill_s + (out - 1) * p.tpot_target_s)
        assert abs(d.scores[rid] - (wait_s + own_s)) < 1e-9
    # Without the router's own requests there, the constant: 1 / 2 x request_duration_s.
    fresh = policy(backlog_weight=0.0, kv_wait_weight=0.0, tpot_weight=0.0, externality_weight=0.0)
    d = fresh.choose(request(tokens(9, B), "new", arrival_s=0.0), full)
    assert abs(d.scores["r0"] - (0.5 * fresh.request_duration_s + own_s)) < 1e-9
    assert fresh.slot_turnover_s("r0", 2) == fresh.request_duration_s


def test_slot_wait_overlaps_the_prefill_queued_ahead() -> None:
    """The requests queued ahead on a full replica prefill as slots free, while the new
    one waits for its slot: the TTFT is the longer of the two, not their sum."""
    p = policy(backlog_weight=0.0, kv_wait_weight=0.0, tpot_weight=0.0, externality_weight=0.0)
    full = views(1, r0={"num_running": 2, "num_waiting": 40, "max_num_seqs": 2})
    expected = p.expected_ttft_s(full[0], B)
    d = p.choose(request(tokens(1, B), "new", arrival_s=0.0), full)
    rate = p.prefill_tokens_per_s * (1 - 2 / p.batch_tokens)
    queue_s = 40 * 1024 / rate  # 40 x the prior 1,024 uncached tokens: ~5.1 s
    wait_s = 41 / 2 * p.request_duration_s  # 205 s
    assert abs(d.scores["r0"] - (wait_s + B / rate)) < 1e-9
    assert queue_s < wait_s
    assert abs(expected - d.scores["r0"]) < 1e-9
    off = policy(backlog_weight=0.0, kv_wait_weight=0.0, tpot_weight=0.0, externality_weight=0.0, slot_turnover=False)
    d = off.choose(request(tokens(1, B), "new", arrival_s=0.0), full)
    assert abs(d.scores["r0"] - (queue_s + wait_s + B / rate)) < 1e-9


def test_slot_wait_mixes_in_the_constant_for_requests_other_gateways_sent() -> None:
    """The router sent one of a full replica's 4 busy requests (a 1,000-token reply,
    ~100 s): the others count at the constant 1 / request_duration_s."""
    p = policy(backlog_weight=0.0, kv_wait_weight=0.0, tpot_weight=0.0, externality_weight=0.0)
    p.choose(request(tokens(1, B), "mine", max_tokens=1001, arrival_s=0.0), views(1))
    d_s = B / p.prefill_tokens_per_s + 1000 * p.tpot_target_s
    rate = 0.25 / d_s + 0.75 / p.request_duration_s
    assert abs(p.slot_turnover_s("r0", 4) - 1 / rate) < 1e-9
    p.on_finished(request(tokens(1, B), "mine"), "r0", [])
    assert p.slot_turnover_s("r0", 4) == p.request_duration_s


def test_decode_time_per_token_is_measured_on_requests_that_found_a_free_slot() -> None:
    """Routed at 0 with a 101-token reply (100 decode tokens after the first), finished by
    the time the router's clock reads 10 s: (10 - its prefill) / 100 s per token. A
    request that waited for a slot would count the wait it prices: not measured."""
    p = policy()
    idle = views(2)
    assert p.decode_token_s() == p.tpot_target_s  # the prior, until one finishes
    p.choose(request(tokens(1, B), "a", max_tokens=101, arrival_s=0.0), idle)
    p.choose(request(tokens(2, B), "b", arrival_s=10.0), idle)  # the clock reads 10 s
    p.on_finished(request(tokens(1, B), "a"), "r0", [])
    assert abs(p.decode_token_s() - (10.0 - B / p.prefill_tokens_per_s) / 100) < 1e-12
    measured = p.decode_token_s()
    full = views(1, r0={"num_running": 256})
    p.choose(request(tokens(3, B), "c", max_tokens=101, arrival_s=11.0), full)
    p.choose(request(tokens(4, B), "d", arrival_s=60.0), idle)
    p.on_finished(request(tokens(3, B), "c"), "r0", [])
    assert p.decode_token_s() == measured


def test_decode_time_starts_after_the_prefill_queued_ahead() -> None:
    """b is routed behind a's 64-block prefill on the one replica: its decode starts when
    the router's prefill clock has done both, not when it was routed (a queue of a
    minute at saturation would otherwise count as a minute of decoding)."""
    p = policy()
    one = views(1)
    p.choose(request(tokens(1, 64 * B), "a", arrival_s=0.0), one)
    p.choose(request(tokens(2, B), "b", max_tokens=101, arrival_s=0.0), one)
    p.choose(request(tokens(3, B), "c", arrival_s=10.0), one)  # the clock reads 10 s
    p.on_finished(request(tokens(2, B), "b"), "r0", [])
    queued_s = (64 * B + B) / p.prefill_tokens_per_s  # a's prefill, then b's own
    assert abs(p.decode_token_s() - (10.0 - queued_s) / 100) < 1e-12


def test_a_slot_at_a_full_replica_is_priced_like_the_prefill_it_would_save() -> None:
    """r0 holds a 2,048-token system prompt but has no free slot (its queue waits for one:
    1 / 4 x 2 s = 0.5 s), r1 has free slots and nothing cached, r2 a queue of 20 waiting
    for prefill (mean queue 20 / 3). The prefix saves 0.26 s of prefill, worth
    externality_weight x 20 / 3 times that to the others queued; taking the next slot
    at r0 makes every request queued behind wait one more slot (0.5 s), just as scarce:
    r1 gets the request. Without the slot term the prefix held it on the full replica."""
    kw: dict[str, object] = {
        "backlog_weight": 0.0,
        "kv_wait_weight": 0.0,
        "tpot_weight": 0.0,
        "request_duration_s": 2.0,
    }
    system = tokens(1, 2048)
    loaded = views(
        3,
        r0={"num_running": 4, "max_num_seqs": 4},
        r1={"num_running": 1, "max_num_seqs": 4},
        r2={"num_waiting": 20, "max_num_seqs": 256},
    )
    picks = {}
    for on in (True, False):
        p = policy(slot_externality=on, **kw)
        p.choose(request(system, "s", arrival_s=0.0), views(1))  # r0 caches the system prompt
        p.on_finished(request(system, "s"), "r0", [])
        mq = p.mean_queue(loaded)
        expected = p.expected_ttft_s(loaded[0], 32, mean_queue=mq)  # all but the 32 new tokens cached
        d = p.choose(request(system + tokens(2, 32), "new", arrival_s=1.0), loaded)
        picks[on] = d.replica_id
        assert abs(d.scores["r0"] - expected) < 1e-9
        if on:
            rate = p.prefill_tokens_per_s * (1 - 4 / p.batch_tokens)
            off_score = 0.5 + 32 / rate + p.externality_weight * mq * 32 / rate
            # Charged the slot interval instead of its own (shorter) prefill.
            assert abs(d.scores["r0"] - (off_score + p.externality_weight * mq * (0.5 - 32 / rate))) < 1e-9
    assert picks == {True: "r1", False: "r0"}


def test_no_slot_charge_where_the_full_replica_queue_waits_for_prefill() -> None:
    """No free slot, but the 40 queued requests' prefill (~5.1 s) outlasts the slot wait
    (41 / 4 x 0.1 s): the requests behind wait for prefill, one more slot holder delays
    none of them, so the score is the one without the slot term."""
    kw: dict[str, object] = {"backlog_weight": 0.0, "kv_wait_weight": 0.0, "tpot_weight": 0.0}
    full = views(2, r0={"num_running": 4, "num_waiting": 40, "max_num_seqs": 4}, r1={"num_waiting": 3})
    scores = []
    for on in (True, False):
        p = policy(slot_externality=on, request_duration_s=0.1, **kw)
        scores.append(p.choose(request(tokens(1, B), "new", arrival_s=0.0), full).scores["r0"])
    assert scores[0] == scores[1]
