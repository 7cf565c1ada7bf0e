"""A changing fleet for the cluster simulator: per pool, the pool's autoscaling policy
object (the one Serve would load, `deployments.serve_autoscaling.make_policy`) decides
inside Serve's rules (`autoscaling.serve_rules`), replicas start after their cold start
and drain before they go, and GPU nodes come and go as KubeRay would run them.

Metrics, as Ray 2.60 collects them: each running replica records a point every
0.2 x `metrics_interval_s` (ongoing requests = engine waiting + running, and the custom
metrics of `record_autoscaling_stats()`: num_waiting, num_running, kv_usage,
queue_wait_s, arrival_rate) and pushes them every `metrics_interval_s`; the controller
averages each replica's points over `look_back_period_s` back from the last push.
The controller ticks every `control_period_s` (Serve: 0.1 s; 1 s here, which only
rounds the delays).

Replicas and nodes: a pool's nodes hold `replicas_per_node` replicas (8 GPUs / TP).
A new replica goes to a node of its pool with a free slot (ready after weight load +
engine start, counted from when that node is up) or to a new node (node provisioning
first). Scale-down cancels starting replicas first (newest first), then drains the
running replicas with the fewest ongoing requests: no new requests, released when the
last one finishes. A node without replicas is released after `node_idle_timeout_s`
(the chart's `workers.idleTimeoutSeconds`). GPU-hours count nodes from provisioning to
release (or the end of the run), all their GPUs: what a cloud bills.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from autoscaling.cold_start import ColdStart, cold_start
from autoscaling.engine_metrics import QueueWaitMeter
from autoscaling.serve_rules import PolicyContext, ScalingRules, ServeAutoscaler
from bench.sim.replica_model import ReplicaModel, Seq
from bench.sim.simulator import ClusterSimulator
from cluster.config import ClusterConfig, PoolConfig
from deployments.serve_autoscaling import make_policy, serve_autoscaling_config

# Ray 2.60: replicas record a metrics point every metrics_interval_s x this factor.
RECORD_INTERVAL_FACTOR = 0.2
# The chart's workers.idleTimeoutSeconds.
DEFAULT_NODE_IDLE_TIMEOUT_S = 900.0


class FleetReplica(ReplicaModel):
    """A simulated engine that also measures what its record_autoscaling_stats() reports
    (autoscaling/engine_metrics.py, as the real engine does)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._now = 0.0
        self.meter = QueueWaitMeter(0.0)
        self._admitted: list[tuple[str, float, float]] = []  # since the last report

    def start_step(self, now: float, bound: float) -> float:
        self._now = now
        return super().start_step(now, bound)

    def _admit(self, seq: Seq, budget: int) -> int:
        first = not seq.admitted
        n = super()._admit(seq, budget)
        if n and first:
            self._admitted.append((seq.req.request_id, seq.arrival_s, self._now))
        return n

    def take_metrics(self, now: float) -> dict[str, float]:
        """One recorded point; resets the interval."""
        # Requests admitted and finished within the interval count too (vLLM reports
        # them from the same per-request timestamps).
        still = [(s.req.request_id, s.arrival_s, 0.0) for s in self.waiting if not s.admitted]
        figures = self.meter.report([*self._admitted, *still], now)
        self._admitted = []
        return {
            "ongoing": float(len(self.waiting) + len(self.running)),
            "num_waiting": float(len(self.waiting)),
            "num_running": float(len(self.running)),
            "kv_usage": self.kv.usage(),
            **figures,
        }


@dataclass
class Node:
    node_id: str
    pool: str
    gpus: int
    slots: int
    provisioned_s: float  # provisioning started (billing starts)
    up_s: float  # ready for replicas
    replicas: set[str] = field(default_factory=set)
    empty_since: float | None = None
    released_s: float | None = None


@dataclass
class Life:
    """One replica's lifetime, for the report."""

    replica_id: str
    pool: str
    node: str
    asked_s: float
    ready_s: float
    drain_s: float | None = None
    stopped_s: float | None = None


