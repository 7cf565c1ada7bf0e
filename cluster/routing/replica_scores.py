"""The cache-aware policy's per-replica scoring loop: the expected TTFT of one request on
every candidate replica, plus what sending it there costs the requests queued behind
(see `cluster.routing.cache_aware` for what each term means and why).

This loop runs once per replica per request and was most of a routing decision's time
(64 replicas, 1M indexed blocks, a 2.1 GHz VM: ~2 us a replica in Python, ~0.7 compiled).
`score_replicas` is the compiled version (`_replica_scores.c`, built by `make install`)
where it was built, else `score_replicas_py`, this module's Python version, which is the
specification: both give the same decision and the same scores bit for bit
(tests/test_routing_policy_equivalence.py runs both against a frozen reference).
`MLS_PURE_PYTHON_ROUTING=1` picks the Python version (`cluster.routing.compiled`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import chain
from typing import Any, NamedTuple, Protocol

from cluster.routing.compiled import extension, use_compiled
from cluster.routing.policy import ReplicaView


class ReplicaStateLike(Protocol):
    """What the loop reads of the router's own state of a replica (`_ReplicaState`)."""

    backlog_until: float
    kv_owed: float
    decodes: Any  # DecodeExposure
    slot_rate: float
    slot_count: int


class ScoreParams(NamedTuple):
    """The request's and the policy's figures the loop needs, in one tuple (one argument
    for the compiled version)."""

    prompt_tokens: int
    block_size: int
    in_flight_weight: float
    balance_abs: float
    balance_rel: float
    kv_overload: float  # 2.0 where off (no usage reaches it)
    prefill_rate: float
    inv_batch: float
    mean_tokens: float
    duration_s: float
    kv_high: float
    kv_scale: float
    externality_weight: float
    kv_wait_weight: float
    out_tokens: int
    tpot_weight: float
    backlog_weight: float
    now: float
    slot_turnover: bool
    slot_externality: bool


class Scores(NamedTuple):
    chosen: int  # index into the candidates
    affinity: int  # the session replica's index where it is priced as such, else -1
    affinity_blocks: int
    scores: dict[str, float]  # replica id -> score (seconds), in scoring order
    waited: float | None  # the chosen replica's slot wait where it has no free slot
    chosen_overloaded: bool  # the hot-spot guard took the chosen replica's cache bonus


def slot_turnover_s(state: ReplicaStateLike | None, busy: float, slot_turnover: bool, duration_s: float) -> float:
    """Seconds for a replica to free as many sequence slots as it has busy requests
    (`CacheAwarePolicy.slot_turnover_s`)."""
    if not slot_turnover or state is None or not state.slot_count:
        return duration_s
    known = state.slot_count
    share = known / busy if known < busy else 1.0
    return 1.0 / (share * state.slot_rate / known + (1.0 - share) / duration_s)


