"""A frozen copy of `cluster.routing.cache_aware` as it was with the slot-turnover wait and
before the decision-latency work (branch pol3, commit 77a8612): the reference
`tests/test_routing_policy_equivalence.py` checks the current policy against, decision for
decision (choice, reason, every score, and the state each decision leaves). Not used by
the project itself; the rationale of every term is in the real module's docstring. A
change of what the policy decides updates this copy with it."""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain

from cluster.routing.decode_exposure import DecodeExposure
from cluster.routing.policy import ReplicaView, RouteDecision, RouteRequest
from cluster.routing.prefix_index import DEFAULT_CAPACITY_BLOCKS, PrefixIndex


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
    """The reference policy. Minimise expected TTFT = queue delay + prefill of the tokens not cached there."""

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
        this router's finished requests that found a free sequence slot (routed -> finished,
        less their prefill at `prefill_tokens_per_s`); `tpot_target_s` until one finished."""
        return self._decode_s / self._decode_tokens if self._decode_tokens > 0 else self.tpot_target_s

    def slot_turnover_s(self, replica_id: str, busy: float) -> float:
        """Seconds for the replica to free as many sequence slots (and the KV they hold) as
        it has busy requests: 1 / the mean of 1 / D over this router's unfinished requests
        there, D = the seconds a request holds its slot (its prefill + max_tokens x
        `decode_token_s`). At a random point of its D a request frees its slot at 1 / D
        per second, so a full replica frees slots at max_num_seqs x that mean. Where the
        router knows only a share f of the `busy` requests (other gateways'), the rest
        count at the constant `request_duration_s`."""
        state = self._state.get(replica_id)
        if not self.slot_turnover or state is None or not state.slot_count:
            return self.request_duration_s
        known = state.slot_count
        share = known / busy if known < busy else 1.0
        return 1.0 / (share * state.slot_rate / known + (1.0 - share) / self.request_duration_s)

    def _learn_decode(self, record: _InFlight) -> None:
        """A finished request that found a free slot updates the per-token decode time; one
        that waited for a slot would count the wait it prices (feedback at saturation)."""
        if not record.admitted or record.slot is None:
            return
        prefill_s, tokens, _ = record.slot
        now = self._last_now if self._external_clock else self._clock()
        took = now - max(record.routed_at + prefill_s, record.prefill_end)
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

    def _learn_duration(self, record: _InFlight) -> None:
        """A finished request's time in flight (routed -> finished) updates the running
        mean that prices a wait for a sequence slot (`request_duration_s`)."""
        now = self._last_now if self._external_clock else self._clock()
        # From its expected first token on the virtual prefill clock: the queue before it is
        # not slot time (counted, it would feed back once queues grow).
        took = now - max(record.routed_at, record.prefill_end)
        if took > 0:
            self.request_duration_s += self.ewma_alpha * (took - self.request_duration_s)

    # --- RoutingPolicy ---------------------------------------------------------------

    def choose(self, request: RouteRequest, replicas: Sequence[ReplicaView]) -> RouteDecision:
        index = self.index
        ids = [r.replica_id for r in replicas]
        caps = [r.kv_capacity_blocks for r in replicas]
        if (ids, caps) != self._last_caps:  # one C-level compare: capacities rarely change
            self._last_caps = (ids, caps)
            for rid, cap in zip(ids, caps, strict=True):
                index.set_capacity(rid, int(cap * self.index_capacity_fraction) if cap > 0 else 0)
        loads = [r.num_waiting + r.num_running + r.in_flight for r in replicas]
        min_load = min(loads)
        abs_limit = min_load + self.balance_abs
        rel_limit = self.balance_rel * min_load
        # Off by default: a full KV cache still holds its prefixes, and KV pressure is
        # already priced (kv_penalty_s); at saturation every cache is full.
        kv_overload = self.kv_overload if self.kv_overload is not None else 2.0
        overloaded = [
            (load > abs_limit and load > rel_limit) or r.kv_usage >= kv_overload
            for r, load in zip(replicas, loads, strict=True)
        ]
        blocks = request.block_hashes
        block_size = self.block_size
        prompt_tokens = max(request.prompt_tokens, len(blocks) * block_size)
        matched = index.match_many(ids, blocks)

        chosen = -1
        reason = "min-ttft"
        # The session's last replica is priced like any other (it wins ties). Where another
        # gateway sent the session there, this index does not know its earlier turns: credit
        # it with all of the prompt but a typical request's uncached tokens (the new turn).
        # The store records a turn when it finishes: while this router's last turn of the
        # session is still in flight, that turn's replica is the newer one.
        affinity, affinity_blocks = -1, 0
        session = request.session_id
        target = request.affinity_replica
        ours = self._sessions.get(session) if session is not None else None
        if ours is not None and ours[1] in self._in_flight:
            target = ours[0]
        if self.use_affinity and target is not None:
            for i, rid in enumerate(ids):
                if rid == target:
                    if not overloaded[i]:
                        affinity = i
                        affinity_blocks = matched[i]
                        if ours is None or ours[0] != rid:
                            credit = int((prompt_tokens - self.mean_turn_tokens) // block_size)
                            affinity_blocks = max(affinity_blocks, min(credit, len(blocks)))
                    break

        now = self._now(request)
        backlog_weight = self.backlog_weight
        # expected_ttft_s, inlined: this loop runs once per replica per request.
        prefill_rate, inv_batch = self.prefill_tokens_per_s, 1.0 / self.batch_tokens
        mean_tokens, duration_s = self.mean_uncached_tokens, self.request_duration_s
        in_flight_weight = self.in_flight_weight
        kv_high, kv_scale = self.kv_high, self.kv_penalty_s / max(1e-6, 1.0 - self.kv_high)
        ext = self.externality_weight * self.mean_queue(replicas)
        kv_wait_weight = self.kv_wait_weight
        out_tokens = request.max_tokens or 0
        tpot_weight = self.tpot_weight
        states = self._state
        scores: dict[str, float] = {}
        slot_turnover = self.slot_turnover
        slot_waits: dict[int, float] = {}  # replica index -> slot wait, where there is no free slot
        best_ttft, best_load = float("inf"), 0
        # Ties (e.g. an idle cluster and a cold prompt) go to the first replica from a
        # random offset, so cold requests spread instead of piling on replicas[0].
        n = len(replicas)
        offset = self._rng.randrange(n)
        for i in chain(range(offset, n), range(offset)):
            r = replicas[i]
            rid = ids[i]
            if overloaded[i]:
                uncached = prompt_tokens
            else:
                uncached = prompt_tokens - (affinity_blocks if i == affinity else matched[i]) * block_size
                if uncached < 0:
                    uncached = 0
            running = r.num_running
            share = 1.0 - running * inv_batch
            rate = prefill_rate * (share if share > 0.05 else 0.05)
            queued = r.num_waiting + in_flight_weight * r.in_flight
            own_s = uncached / rate
            ttft = (queued * mean_tokens + uncached) / rate
            busy = running + queued
            if busy >= r.max_num_seqs:
                # No free sequence slot: the requests queued ahead prefill as slots free,
                # during the wait for one, so the wait counts where it is the longer.
                wait_s = (busy - r.max_num_seqs + 1) / r.max_num_seqs * self.slot_turnover_s(rid, busy)
                slot_waits[i] = wait_s
                if slot_turnover:
                    queue_s = queued * mean_tokens / rate
                    if wait_s > queue_s:
                        ttft += wait_s - queue_s
                else:
                    ttft += wait_s
            if r.kv_usage > kv_high:
                ttft += (r.kv_usage - kv_high) * kv_scale
            if ext:
                extra = ext * own_s
            else:
                extra = 0.0
            if self.slot_externality and ext and i in slot_waits:
                # No free slot: the requests queued behind wait the longer of the prefill
                # queued and the slot wait; this one adds its prefill to the first and one
                # turnover interval to the second. Past its prefill, the slot's share.
                wait_s = slot_waits[i]
                prefill_queue_s = queued * mean_tokens / rate
                slot_s = wait_s / (busy - r.max_num_seqs + 1)
                if wait_s - prefill_queue_s > 0:
                    rise = slot_s
                else:
                    rise = (wait_s - prefill_queue_s) + slot_s
                if rise > own_s:
                    extra += ext * (rise - own_s)
            state = states.get(rid)
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
            scores[rid] = ttft
            if ttft < best_ttft or (ttft == best_ttft and loads[i] < best_load):
                best_ttft, best_load = ttft, loads[i]
                chosen = i
        if affinity >= 0 and scores[ids[affinity]] <= best_ttft:
            chosen, reason = affinity, "affinity"  # ties go to the session's replica
        rid = ids[chosen]
        if session is not None:
            sessions = self._sessions
            sessions[session] = (rid, request.request_id)
            sessions.move_to_end(session)
            if len(sessions) > self.max_sessions:
                sessions.popitem(last=False)
        hit = matched[chosen]
        if reason != "affinity" and hit and not overloaded[chosen]:
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
        state = states.get(rid)
        if state is None:
            state = states[rid] = _ReplicaState(now)
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
        waited = slot_waits.get(chosen)
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
        for req_id in [k for k, v in self._in_flight.items() if v.replica_id not in live]:
            del self._in_flight[req_id]


__all__ = ["CacheAwarePolicy"]
