"""Discrete-event simulator of a Mistral Large 2 cluster: pools of engine replicas
(`bench.sim.replica_model`) behind the project's own routing policies.

Events, in time order (ties in this order):
  * a replica's step (or pure-decode run) ends: its results apply, finished requests are
    reported to the policy (`on_finished`) and the replica forms its next batch;
  * a routing-stats snapshot (every `stats_period_s`): each replica's (waiting, running,
    KV usage) as `record_routing_stats` would report it; requests routed since the last
    snapshot count as the router's `in_flight`. Period 0 gives the router exact stats;
  * a request arrives: rejected when prompt + output exceed the largest pool, else the
    pool comes from `PoolSelector` (smallest fitting pool, spill when saturated) and the
    replica from the pool's policy, called with `ReplicaView`s and a `RouteRequest` whose
    block hashes are the chained trace block ids (block size = the trace's, 512 tokens
    for Mooncake; policies get that block size and the KV capacity in those blocks).

With a `fleet` (bench/sim/fleet.py), the replica set changes during the run: the fleet's
events (autoscaler ticks, replicas becoming ready) interleave with the others; a replica
added is routable only once ready, a replica removed stops taking requests and is
released when its last request finishes (drain).

`cache` says what an engine finds cached. "own" (the default): its own prefix cache.
Two fleets that no router can beat, for `cluster bench sim --ceiling`, where a prefix is
computed for free (its KV blocks still taken, only the prefill skipped):
  * "perfect": each prompt's longest prefix seen earlier in the trace, wherever it runs
    (`Trace.perfect_reuse_tokens`): every replica holds everything, an infinite cache;
  * "pooled": the longest prefix cached on any replica of its pool when it is admitted,
    as if read from there (a KV transfer tier): real capacity, reuse as if each request
    were on the holder of its prefix and balanced at the same time.
The policy is shown only the part it would prefill (what "perfect" gives, or the pool's
longest cached prefix when it is routed), so it balances the work each request costs.

Only replicas with work have a pending event (a heap of next-step times), so the cost is
per engine step, not per token. Everything is deterministic for a given seed.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from bench.sim.replica_model import ReplicaModel, Seq, StepTime
from bench.sim.spread import Spread
from bench.traces import Trace, TraceStats, chain_block_ids
from cluster.config import ClusterConfig, PoolConfig
from cluster.routing.policy import ReplicaView, RouteRequest, RoutingPolicy
from cluster.routing.pool_selector import ContextTooLong, PoolLoad, PoolSelector

StepTimeFactory = Callable[[ClusterConfig, PoolConfig], StepTime]
PolicyFactory = Callable[..., RoutingPolicy]
ReplicaFactory = Callable[..., ReplicaModel]


class FleetHook(Protocol):
    """What the simulator asks of a changing fleet (bench/sim/fleet.py)."""

    def next_event_s(self) -> float: ...

    def on_event(self, now: float, sim: ClusterSimulator) -> None: ...

    def on_arrival(self, now: float, replica: ReplicaModel) -> None: ...

    def on_drained(self, now: float, replica: ReplicaModel) -> None: ...


INF = float("inf")
# What an engine finds cached (see the module docstring).
CACHE_MODES = ("own", "pooled", "perfect")


def default_step_time(cfg: ClusterConfig, pool: PoolConfig, **options: Any) -> StepTime:
    """Whole engine steps measured in the real engine where a table exists for the pool
    (the CPU backend: bench/calibration/engine_step_table.py), else the calibrated layer
    model; options go to StepTimeModel.for_pool (allreduce_scaling, ...)."""
    from bench.calibration.engine_step_table import engine_step_table_for
    from bench.calibration.step_time import StepTimeModel

    table = engine_step_table_for(cfg, pool, calibration_dir=options.get("calibration_dir"))
    if table is not None:
        return table
    return StepTimeModel.for_pool(cfg, pool, **options)


def default_policy_factory(name: str, *, block_size: int, seed: int, **options: Any) -> RoutingPolicy:
    from cluster.routing.registry import make_policy

    try:
        return make_policy(name, block_size=block_size, seed=seed, **options)
    except (TypeError, ValueError) as e:  # the registry reports unknown options as ValueError
        if "seed" not in str(e):
            raise
        return make_policy(name, block_size=block_size, **options)  # a policy without randomness


def split_replicas(cfg: ClusterConfig, trace: Trace, total: int) -> dict[str, int]:
    """Share `total` replicas among the pools by the tokens (prompt + output) the trace
    sends to each under smallest-fitting-pool placement; a pool that gets requests gets
    at least one replica."""
    pools = cfg.pools
    tokens = {p.name: 0 for p in pools}
    for r in trace.requests:
        for p in pools:
            if r.total_tokens <= p.max_model_len:
                tokens[p.name] += r.total_tokens
                break
    used = [p.name for p in pools if tokens[p.name] > 0] or [pools[0].name]
    if total < len(used):
        raise ValueError(f"{total} replicas cannot cover the {len(used)} pools this trace needs ({used})")
    grand = sum(tokens[n] for n in used) or 1
    share = {n: max(1, int(total * tokens[n] / grand)) for n in used}
    # Hand out what rounding left, largest remainder first; never below one per pool.
    while sum(share.values()) < total:
        n = max(used, key=lambda n: total * tokens[n] / grand - share[n])
        share[n] += 1
    while sum(share.values()) > total:
        n = max((n for n in used if share[n] > 1), key=lambda n: share[n] - total * tokens[n] / grand)
        share[n] -= 1
    return {p.name: share.get(p.name, 0) for p in pools}


@dataclass
class SimResult:
    """Raw outcome of one simulated run; `bench.sim.metrics.summarize` reduces it."""

    policy: str
    trace: str
    block_size: int
    replicas: dict[str, int]
    # Per request, in trace order (first_token/finish are -1 for rejected requests).
    arrival: list[float]
    first_token: list[float]
    finish: list[float]
    prompt_tokens: list[int]
    output_tokens: list[int]
    prompt_blocks: list[int]
    hit_blocks: list[int]
    hit_tokens: list[int]
    preemptions: list[int]
    pool: list[str]
    replica: list[str]
    rejected: list[bool]
    spilled: list[bool]
    replica_stats: list[dict[str, Any]]
    ceiling: TraceStats  # of the accepted requests
    wall_s: float
    cpu_s: float = 0.0
    step_time_notes: list[str] = field(default_factory=list)


class _Pool:
    def __init__(
        self,
        pool: PoolConfig,
        replicas: list[ReplicaModel],
        policy: RoutingPolicy,
        capacity: int,
        make_replica: Callable[[int], ReplicaModel],
    ) -> None:
        self.config = pool
        self.replicas = replicas  # routable ones
        self.by_id = {r.replica_id: r for r in replicas}
        self.policy = policy
        self.capacity_blocks = capacity
        self.in_flight = 0  # routed here, not finished
        self.make_replica = make_replica
        self.created = len(replicas)


class ClusterSimulator:
    def __init__(
        self,
        cfg: ClusterConfig,
        trace: Trace,
        *,
        policy: str,
        replicas: Mapping[str, int],
        seed: int = 0,
        stats_period_s: float | None = None,
        policy_options: Mapping[str, Any] | None = None,
        step_time_factory: StepTimeFactory = default_step_time,
        policy_factory: PolicyFactory = default_policy_factory,
        spill: bool = True,
        decode_runs: bool = True,
        async_scheduling: bool | None = None,
        replica_factory: ReplicaFactory = ReplicaModel,
        fleet: FleetHook | None = None,
        cache: str = "own",
    ) -> None:
        unknown = set(replicas) - {p.name for p in cfg.pools}
        if unknown:
            names = [p.name for p in cfg.pools]
            raise ValueError(f"unknown pools {sorted(unknown)}; profile {cfg.profile} has {names}")
        if sum(replicas.values()) < 1:
            raise ValueError("at least one replica is needed")
        self.cfg = cfg
        self.trace = trace
        self.policy_name = policy
        self.seed = seed
        self.stats_period_s = cfg.router.stats_period_s if stats_period_s is None else stats_period_s
        self.spill = spill
        self.fleet = fleet
        if cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
        self.cache = cache
        self.free_tokens = trace.perfect_reuse_tokens() if cache == "perfect" else None
        if async_scheduling is None:
            # vLLM 0.29 schedules asynchronously by default, except on the CPU backend,
            # which turns it off (vllm/platforms/cpu.py: "not required on CPU").
            async_scheduling = cfg.node.accelerator != "cpu"
        self.async_scheduling = async_scheduling
        # Each request reaches its engine this long after the client sent it (gateway and
        # Serve path, both ways; cluster.config.SimulatorConfig).
        # With measured spreads each request draws its own (bench/sim/spread.py); the
        # draws are in request order, so a seed replays identically.
        sim = cfg.simulator
        over = Spread(sim.request_overhead_spread_ms or [sim.request_overhead_ms], seed=f"overhead-{seed}")
        lead = Spread(sim.stream_lead_spread_ms or [sim.stream_lead_ms], seed=f"lead-{seed}")
        self.request_overhead_s = [over.draw() / 1e3 for _ in trace.requests]
        # ... and the later tokens' way back is this much shorter than the first's.
        self.stream_lead_s = [lead.draw() / 1e3 for _ in trace.requests]
        # Requests reach their engines in the order of these times (a request with a
        # short path can overtake one sent just before it with a long one).
        self.engine_arrival_s = [r.arrival_s + o for r, o in zip(trace.requests, self.request_overhead_s, strict=True)]
        self.arrival_order = sorted(range(len(trace.requests)), key=lambda k: (self.engine_arrival_s[k], k))
        # The serving path slows with the client's requests already in flight (they share
        # the cores): `run` adds this per request in flight at each send.
        self.overhead_per_in_flight_s = sim.request_overhead_per_in_flight_ms / 1e3
        self.send_order = sorted(range(len(trace.requests)), key=lambda k: (trace.requests[k].arrival_s, k))
        self.replica_counts = {p.name: int(replicas.get(p.name, 0)) for p in cfg.pools}
        B = trace.block_size
        fresh = itertools.count(1)
        self._fresh_id: Callable[[], int] = lambda: -next(fresh)  # negative: never a trace id
        # Policies with global-random fallbacks still replay identically.
        random.seed(seed)
        self.pools: dict[str, _Pool] = {}
        self.step_time_notes: list[str] = []
        # CPU engines of one machine share its cores (cluster.config.SimulatorConfig).
        sharing = cfg.simulator.engine_contention_scale - 1.0
        contention = self._contention_of(sharing) if cfg.node.accelerator == "cpu" and sharing > 0 else None
        if contention is not None:
            self.step_time_notes.append(
                f"engines share the machine's cores: a step beside k other engines' steps x (1 + {sharing:.2f} k)"
            )
        batch_stretch = cfg.simulator.engine_batch_stretch if cfg.node.accelerator == "cpu" else 0.0
        if batch_stretch:
            self.step_time_notes.append(
                f"replies streamed on the same cores: a step of n sequences x (1 + {batch_stretch:.2f} (n - 1))"
            )
        for pi, pool in enumerate(cfg.pools):
            n = self.replica_counts[pool.name]
            if n <= 0:
                continue
            plan = cfg.memory_plan(pool)
            capacity = max(1, plan.kv_tokens_per_replica // B)
            st = step_time_factory(cfg, pool)
            reseed = getattr(st, "reseed", None)
            if callable(reseed):  # a table drawing step scales draws them from this run's seed
                reseed(f"{seed}-{pool.name}")
            describe = getattr(st, "describe", None)
            if callable(describe):
                self.step_time_notes.append(f"{pool.name}: {describe()}")
            e = pool.engine

            def make_replica(
                i: int, name: str = pool.name, st: StepTime = st, capacity: int = capacity, e: Any = e
            ) -> ReplicaModel:
                # A step time that draws per step (a measured spread) draws per replica.
                fork = getattr(st, "for_replica", None)
                return replica_factory(
                    f"{name}-{i}",
                    step_time=fork(f"{name}-{i}") if callable(fork) else st,
                    capacity_blocks=capacity,
                    block_size=B,
                    max_num_seqs=e.max_num_seqs,
                    max_num_batched_tokens=e.max_num_batched_tokens,
                    fresh_id=self._fresh_id,
                    decode_runs=decode_runs,
                    async_scheduling=async_scheduling,
                    contention=contention,
                    batch_stretch=batch_stretch,
                )

            reps = [make_replica(i) for i in range(n)]
            options = dict(cfg.router.options) if policy == cfg.router.policy else {}
            options.update(policy_options or {})
            pol = policy_factory(policy, block_size=B, seed=seed + pi, **options)
            pol.on_replicas_changed([r.replica_id for r in reps])
            self.pools[pool.name] = _Pool(pool, reps, pol, capacity, make_replica)
        self.selector = PoolSelector([self.pools[name].config for name in self.pools])
        self.replicas: list[ReplicaModel] = [r for p in self.pools.values() for r in p.replicas]
        self._pool_of = {r.replica_id: p for p in self.pools.values() for r in p.replicas}
        self._replica_idx = {r.replica_id: i for i, r in enumerate(self.replicas)}
        self._since_snap: dict[str, int] = {r.replica_id: 0 for r in self.replicas}
        self._heap: list[tuple[float, int]] = []
        self._bound = INF  # the next external event while run() is inside an arrival
        if cache == "pooled":
            for p in self.pools.values():
                for r in p.replicas:
                    r.pool_match = self._pooled(p)

    def _contention_of(self, sharing: float) -> Callable[[ReplicaModel], float]:
        """A replica's step stretch: 1 + `sharing` per other engine mid-step now."""

        def stretch(rep: ReplicaModel) -> float:
            others = sum(1 for r in self.replicas if r.busy and r is not rep)
            return 1.0 + sharing * others

        return stretch

    # -- a changing fleet (bench/sim/fleet.py drives these) --------------------------------

    @staticmethod
    def _pool_match(pool: _Pool, chain: Sequence[int]) -> int:
        """The longest prefix (blocks) of a chain cached on any routable replica of the pool."""
        return max((r.kv.match(chain) for r in pool.replicas), default=0)

    def _pooled(self, pool: _Pool) -> Callable[[Sequence[int]], int]:
        return functools.partial(self._pool_match, pool)

    def add_replica(self, pool_name: str) -> ReplicaModel:
        """A new replica of a pool, not yet routable (it is starting)."""
        pool = self.pools[pool_name]
        rep = pool.make_replica(pool.created)
        if self.cache == "pooled":
            rep.pool_match = self._pooled(pool)
        pool.created += 1
        self._replica_idx[rep.replica_id] = len(self.replicas)
        self.replicas.append(rep)
        self._pool_of[rep.replica_id] = pool
        self._since_snap[rep.replica_id] = 0
        return rep

    def make_routable(self, rep: ReplicaModel) -> None:
        pool = self._pool_of[rep.replica_id]
        pool.replicas.append(rep)
        pool.by_id[rep.replica_id] = rep
        pool.policy.on_replicas_changed([r.replica_id for r in pool.replicas])

    def stop_routing(self, rep: ReplicaModel) -> bool:
        """Take a replica out of its pool's routing set (drain); True when it is idle now."""
        pool = self._pool_of[rep.replica_id]
        if rep.replica_id in pool.by_id:
            del pool.by_id[rep.replica_id]
            pool.replicas = [r for r in pool.replicas if r is not rep]
            pool.policy.on_replicas_changed([r.replica_id for r in pool.replicas])
        return not (rep.has_work() or rep.busy)

    def pool_of(self, rep: ReplicaModel) -> str:
        return self._pool_of[rep.replica_id].config.name

    # ---------------------------------------------------------------------------------

    def run(self, progress: Callable[[int], None] | None = None, check: bool = False) -> SimResult:
        started = time.perf_counter()
        cpu_started = time.process_time()
        trace = self.trace
        reqs = trace.requests
        N = len(reqs)
        B = trace.block_size
        seqs: list[Seq | None] = [None] * N
        rejected = [False] * N
        spilled = [False] * N
        replica_idx = self._replica_idx
        heap = self._heap
        fleet = self.fleet
        period = self.stats_period_s
        next_snap = 0.0 if period > 0 else INF
        epoch = 0
        snapshot: dict[str, tuple[int, int, float]] = {}
        since_snap = self._since_snap
        session_replica: dict[str, str] = {}
        i = 0

        def take_snapshot() -> None:
            for r in self.replicas:
                snapshot[r.replica_id] = r.stats()
                since_snap[r.replica_id] = 0

        engine_arrival = self.engine_arrival_s
        overhead = self.request_overhead_s
        per_in_flight = self.overhead_per_in_flight_s
        sends = self.send_order
        sent = 0  # client sends so far; each then reaches its engine (`arriving`)
        arriving: list[tuple[float, int]] = []
        done = 0  # requests finished or rejected: the client's in flight is sent - done
        while i < N or heap:
            t_send = reqs[sends[sent]].arrival_s if sent < N else INF
            t_arr = arriving[0][0] if arriving else INF
            t_step = heap[0][0] if heap else INF
            t_snap = next_snap if i < N else INF
            t_fleet = fleet.next_event_s() if fleet is not None and (i < N or heap) else INF
            if t_send <= t_arr and t_send < t_step and t_send < t_snap and t_send < t_fleet:
                # A request leaves the client; it reaches its engine after its path, which
                # is longer for every other request in flight.
                k = sends[sent]
                if per_in_flight:
                    engine_arrival[k] = reqs[k].arrival_s + overhead[k] + per_in_flight * (sent - done)
                sent += 1
                heapq.heappush(arriving, (engine_arrival[k], k))
                continue
            # An engine arrival is due no earlier than the next send's.
            t_arr = min(t_arr, t_send)
            if t_step <= t_snap and t_step <= t_arr and t_step <= t_fleet:
                now, ri = heapq.heappop(heap)
                rep = self.replicas[ri]
                for seq in rep.finish_step(now):
                    self._finish(rep, seq, epoch, since_snap, session_replica)
                    done += 1
                if rep.has_work():
                    heapq.heappush(heap, (rep.start_step(now, min(t_arr, t_snap, t_fleet)), ri))
                else:
                    rep.flush_late()  # idle: the last outputs are processed
                    if fleet is not None and rep.replica_id not in self._pool_of[rep.replica_id].by_id:
                        fleet.on_drained(now, rep)
            elif t_fleet <= t_snap and t_fleet <= t_arr:
                assert fleet is not None
                fleet.on_event(t_fleet, self)
            elif t_snap <= t_arr:
                take_snapshot()
                epoch += 1
                next_snap = t_snap + period
            else:
                now, k = heapq.heappop(arriving)
                req = reqs[k]
                i += 1
                if progress is not None:
                    progress(i)
                try:
                    choice = self.selector.select(req.prompt_tokens, req.output_tokens, self._pool_loads())
                except ContextTooLong:
                    rejected[k] = True
                    done += 1
                    continue
                pool = self.pools[choice.pool]
                spilled[k] = choice.spilled_from is not None
                seq = Seq(k, req, chain_block_ids(req.block_ids), B)
                seq.arrival_s = now
                if self.free_tokens is not None:
                    seq.free_tokens = self.free_tokens[k]
                elif self.cache == "pooled":
                    seq.free_tokens = self._pool_match(pool, seq.hashes) * B
                seqs[k] = seq
                views = self._views(pool, snapshot if period > 0 else None, since_snap)
                affinity = session_replica.get(req.session_id) if req.session_id else None
                route = _route_request(seq, B, affinity if affinity in pool.by_id else None)
                decision = pool.policy.choose(route, views)
                if decision.replica_id not in pool.by_id:
                    raise RuntimeError(
                        f"policy {self.policy_name!r} chose {decision.replica_id!r}, not one of {list(pool.by_id)}"
                    )
                rep = pool.by_id[decision.replica_id]
                seq.epoch = epoch
                since_snap[rep.replica_id] += 1
                pool.in_flight += 1
                was_busy = rep.busy
                rep.enqueue(seq)
                if fleet is not None:
                    fleet.on_arrival(now, rep)
                if not was_busy:
                    t_next = min(arriving[0][0] if arriving else INF, reqs[sends[sent]].arrival_s if sent < N else INF)
                    bound = min(t_next, next_snap) if i < N else INF
                    if fleet is not None:
                        bound = min(bound, fleet.next_event_s())
                    heapq.heappush(heap, (rep.start_step(now, bound), replica_idx[rep.replica_id]))
        if check:
            for r in self.replicas:
                if r.has_work() or r.busy:
                    raise AssertionError(f"{r.replica_id} still has work at the end")
                r.kv.check(0)
        result = self._result(seqs, rejected, spilled, time.perf_counter() - started)
        result.cpu_s = time.process_time() - cpu_started
        return result

    def _pool_loads(self) -> dict[str, PoolLoad]:
        if not self.spill:
            return {}
        return {name: PoolLoad(in_flight=p.in_flight, replicas=len(p.replicas)) for name, p in self.pools.items()}

    def _views(
        self,
        pool: _Pool,
        snapshot: dict[str, tuple[int, int, float]] | None,
        since_snap: dict[str, int],
    ) -> list[ReplicaView]:
        e = pool.config.engine
        views = []
        for r in pool.replicas:
            if snapshot is None:
                waiting, running, usage = r.stats()
                in_flight = 0
            else:
                waiting, running, usage = snapshot.get(r.replica_id, (0, 0, 0.0))
                in_flight = since_snap[r.replica_id]
            views.append(
                ReplicaView(
                    replica_id=r.replica_id,
                    num_waiting=waiting,
                    num_running=running,
                    kv_usage=usage,
                    max_num_seqs=e.max_num_seqs,
                    kv_capacity_blocks=pool.capacity_blocks,
                    in_flight=in_flight,
                )
            )
        return views

    def _finish(
        self,
        rep: ReplicaModel,
        seq: Seq,
        epoch: int,
        since_snap: dict[str, int],
        session_replica: dict[str, str],
    ) -> None:
        cached = rep.release_finished(seq)
        pool = self._pool_of[rep.replica_id]
        pool.in_flight -= 1
        if seq.epoch == epoch:
            since_snap[rep.replica_id] -= 1
        req = seq.req
        if req.session_id:
            session_replica[req.session_id] = rep.replica_id
        pool.policy.on_finished(_route_request(seq, self.trace.block_size), rep.replica_id, cached)

    def _result(self, seqs: Sequence[Seq | None], rejected: list[bool], spilled: list[bool], wall: float) -> SimResult:
        reqs = self.trace.requests
        kept = [r for r, rej in zip(reqs, rejected, strict=True) if not rej]
        accepted = Trace(self.trace.name, self.trace.block_size, kept)
        nothing = -1.0
        stats = []
        for r in self.replicas:
            stats.append(
                {
                    "replica": r.replica_id,
                    "pool": self._pool_of[r.replica_id].config.name,
                    "requests": r.requests,
                    "routed_tokens": r.routed_tokens,
                    "prefill_tokens": r.prefill_tokens,
                    "decode_tokens": r.decode_tokens,
                    "emitted_tokens": r.emitted_tokens,
                    "busy_s": r.busy_s,
                    "steps": r.steps,
                    "preemptions": r.preemptions,
                    "evictions": r.kv.evictions,
                    "kv_capacity_blocks": r.kv.capacity,
                }
            )
        return SimResult(
            policy=self.policy_name,
            trace=self.trace.name,
            block_size=self.trace.block_size,
            replicas={k: v for k, v in self.replica_counts.items() if v},
            arrival=[r.arrival_s for r in reqs],
            first_token=[s.first_token_s if s else nothing for s in seqs],
            finish=[self._client_finish(s) if s else nothing for s in seqs],
            prompt_tokens=[r.prompt_tokens for r in reqs],
            output_tokens=[r.output_tokens for r in reqs],
            prompt_blocks=[len(r.block_ids) for r in reqs],
            hit_blocks=[s.hit_blocks if s else 0 for s in seqs],
            hit_tokens=[s.hit_tokens if s else 0 for s in seqs],
            preemptions=[s.preemptions if s else 0 for s in seqs],
            pool=[self._pool_of[s.replica].config.name if s else "" for s in seqs],
            replica=[s.replica if s else "" for s in seqs],
            rejected=list(rejected),
            spilled=list(spilled),
            replica_stats=stats,
            ceiling=accepted.stats(),
            wall_s=wall,
            step_time_notes=list(self.step_time_notes),
        )

    def _client_finish(self, seq: Seq) -> float:
        """When the client has the last token: the engine's last step, less the stream
        lead (later tokens travel back faster than the first), never before the first."""
        lead = self.stream_lead_s[seq.index]
        if seq.finish_s < 0 or lead == 0:
            return seq.finish_s
        return max(seq.first_token_s, seq.finish_s - lead)


def _route_request(seq: Seq, block_size: int, affinity_replica: str | None = None) -> RouteRequest:
    """What the routing policy sees of a simulated request (as the gateway's hint).

    On a ceiling fleet (`cache` "perfect" or "pooled"), only the part it prefills: every
    replica holds the rest, so a policy then balances the work each request really costs
    (no prefix or session of it is worth more on one replica than on another)."""
    req = seq.req
    if seq.free_tokens:
        free_blocks = min(seq.free_tokens, req.prompt_tokens - 1) // block_size
        return RouteRequest(
            request_id=req.request_id,
            prompt_tokens=req.prompt_tokens - free_blocks * block_size,
            block_hashes=seq.hashes[free_blocks:],
            max_tokens=req.output_tokens,
            session_id=req.session_id,
            arrival_s=seq.arrival_s,
        )
    return RouteRequest(
        request_id=req.request_id,
        prompt_tokens=req.prompt_tokens,
        block_hashes=seq.hashes,
        max_tokens=req.output_tokens,
        session_id=req.session_id,
        affinity_replica=affinity_replica,
        arrival_s=seq.arrival_s,  # routed on arrival, on the simulator's clock
    )
