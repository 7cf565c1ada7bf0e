"""Our routing policy: send each request where its expected time to first token is lowest.

The scoring rule
----------------
For every replica r the policy estimates

    TTFT(r) = queue_delay(r) + prefill(uncached_tokens(r)) / rate(r)

* `uncached_tokens(r)` = prompt tokens minus the tokens of the longest prefix that r is
  believed to cache (`PrefixIndex`, engine block granularity). Every cached token is a
  token r does not have to prefill: `matched_blocks * block_size / rate` seconds saved.
* `queue_delay(r)` is the prefill work queued ahead of the request: the requests waiting
  in r's engine, each costing the running mean of recent requests' uncached tokens, plus
  those this router sent that r has not reported yet (`ReplicaView.in_flight`) at
  `in_flight_weight` (0.5) each: they were sent within the last stats period, half a
  period ago on average, and most have finished their prefill by then; when r has no
  free sequence slot (`max_num_seqs`), the longer of that and the wait for a slot,
  since the requests queued ahead prefill as slots free (see below); plus a KV-pressure
  penalty once r's KV usage passes `kv_high` (admission then waits for blocks, or the
  scheduler preempts).
* The wait for a slot (`slot_turnover`): a request that holds its slot D seconds (its
  uncached prefill + its max_tokens x the seconds per decoded token), at a random point
  of them, frees the slot at 1 / D per second, so a full replica frees slots at
  max_num_seqs x the mean of 1 / D over this router's unfinished requests there, and the
  (busy - max_num_seqs + 1)-th slot comes after that many / the rate. Requests it did
  not send (other gateways') count at 1 / `request_duration_s`, weighted by their share
  of the busy ones. Seconds per token: decode time over decode tokens of this router's
  finished requests that found a free slot (from the end of their prefill, the router's
  prefill queue ahead of them included, to their finish); one
  that waited would count the very wait it prices. With 800-token replies (4 replicas)
  SLO attainment at x2.875 88.9% -> 97.5% (the constant `request_duration_s`, 10 s,
  against the ~40 s such a reply holds its slot); Mooncake x1-x3 unchanged, x4 TTFT p99 76.9 -> 71.5 s, x6 p50 26.7
  -> 26.6 s. `learn_duration` (off) makes the constant the running mean of this
  router's requests' time from their expected first token to their finish (alone:
  x2.875 99.2%, but far past saturation it feeds back, Mooncake x6 p50 28.9 s).
* `rate(r)` is `prefill_tokens_per_s` scaled by the share of each step's token budget
  (`batch_tokens`) left over by r's running decodes: with chunked prefill a busy batch
  slows prefill down, it does not block it.

Engine statistics cannot see one thing that dominates the tail: a replica prefilling a
100k-token prompt reports one running request and an empty queue, yet a request sent
there waits seconds for that prefill. So the policy also keeps a prefill backlog per
replica, a virtual finish time: every request it sends adds its uncached tokens /
`prefill_tokens_per_s`, and the backlog drains with (arrival) time. The expected TTFT
is the larger of the statistics-based estimate and `backlog(r) + prefill(uncached)`,
scaled by `backlog_weight` (0 turns it off). On the Mooncake trace (bench sim, 16
h100x8-bf16 replicas) this cut TTFT p99 from 14.3 s to 12.4 s at the trace's rate and
from 17.9 s to 14.1 s at 2x, with p50 unchanged.

Saturation: a miss costs everyone queued
----------------------------------------
Own TTFT alone undervalues a hit once queues form: every second of prefill a miss adds
on replica r is also waited for by the requests queued behind it. The policy adds
`externality_weight` (3) x the mean queue per replica (waiting + weighted in flight) x
the uncached prefill on r, 0 on an idle cluster, so at saturation it keeps the hits that
are the cluster's capacity. Sequence slots are capacity too (`slot_externality`): where
r has no free slot, the requests queued behind wait the longer of the prefill queued
there and the wait for a slot; this request adds its prefill to the one and a turnover
interval (the slot wait / (busy - max_num_seqs + 1), `slot_turnover_s` / max_num_seqs)
to the other, so it is charged the larger rise, max(its prefill, the rise of the slot
wait past the prefill queue), at the same mean queue. Without it a replica with free
slots lost every cached-prefix tie to full ones (its misses were charged the queue, the
full replicas' slots nothing): 800-token replies, 4 replicas, seed 1, x2.875: 1,251
requests sent to a full replica while another had free slots, the prefix's externality
(median 13.8 s) outweighing the predicted slot wait (1.9 s); SLO attainment 87.8% ->
94.7%. Charging the interval in full where the slot wait is the longer and nothing
elsewhere made the longest queue (waiting for prefill) free of it and drew work there
(seed 0, x3 TTFT p99 8.7 -> 30 s; now 12.7 s).
Admission at a full replica also waits for KV: the tokens (uncached prompt + reply) this
router sent to r and that have not finished, beyond r's KV capacity, cost
`kv_wait_weight` x (excess / capacity) x `request_duration_s`.

Saturation: what the engine still holds
---------------------------------------
A prefix is only worth something where it still is. vLLM never evicts the blocks of a
request in flight (waiting, prefilling or decoding); they join its LRU queue when the
request finishes. With long queues (minutes at saturation) an index that ages blocks by
routing order forgets exactly the long prompts still resident, and the policy then
scores their holder as cold. So the chain of every request this router sent is *pinned*
in the index until its finish is reported (`pin_in_flight`; a retry of the same request
id or `pin_ttl_s` without a finish releases it). Mooncake, 16 h100x8-bf16 replicas, x4:
the long pool's requests got the best resident prefix 100 of 165 times before, 182 of
191 with pins; its hit rate 21% -> 25%.

Saturation: a prefill stalls the decodes beside it
--------------------------------------------------
With chunked prefill every engine step carries the running decodes plus up to a step's
budget of prefill, so each second of prefill on r is a second added to the inter-token
time of every request decoding on r; a reply of n tokens spreads it over n - 1
intervals. The policy adds `tpot_weight` (1) x sum(1 / (max_tokens - 1)) over its
requests on r whose decode, if it meets `tpot_target_s` per token, is still running
when this prefill would start on r's virtual prefill clock (`DecodeExposure`) x the
uncached prefill on r: seconds of mean TPOT added to others. Short replies next to a
long cold prefill are what misses a TPOT target; this keeps cold prefills off replicas
where short replies are decoding (Mooncake x4.1: standard-pool TPOT misses 414 -> 284).

Without queues, a cached prefix wins exactly while the prefill time it saves exceeds the extra queue
delay at its holder: with the defaults a 4,096-token cached prefix (0.5 s of prefill)
is worth about four extra 1k-token requests queued ahead. When the holder's queue grows
past that, the next request goes elsewhere and the prefix gets a second holder.

Hot-spot guard
--------------
Estimates lag (stats arrive every `stats_period_s`), and one very hot prefix would keep
attracting work. A replica whose load (waiting + running + in flight) exceeds the
least-loaded replica's by more than `balance_abs` requests *and* by a factor
`balance_rel` (3), or whose KV usage is at least `kv_overload` (off by default: a full
cache still holds its prefixes and KV pressure is priced), loses its cache bonus (it is
scored as if it held nothing) and its session affinity.

Session affinity
----------------
The session's last replica (`RouteRequest.affinity_replica`) is scored like any other:
its history is a cached prefix, worth the prefill it saves, and it wins ties. Where this
router sent the session's last turn there, its index knows that prefix exactly. Where
another gateway did, the replica is credited with all of the prompt but a typical
follow-up turn's new tokens (`mean_turn_tokens`, learnt from the turns this router did
route to their session's replica). The session store records a turn when it finishes,
so while this router's last turn of a session is still in flight, that turn's replica
is the session's. It used to be an override (unless overloaded): with long replies
(800 tokens, 4 replicas, x3) it held sessions on replicas with ~15 requests waiting
for a sequence slot next to one with free slots; SLO attainment 57% -> 78%.

Several router instances
------------------------
Every gateway replica holds its own router and so its own policy object. Their views
converge as follows:

* Replica load and KV usage come from the engines (`record_routing_stats`), the same for
  every router, one stats period stale; each router adds only its own in-flight requests
  and its own prefill backlog (with N gateways each sees about 1/N of the backlog; the
  engines' queue lengths cover the rest one stats period later).
* Each prefix index sees only its own gateway's traffic, so a router underestimates what
  others placed (it may miss a prefix another gateway cached) and overestimates what is
  still cached (others' traffic evicts blocks it still lists). `index_capacity_fraction`
  (e.g. 1/number of gateways) makes each index evict earlier to compensate.
* Session affinity is shared state (the session store in Redis records the replica of
  each conversation's last turn), so a conversation stays on one replica whichever
  gateway serves each turn; the indexes only decide the first turn and shared prefixes
  that span sessions (system prompts, documents). `tests/test_routing_multi_router.py`
  measures the loss: two routers splitting a multi-turn workload vs one router.
* KV cache events from the engines make the indexes exact and shared:
  `cluster.routing.kv_events` applies vLLM's BlockStored / BlockRemoved to this index
  (`router.kv_events` in the config turns the engines' publisher on).

The per-replica terms above are computed in `cluster.routing.replica_scores` (compiled
where built, its Python version otherwise, equal bit for bit); `choose` prepares the
request's figures and keeps this router's state.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cluster.routing.decode_exposure import DecodeExposure
from cluster.routing.policy import ReplicaView, RouteDecision, RouteRequest
from cluster.routing.prefix_index import DEFAULT_CAPACITY_BLOCKS, PrefixIndex
from cluster.routing.replica_scores import ScoreParams, score_replicas, slot_turnover_s


class _ReplicaState:
    """What this router alone knows of one replica: when the prefill work it sent there is
    done (virtual time), the KV tokens its unfinished requests will hold, their decodes,
    and how fast their sequence slots free (the sum of 1 / expected duration)."""

    __slots__ = ("backlog_until", "kv_owed", "decodes", "slot_rate", "slot_count")

    def __init__(self, now: float) -> None:
        self.backlog_until = now
        self.kv_owed = 0.0
        self.decodes = DecodeExposure()
        # Over its unfinished requests: sum of 1 / (expected seconds holding a slot), count.
        self.slot_rate = 0.0
        self.slot_count = 0


@dataclass(frozen=True)
class _InFlight:
    """A request this router sent that has not finished: its replica, the chain pinned
    there, the KV tokens it will hold and when it was routed."""

    replica_id: str
    blocks: Sequence[int]
    kv_tokens: float
    routed_at: float
    decode: list[float] | None = None  # its DecodeExposure entry
    prefill_end: float = float("-inf")  # its prefill's end on the virtual prefill clock
    # (its prefill alone in s, decode tokens, 1 / expected slot seconds) for the slot wait.
    slot: tuple[float, int, float] | None = None
    admitted: bool = False  # a sequence slot was free when it was routed


class CacheAwarePolicy:
    """Minimise expected TTFT = queue delay + prefill of the tokens not cached there."""

    name = "cache-aware"

    def __init__(
        self,
        *,
        block_size: int,
        prefill_tokens_per_s: float = 8000.0,
        batch_tokens: int = 8192,
        mean_prompt_tokens: float | None = None,
        request_duration_s: float = 10.0,
        in_flight_weight: float = 0.5,
        kv_high: float = 0.90,
        kv_overload: float | None = None,
        kv_penalty_s: float = 2.0,
        balance_abs: int = 32,
        balance_rel: float = 3.0,
        use_affinity: bool = True,
        default_capacity_blocks: int = DEFAULT_CAPACITY_BLOCKS,
        index_capacity_fraction: float = 1.0,
        index_generations: int = 32,
        ewma_alpha: float = 0.1,
        backlog_weight: float = 1.0,
        externality_weight: float = 3.0,
        kv_wait_weight: float = 1.0,
        pin_in_flight: bool = True,
        tpot_weight: float = 1.0,
        tpot_target_s: float = 0.1,
        pin_ttl_s: float = 1800.0,
        learn_duration: bool = False,
        slot_turnover: bool = True,
        slot_externality: bool = True,
        max_sessions: int = 65536,
        clock: Callable[[], float] = time.monotonic,
        seed: int | None = None,
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if prefill_tokens_per_s <= 0 or batch_tokens <= 0:
            raise ValueError("prefill_tokens_per_s and batch_tokens must be positive")
        if not 0 < index_capacity_fraction <= 1:
            raise ValueError(f"index_capacity_fraction must be in (0, 1], got {index_capacity_fraction}")
        self.block_size = block_size
        self.prefill_tokens_per_s = float(prefill_tokens_per_s)
        self.batch_tokens = batch_tokens
        self.request_duration_s = request_duration_s
        self.learn_duration = learn_duration
        self.slot_turnover = slot_turnover
        self.slot_externality = slot_externality
        # Running sums (decayed) of decode seconds and decode tokens of finished requests
        # that found a free slot: their ratio is the per-token time that prices slot waits.
        self._decode_s = 0.0
        self._decode_tokens = 0.0
        self.in_flight_weight = in_flight_weight
        self.kv_high = kv_high
        self.kv_overload = kv_overload
        self.kv_penalty_s = kv_penalty_s
        self.balance_abs = balance_abs
        self.balance_rel = balance_rel
        self.use_affinity = use_affinity
        self.index_capacity_fraction = index_capacity_fraction
        self.ewma_alpha = ewma_alpha
        if backlog_weight < 0:
            raise ValueError(f"backlog_weight must be >= 0, got {backlog_weight}")
        self.backlog_weight = backlog_weight
        if externality_weight < 0:
            raise ValueError(f"externality_weight must be >= 0, got {externality_weight}")
        self.externality_weight = externality_weight
        if kv_wait_weight < 0:
            raise ValueError(f"kv_wait_weight must be >= 0, got {kv_wait_weight}")
        self.kv_wait_weight = kv_wait_weight
        # request id -> what it holds until it finishes, in routing order (for the TTL).
        self._in_flight: OrderedDict[str, _InFlight] = OrderedDict()
        if pin_ttl_s <= 0:
            raise ValueError(f"pin_ttl_s must be positive, got {pin_ttl_s}")
        self.pin_in_flight = pin_in_flight
        if tpot_weight < 0:
            raise ValueError(f"tpot_weight must be >= 0, got {tpot_weight}")
        self.tpot_weight = tpot_weight
        if tpot_target_s <= 0:
            raise ValueError(f"tpot_target_s must be positive, got {tpot_target_s}")
        self.tpot_target_s = tpot_target_s

        self.pin_ttl_s = pin_ttl_s
        self._clock = clock
        # Requests that carry their arrival time (the simulator's clock) drive time; the
        # latest one is "now" when a finish is reported.
        self._last_now = float("-inf")
        # session id -> (replica, request id) this router last sent it to (its index knows that).
        self._sessions: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self.max_sessions = max_sessions
        self._external_clock = False
        # replica id -> what this router's own requests put there (backlog, KV owed, decodes).
        self._state: dict[str, _ReplicaState] = {}
        # The running mean of uncached tokens per request prices a queued request. Without
        # a prior it starts at the first request's (a wrong prior takes ~1/alpha requests
        # to wash out, long enough to misroute a short session's first turns).
        self._mean_known = mean_prompt_tokens is not None
        self.mean_uncached_tokens = float(mean_prompt_tokens) if mean_prompt_tokens is not None else 1024.0
        # The new tokens of a follow-up turn (prompt past the session's cached history): what
        # the session's replica is not credited with when this index does not know it.
        self.mean_turn_tokens = self.mean_uncached_tokens
        self._turn_known = False
        self.index = PrefixIndex(default_capacity_blocks, index_generations)
        self._rng = random.Random(seed)
        self._last_caps: tuple[list[str], list[int]] = ([], [])
        # _state's entries in the order of the last candidate list (None: rebuild).
        self._aligned: list[_ReplicaState | None] | None = None
        self._aligned_ids: list[str] = []

    # --- scoring -------------------------------------------------------------------

    def overloaded(self, r: ReplicaView, min_load: int) -> bool:
        """The hot-spot guard: too far above the least-loaded replica, or KV cache full."""
        load = r.load
        if load - min_load > self.balance_abs and load > self.balance_rel * min_load:
            return True
        return self.kv_overload is not None and r.kv_usage >= self.kv_overload

    def mean_queue(self, replicas: Sequence[ReplicaView]) -> float:
        """Requests queued per replica, on average (waiting + weighted in flight): about
        how many requests each second of prefill added now delays (0 on an idle cluster)."""
        w = self.in_flight_weight
        return sum(r.num_waiting + w * r.in_flight for r in replicas) / len(replicas)

    def backlog_s(self, replica_id: str, now: float) -> float:
        """Prefill work this router sent to the replica that is not done yet at `now`."""
        state = self._state.get(replica_id)
        return max(0.0, state.backlog_until - now) if state is not None else 0.0

    def kv_owed_tokens(self, replica_id: str) -> float:
        """KV tokens (uncached prompt + reply) of this router's unfinished requests there."""
        state = self._state.get(replica_id)
        return state.kv_owed if state is not None else 0.0

    def expected_ttft_s(
        self, r: ReplicaView, uncached_tokens: int, backlog_s: float = 0.0, mean_queue: float = 0.0
    ) -> float:
        """max(queue_delay(r) + prefill of `uncached_tokens` on r, the router's own prefill
        backlog there + that prefill) (see the module docstring)."""
        # Running decodes take one token each of every step's budget; the rest prefills.
        rate = self.prefill_tokens_per_s * max(0.05, 1.0 - r.num_running / self.batch_tokens)
        queued = r.num_waiting + self.in_flight_weight * r.in_flight
        queue_s = queued * self.mean_uncached_tokens / rate
        busy = r.num_running + queued
        own_s = uncached_tokens / rate
        delay_s = own_s  # what it adds to the wait of the requests queued behind (see choose())
        if busy >= r.max_num_seqs:
            # No free sequence slot: wait for running requests to finish (see choose()).
            wait_s = (busy - r.max_num_seqs + 1) / r.max_num_seqs * self.slot_turnover_s(r.replica_id, busy)
            if self.slot_externality:
                slot_s = wait_s / (busy - r.max_num_seqs + 1)
                delay_s = max(own_s, slot_s if wait_s > queue_s else wait_s - queue_s + slot_s)
            queue_s = max(queue_s, wait_s) if self.slot_turnover else queue_s + wait_s
        if r.kv_usage > self.kv_high:
            queue_s += self.kv_penalty_s * (r.kv_usage - self.kv_high) / max(1e-6, 1.0 - self.kv_high)
        ttft = queue_s + uncached_tokens / rate
        if self.backlog_weight and backlog_s > 0:
            ttft = max(ttft, self.backlog_weight * backlog_s + uncached_tokens / self.prefill_tokens_per_s)
        return ttft + self.externality_weight * mean_queue * delay_s

    def decode_token_s(self) -> float:
        """Seconds per decoded token: decode time / decode tokens, decayed running sums over
        this router's finished requests that found a free sequence slot (from the end of
        their prefill on the virtual prefill clock to their finish); `tpot_target_s` until
        one finished."""
        return self._decode_s / self._decode_tokens if self._decode_tokens > 0 else self.tpot_target_s

    def slot_turnover_s(self, replica_id: str, busy: float) -> float:
        """Seconds for the replica to free as many sequence slots (and the KV they hold) as
        it has busy requests: 1 / the mean of 1 / D over this router's unfinished requests
        there, D = the seconds a request holds its slot (its prefill + max_tokens x
        `decode_token_s`). At a random point of its D a request frees its slot at 1 / D
        per second, so a full replica frees slots at max_num_seqs x that mean. Where the
        router knows only a share f of the `busy` requests (other gateways'), the rest
        count at the constant `request_duration_s`."""
        return slot_turnover_s(self._state.get(replica_id), busy, self.slot_turnover, self.request_duration_s)

    def _learn_decode(self, record: _InFlight) -> None:
        """A finished request that found a free slot updates the per-token decode time; one
        that waited for a slot would count the wait it prices (feedback at saturation).
        Its decode starts when its prefill is done: `prefill_end`, the end of its own
        prefill on the virtual prefill clock, after the prefill this router queued ahead of
        it there (never before routing + its own prefill). Counted from routing, the
        prefill queue made every slot look held that much longer: past saturation
        (Mooncake x6, queues of a minute) the slot charge then outweighed the cache: TTFT
        p50 / p90 26.6 / 65.8 s without the slot charge, 29.6 / 72.1 s with it, 27.1 /
        69.3 s with it and this start."""
        if not record.admitted or record.slot is None:
            return
        tokens = record.slot[1]
        took = self._finish_now() - record.prefill_end
        if took <= 0 or tokens <= 0:
            return
        if self._decode_tokens > 0:
            a = self.ewma_alpha
            self._decode_s += a * (took - self._decode_s)
            self._decode_tokens += a * (tokens - self._decode_tokens)
        else:
            self._decode_s, self._decode_tokens = took, float(tokens)

    def _now(self, request: RouteRequest) -> float:
        if request.arrival_s is None:
            return self._clock()
        self._external_clock = True
        if request.arrival_s > self._last_now:
            self._last_now = request.arrival_s
        return request.arrival_s

    def _finish_now(self) -> float:
        """When a finish is reported: the latest request's arrival on an external clock
        (the simulator's), else this router's clock."""
        return self._last_now if self._external_clock else self._clock()

    def _learn_duration(self, record: _InFlight) -> None:
        """A finished request's time in flight (routed -> finished) updates the running
        mean that prices a wait for a sequence slot (`request_duration_s`)."""
        now = self._finish_now()
        # From its expected first token on the virtual prefill clock: the queue before it is
        # not slot time (counted, it would feed back once queues grow).
        took = now - max(record.routed_at, record.prefill_end)
        if took > 0:
            self.request_duration_s += self.ewma_alpha * (took - self.request_duration_s)

    # --- RoutingPolicy ---------------------------------------------------------------

    def choose(self, request: RouteRequest, replicas: Sequence[ReplicaView]) -> RouteDecision:
        if not isinstance(replicas, list):
            replicas = list(replicas)  # the compiled scoring loop reads a list
        index = self.index
        ids = [r.replica_id for r in replicas]
        caps = [r.kv_capacity_blocks for r in replicas]
        if (ids, caps) != self._last_caps:  # one C-level compare: capacities rarely change
            self._last_caps = (ids, caps)
            for rid, cap in zip(ids, caps, strict=True):
                index.set_capacity(rid, int(cap * self.index_capacity_fraction) if cap > 0 else 0)
        states = self._state
        # This router's state of each candidate, in candidate order: rebuilt only when the
        # candidates or the replicas with state change (a dict lookup per replica otherwise).
        aligned = self._aligned
        if aligned is None or ids != self._aligned_ids:
            aligned = self._aligned = [states.get(rid) for rid in ids]
            self._aligned_ids = ids
        kv_overload = self.kv_overload if self.kv_overload is not None else 2.0
        blocks = request.block_hashes
        block_size = self.block_size
        prompt_tokens = max(request.prompt_tokens, len(blocks) * block_size)
        matched = index.match_many(ids, blocks)

        # The session's last replica is priced like any other (it wins ties). Where another
        # gateway sent the session there, this index does not know its earlier turns: credit
        # it with all of the prompt but a typical request's uncached tokens (the new turn).
        # The store records a turn when it finishes: while this router's last turn of the
        # session is still in flight, that turn's replica is the newer one.
        affinity_candidate, affinity_floor = -1, None
        session = request.session_id
        target = request.affinity_replica
        ours = self._sessions.get(session) if session is not None else None
        if ours is not None and ours[1] in self._in_flight:
            target = ours[0]
        if self.use_affinity and target is not None and target in ids:
            affinity_candidate = ids.index(target)
            if ours is None or ours[0] != target:
                credit = int((prompt_tokens - self.mean_turn_tokens) // block_size)
                affinity_floor = min(credit, len(blocks))

        now = self._now(request)
        prefill_rate = self.prefill_tokens_per_s
        out_tokens = request.max_tokens or 0
        kv_wait_weight, tpot_weight = self.kv_wait_weight, self.tpot_weight
        params = ScoreParams(
            prompt_tokens,
            block_size,
            self.in_flight_weight,
            self.balance_abs,
            self.balance_rel,
            kv_overload,
            prefill_rate,
            1.0 / self.batch_tokens,
            self.mean_uncached_tokens,
            self.request_duration_s,
            self.kv_high,
            self.kv_penalty_s / max(1e-6, 1.0 - self.kv_high),
            self.externality_weight,
            kv_wait_weight,
            out_tokens,
            tpot_weight,
            self.backlog_weight,
            now,
            self.slot_turnover,
            self.slot_externality,
        )
        # Ties (e.g. an idle cluster and a cold prompt) go to the first replica from a
        # random offset, so cold requests spread instead of piling on replicas[0].
        offset = self._rng.randrange(len(replicas))
        chosen, affinity, affinity_blocks, scores, waited, chosen_overloaded = score_replicas(
            replicas, ids, matched, aligned, params, affinity_candidate, affinity_floor, offset
        )
        reason = "affinity" if chosen == affinity else "min-ttft"
        rid = ids[chosen]
        if session is not None:
            sessions = self._sessions
            sessions[session] = (rid, request.request_id)
            sessions.move_to_end(session)
            if len(sessions) > self.max_sessions:
                sessions.popitem(last=False)
        hit = matched[chosen]
        if reason != "affinity" and hit and not chosen_overloaded:
            reason = "cache"
        expected_hit = affinity_blocks if chosen == affinity else hit
        uncached = max(0, prompt_tokens - expected_hit * block_size)
        if self._mean_known:
            self.mean_uncached_tokens += self.ewma_alpha * (uncached - self.mean_uncached_tokens)
        else:
            self.mean_uncached_tokens, self._mean_known = float(uncached), True
        if ours is not None and ours[0] == rid and hit:
            # A follow-up turn where this index knew the session: its new tokens.
            if self._turn_known:
                self.mean_turn_tokens += self.ewma_alpha * (uncached - self.mean_turn_tokens)
            else:
                self.mean_turn_tokens, self._turn_known = float(uncached), True
        elif not self._turn_known:
            self.mean_turn_tokens = self.mean_uncached_tokens
        # Optimistic: the engine will hold the prompt's blocks once it prefills them, and
        # keeps them while the request is in flight (pinned in the index until it finishes).
        rid_blocks = blocks if self.pin_in_flight else ()
        if rid_blocks:
            index.pin(rid, blocks)
        else:
            index.insert(rid, blocks)
        state = aligned[chosen]
        if state is None:
            state = states[rid] = _ReplicaState(now)
            self._aligned = None
        state.backlog_until = max(now, state.backlog_until) + uncached / prefill_rate
        owed_tokens = float(uncached + out_tokens) if kv_wait_weight else 0.0
        state.kv_owed += owed_tokens
        decode = None
        if tpot_weight and out_tokens > 1:
            # Its first token comes when its prefill is done on the virtual clock; a decode
            # that meets the TPOT target is over (out_tokens - 1) x target later.
            end = state.backlog_until + (out_tokens - 1) * self.tpot_target_s
            decode = state.decodes.add(end, 1.0 / (out_tokens - 1))
        slot = None
        if self.slot_turnover:
            tokens = out_tokens - 1 if out_tokens > 1 else 0
            # It holds a slot for its prefill and its decode.
            prefill_s = uncached / prefill_rate
            holds_s = prefill_s + tokens * self.decode_token_s()
            slot = (prefill_s, tokens, 1.0 / holds_s if holds_s > 1e-3 else 1e3)
            state.slot_rate += slot[2]
            state.slot_count += 1
        if rid_blocks or owed_tokens or decode is not None or slot is not None:
            record = _InFlight(
                rid, rid_blocks, owed_tokens, now, decode, state.backlog_until, slot, admitted=waited is None
            )
            self._track(request.request_id, record)
        return RouteDecision(replica_id=rid, matched_blocks=hit, reason=reason, scores=scores)

    def _track(self, request_id: str, record: _InFlight) -> None:
        """Remember an in-flight request; release one routed again (a retry) and any older
        than `pin_ttl_s` (its finish was never reported: a failed or abandoned request)."""
        in_flight = self._in_flight
        if request_id in in_flight:
            self._release(in_flight.pop(request_id))
        in_flight[request_id] = record
        expired = record.routed_at - self.pin_ttl_s
        while in_flight:
            oldest = next(iter(in_flight.values()))
            if oldest.routed_at >= expired:
                break
            in_flight.popitem(last=False)
            self._release(oldest)

    def _release(self, record: _InFlight) -> None:
        if record.blocks:
            self.index.unpin(record.replica_id, record.blocks)
        state = self._state.get(record.replica_id)
        if state is not None:
            if record.slot is not None:
                state.slot_count -= 1
                # Exact 0 when none is left: sums of floats drift.
                state.slot_rate = state.slot_rate - record.slot[2] if state.slot_count else 0.0
            if record.kv_tokens:
                state.kv_owed = max(0.0, state.kv_owed - record.kv_tokens)
            if record.decode is not None:
                state.decodes.remove(record.decode)

    def on_finished(self, request: RouteRequest, replica_id: str, output_block_hashes: Sequence[int]) -> None:
        """Index the whole conversation the replica now caches (prompt + reply), so the
        next turn, which starts with it, finds its full history here."""
        record = self._in_flight.pop(request.request_id, None)
        if record is not None:
            self._release(record)
            if self.learn_duration:
                self._learn_duration(record)
            if self.slot_turnover:
                self._learn_decode(record)
        chain = list(request.block_hashes)
        if output_block_hashes:
            if chain and output_block_hashes[0] == chain[0]:
                chain = list(output_block_hashes)  # the full chain, prompt included
            else:
                chain.extend(output_block_hashes)  # only the reply's blocks
        self.index.insert(replica_id, chain)

    def on_replicas_changed(self, replica_ids: Sequence[str]) -> None:
        self.index.retain(replica_ids)
        live = set(replica_ids)
        for rid in [r for r in self._state if r not in live]:
            del self._state[rid]
        self._aligned = None
        for req_id in [k for k, v in self._in_flight.items() if v.replica_id not in live]:
            del self._in_flight[req_id]


__all__ = ["CacheAwarePolicy"]