@dataclass
class PoolFleet:
    config: PoolConfig
    autoscaler: ServeAutoscaler
    rules: ScalingRules
    start: ColdStart
    per_node: int
    gpus_per_node: int
    target: int
    running: list[ReplicaModel] = field(default_factory=list)
    starting: list[tuple[float, ReplicaModel]] = field(default_factory=list)  # (ready time, replica)
    draining: set[str] = field(default_factory=set)
    points: dict[str, deque[tuple[float, dict[str, float]]]] = field(default_factory=dict)
    pushed_until: float = 0.0
    last_up: float | None = None
    last_down: float | None = None
    # (time, target, running, starting, draining) after every change, for plots.
    timeline: list[tuple[float, int, int, int, int]] = field(default_factory=list)
    decisions: int = 0


class FleetController:
    """The FleetHook the simulator drives; see the module docstring."""

    def __init__(
        self,
        cfg: ClusterConfig,
        *,
        control_period_s: float = 1.0,
        node_idle_timeout_s: float = DEFAULT_NODE_IDLE_TIMEOUT_S,
        cold_start_override_s: float | None = None,
    ) -> None:
        self.cfg = cfg
        self.control_period_s = control_period_s
        self.node_idle_timeout_s = node_idle_timeout_s
        self.pools: dict[str, PoolFleet] = {}
        self.nodes: list[Node] = []
        self.lives: dict[str, Life] = {}
        self._node_of: dict[str, Node] = {}
        gpu = cfg.node.accelerator == "gpu"
        for pool in cfg.pools:
            if pool.min_replicas < 1:
                raise ValueError(f"pool {pool.name!r}: the fleet simulation needs min_replicas >= 1 (no scale to zero)")
            rules = ScalingRules.from_serve_config(serve_autoscaling_config(cfg, pool))
            start = cold_start(cfg, pool)
            if cold_start_override_s is not None:
                # A sweep point: asking for a replica to serving takes this long, node included.
                start = ColdStart(0.0, 0.0, cold_start_override_s)
            tp = pool.engine.tensor_parallel_size
            self.pools[pool.name] = PoolFleet(
                config=pool,
                autoscaler=ServeAutoscaler(make_policy(cfg, pool), rules),
                rules=rules,
                start=start,
                per_node=max(1, cfg.node.gpus_per_node // tp) if gpu else 1,
                gpus_per_node=cfg.node.gpus_per_node if gpu else 0,
                target=pool.start_replicas,
            )
        self._next_tick = 0.0
        self._next_record = 0.0
        self._next_push = 0.0
        self._record_period = min(p.rules.metrics_interval_s for p in self.pools.values()) * RECORD_INTERVAL_FACTOR
        self._push_period = min(p.rules.metrics_interval_s for p in self.pools.values())
        self.end_s = 0.0

    # -- set-up ---------------------------------------------------------------------------

    def initial_replicas(self) -> dict[str, int]:
        return {name: pf.target for name, pf in self.pools.items()}

    def attach(self, sim: ClusterSimulator) -> None:
        """Register the replicas the simulator started with (ready at 0, on nodes up at 0)."""
        for name, pf in self.pools.items():
            for rep in sim.pools[name].replicas:
                node = self._node_for(name, 0.0, provisioned=True)
                self._place(rep, node, 0.0, 0.0)
                pf.running.append(rep)
            pf.timeline.append((0.0, pf.target, len(pf.running), 0, 0))

    # -- FleetHook ------------------------------------------------------------------------

    def next_event_s(self) -> float:
        t = min(self._next_tick, self._next_record)
        for pf in self.pools.values():
            if pf.starting:
                t = min(t, min(ready for ready, _ in pf.starting))
        return t

    def on_arrival(self, now: float, replica: ReplicaModel) -> None:
        if isinstance(replica, FleetReplica):
            replica.meter.on_request()

    def on_drained(self, now: float, replica: ReplicaModel) -> None:
        rid = replica.replica_id
        for pf in self.pools.values():
            if rid in pf.draining:
                pf.draining.discard(rid)
                self._stop(pf, rid, now)

    def on_event(self, now: float, sim: ClusterSimulator) -> None:
        self.end_s = max(self.end_s, now)
        for pf in self.pools.values():
            ready = [(t, r) for t, r in pf.starting if t <= now]
            if ready:
                pf.starting = [(t, r) for t, r in pf.starting if t > now]
                for _, rep in ready:
                    if isinstance(rep, FleetReplica):
                        rep.meter = QueueWaitMeter(now)  # its rate counts from when it serves
                    sim.make_routable(rep)
                    pf.running.append(rep)
                self._mark(pf, now)
        if now >= self._next_record:
            self._record(now)
            self._next_record = now + self._record_period
        if now >= self._next_push:
            for pf in self.pools.values():
                pf.pushed_until = now
            self._next_push = now + self._push_period
        if now >= self._next_tick:
            for pf in self.pools.values():
                self._decide(pf, now, sim)
            self._release_idle_nodes(now)
            self._next_tick = now + self.control_period_s

    # -- metrics and decisions ------------------------------------------------------------

    def _record(self, now: float) -> None:
        for pf in self.pools.values():
            for rep in pf.running:
                if isinstance(rep, FleetReplica):
                    point = rep.take_metrics(now)
                else:
                    w, r, kv = rep.stats()
                    point = {"ongoing": float(w + r), "num_waiting": float(w), "num_running": float(r), "kv_usage": kv}
                pf.points.setdefault(rep.replica_id, deque()).append((now, point))

    def context(self, pf: PoolFleet, now: float) -> PolicyContext:
        """What Serve's controller hands the policy: look-back means per running replica
        of the points pushed so far."""
        lo = pf.pushed_until - pf.rules.look_back_period_s
        total = 0.0
        custom: dict[str, dict[str, float]] = {}
        for rep in pf.running:
            pts = pf.points.get(rep.replica_id)
            if not pts:
                continue
            while pts and pts[0][0] < lo:
                pts.popleft()
            window = [p for t, p in pts if t <= pf.pushed_until]
            if not window:
                continue
            for key in window[0]:
                mean = sum(p[key] for p in window) / len(window)
                if key == "ongoing":
                    total += mean
                else:
                    custom.setdefault(key, {})[rep.replica_id] = mean
        return PolicyContext(
            current_num_replicas=len(pf.running),
            target_num_replicas=pf.target,
            total_num_requests=total,
            aggregated_metrics=custom,
            config=pf.rules,
            current_time=now,
            running_replicas=[r.replica_id for r in pf.running],
            last_scale_up_time=pf.last_up,
            last_scale_down_time=pf.last_down,
        )

    def _decide(self, pf: PoolFleet, now: float, sim: ClusterSimulator) -> None:
        decision = pf.autoscaler.decide(self.context(pf, now))
        pf.decisions += 1
        if decision > pf.target:
            for _ in range(decision - pf.target):
                self._start_replica(pf, now, sim)
            pf.last_up = now
        elif decision < pf.target:
            for _ in range(pf.target - decision):
                self._remove_replica(pf, now, sim)
            pf.last_down = now
        else:
            return
        pf.target = decision
        self._mark(pf, now)

    def _start_replica(self, pf: PoolFleet, now: float, sim: ClusterSimulator) -> None:
        name = pf.config.name
        rep = sim.add_replica(name)
        node = self._node_for(name, now, provisioned=False)
        ready = max(now, node.up_s) + pf.start.on_free_slot_s
        self._place(rep, node, now, ready)
        pf.starting.append((ready, rep))

    def _remove_replica(self, pf: PoolFleet, now: float, sim: ClusterSimulator) -> None:
        if pf.starting:
            pf.starting.sort(key=lambda x: x[0])
            _, rep = pf.starting.pop()  # the one that would be ready last
            self._stop(pf, rep.replica_id, now)
            return
        if len(pf.running) <= 1:
            return
        rep = min(pf.running, key=lambda r: len(r.waiting) + len(r.running))
        pf.running = [r for r in pf.running if r is not rep]
        pf.points.pop(rep.replica_id, None)
        self.lives[rep.replica_id].drain_s = now
        if sim.stop_routing(rep):
            self._stop(pf, rep.replica_id, now)
        else:
            pf.draining.add(rep.replica_id)

    def _mark(self, pf: PoolFleet, now: float) -> None:
        pf.timeline.append((now, pf.target, len(pf.running), len(pf.starting), len(pf.draining)))

    # -- nodes ------------------------------------------------------------------------------

    def _node_for(self, pool: str, now: float, provisioned: bool) -> Node:
        pf = self.pools[pool]
        for node in self.nodes:
            if node.pool == pool and node.released_s is None and len(node.replicas) < node.slots:
                return node
        up = now if provisioned else now + pf.start.node_provision_s
        node = Node(f"{pool}-node{len(self.nodes)}", pool, pf.gpus_per_node, pf.per_node, now, up)
        self.nodes.append(node)
        return node

    def _place(self, rep: ReplicaModel, node: Node, asked: float, ready: float) -> None:
        node.replicas.add(rep.replica_id)
        node.empty_since = None
        self._node_of[rep.replica_id] = node
        self.lives[rep.replica_id] = Life(rep.replica_id, node.pool, node.node_id, asked, ready)

    def _stop(self, pf: PoolFleet, rid: str, now: float) -> None:
        self.lives[rid].stopped_s = now
        node = self._node_of.pop(rid)
        node.replicas.discard(rid)
        if not node.replicas:
            node.empty_since = now
        self._mark(pf, now)

    def _release_idle_nodes(self, now: float) -> None:
        for node in self.nodes:
            if node.released_s is None and node.empty_since is not None:
                if now - node.empty_since >= self.node_idle_timeout_s:
                    node.released_s = now

    # -- report -----------------------------------------------------------------------------

    def gpu_hours(self, end_s: float) -> dict[str, float]:
        """Per pool: GPU-hours of its nodes from provisioning to release or `end_s`."""
        out = {name: 0.0 for name in self.pools}
        for node in self.nodes:
            stop = node.released_s if node.released_s is not None else end_s
            out[node.pool] += max(0.0, min(stop, end_s) - node.provisioned_s) * node.gpus / 3600.0
        return out

    def node_hours(self, end_s: float) -> dict[str, float]:
        out = {name: 0.0 for name in self.pools}
        for node in self.nodes:
            stop = node.released_s if node.released_s is not None else end_s
            out[node.pool] += max(0.0, min(stop, end_s) - node.provisioned_s) / 3600.0
        return out

    def starting_at(self, pool: str, t: float) -> bool:
        """Whether a replica of `pool` had been asked for but was not serving yet at t."""
        for life in self.lives.values():
            if (
                life.pool == pool
                and life.asked_s <= t < life.ready_s
                and (life.stopped_s is None or life.stopped_s > t)
            ):
                return True
        return False

    def replicas_series(self, pool: str) -> list[tuple[float, int, int, int, int]]:
        return list(self.pools[pool].timeline)


def fixed_gpu_hours(cfg: ClusterConfig, replicas: dict[str, int], end_s: float) -> dict[str, float]:
    """GPU-hours of a fixed fleet over [0, end_s]: whole nodes per pool."""
    out: dict[str, float] = {}
    for pool in cfg.pools:
        n = replicas.get(pool.name, 0)
        if cfg.node.accelerator != "gpu":
            out[pool.name] = 0.0
            continue
        per_node = max(1, cfg.node.gpus_per_node // pool.engine.tensor_parallel_size)
        out[pool.name] = math.ceil(n / per_node) * cfg.node.gpus_per_node * end_s / 3600.0
    return out