def score_replicas_py(
    replicas: Sequence[ReplicaView],
    ids: Sequence[str],
    matched: Sequence[int],
    aligned: Sequence[ReplicaStateLike | None],
    p: ScoreParams,
    affinity_candidate: int,
    affinity_floor: int | None,
    offset: int,
) -> Scores:
    """Score every candidate; `affinity_candidate` is the session replica's index (-1:
    none), `affinity_floor` the blocks it is credited with at least (None: only what the
    index matched), `offset` where the scan starts (ties go to the first from there)."""
    in_flight_weight = p.in_flight_weight
    queued = [r.num_waiting + in_flight_weight * r.in_flight for r in replicas]
    loads = [r.num_waiting + r.num_running + r.in_flight for r in replicas]
    min_load = min(loads)
    abs_limit = min_load + p.balance_abs
    rel_limit = p.balance_rel * min_load
    # Overloaded: load above both limits (a NaN limit: never) or KV usage >= kv_overload.
    limit = abs_limit if abs_limit >= rel_limit else rel_limit
    kv_overload = p.kv_overload
    affinity, affinity_blocks = -1, 0
    i = affinity_candidate
    if i >= 0 and not (loads[i] > limit or replicas[i].kv_usage >= kv_overload):
        affinity = i
        affinity_blocks = matched[i]
        if affinity_floor is not None:
            affinity_blocks = max(affinity_blocks, affinity_floor)
    prompt_tokens, block_size = p.prompt_tokens, p.block_size
    prefill_rate, inv_batch = p.prefill_rate, p.inv_batch
    mean_tokens, duration_s = p.mean_tokens, p.duration_s
    kv_high, kv_scale = p.kv_high, p.kv_scale
    n = len(replicas)
    ext = p.externality_weight * (sum(queued) / n)  # x the mean queue
    kv_wait_weight, out_tokens, tpot_weight = p.kv_wait_weight, p.out_tokens, p.tpot_weight
    backlog_weight, now = p.backlog_weight, p.now
    slot_turnover = p.slot_turnover
    slot_cost = p.slot_externality and ext
    scores: dict[str, float] = {}
    slot_waits: dict[int, float] = {}  # replica index -> slot wait, where there is no free slot
    best_ttft, best_load = float("inf"), 0
    chosen = -1
    for i in chain(range(offset, n), range(offset)):
        r = replicas[i]
        kv_usage = r.kv_usage
        if loads[i] > limit or kv_usage >= kv_overload:
            uncached = prompt_tokens  # the hot-spot guard: no cache bonus
        else:
            # Never negative: no match is longer than the chain, which prompt_tokens covers.
            uncached = prompt_tokens - (affinity_blocks if i == affinity else matched[i]) * block_size
        running = r.num_running
        share = 1.0 - running * inv_batch
        rate = prefill_rate * (share if share > 0.05 else 0.05)
        q = queued[i]
        own_s = uncached / rate
        ttft = (q * mean_tokens + uncached) / rate
        busy = running + q
        extra = ext * own_s if ext else 0.0
        state = aligned[i]
        if busy >= r.max_num_seqs:
            # No free sequence slot: the requests queued ahead prefill as slots free,
            # during the wait for one, so the wait counts where it is the longer.
            waiting_for = busy - r.max_num_seqs + 1
            wait_s = waiting_for / r.max_num_seqs * slot_turnover_s(state, busy, slot_turnover, duration_s)
            slot_waits[i] = wait_s
            queue_s = q * mean_tokens / rate
            if slot_turnover:
                if wait_s > queue_s:
                    ttft += wait_s - queue_s
            else:
                ttft += wait_s
            if slot_cost:
                # The queue behind waits max(prefill queued, slot wait); this request
                # adds its prefill to the one and a turnover interval to the other:
                # the rise past its prefill (priced above) is the slot's share.
                gap = wait_s - queue_s
                slot_s = wait_s / waiting_for
                rise = slot_s if gap > 0 else gap + slot_s
                if rise > own_s:
                    extra += ext * (rise - own_s)
        if kv_usage > kv_high:
            ttft += (kv_usage - kv_high) * kv_scale
        if state is not None:
            backlog_s = state.backlog_until - now
            if backlog_s > 0 and backlog_weight:
                queue_ttft = backlog_weight * backlog_s + uncached / prefill_rate
                if queue_ttft > ttft:
                    ttft = queue_ttft
            d = state.decodes
            if d.live and tpot_weight:
                # The prefill stalls the decodes still running when it starts.
                start = now + backlog_s if backlog_s > 0 else now
                if d.heap[0][0] <= start:
                    d.at(start)
                extra += tpot_weight * d.total * own_s
            owed = state.kv_owed
            if owed:
                cap = r.kv_capacity_blocks * block_size
                over = owed + uncached + out_tokens - cap
                if over > 0 and cap > 0:
                    # Admission waits until running requests free that much KV.
                    extra += kv_wait_weight * over / cap * duration_s
        ttft += extra
        scores[ids[i]] = ttft
        if ttft < best_ttft or (ttft == best_ttft and loads[i] < best_load):
            best_ttft, best_load = ttft, loads[i]
            chosen = i
    if affinity >= 0 and scores[ids[affinity]] <= best_ttft:
        chosen = affinity  # ties go to the session's replica
    overloaded = loads[chosen] > limit or replicas[chosen].kv_usage >= kv_overload
    return Scores(chosen, affinity, affinity_blocks, scores, slot_waits.get(chosen), overloaded)


ScoreFn = Callable[
    [Sequence[ReplicaView], Sequence[str], Sequence[int], Sequence[Any], ScoreParams, int, "int | None", int],
    Scores,
]


def _compiled() -> ScoreFn | None:
    module = extension("_replica_scores")
    if module is None:  # not built (no compiler at install): the Python version decides
        return None
    compiled = module.score_replicas

    def score_replicas_c(*args: Any) -> Scores:
        return Scores(*compiled(*args))

    return score_replicas_c


score_replicas_c: ScoreFn | None = _compiled()
score_replicas: ScoreFn = score_replicas_c if score_replicas_c is not None and use_compiled() else score_replicas_py

__all__ = ["ScoreParams", "Scores", "score_replicas", "score_replicas_c", "score_replicas_py", "slot_turnover_s"]
