"""The simulator on a changing fleet (bench/sim/fleet.py) and the traffic shapes
(bench/sim/traffic_shapes.py): the policy objects decide inside Serve's rules, replicas serve
only after their cold start and leave only after draining, nodes are billed whole."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.sim.fleet import FleetController, FleetReplica, fixed_gpu_hours
from bench.sim.simulator import ClusterSimulator, SimResult
from bench.sim.traffic_shapes import apply_shape, load_series, make_shape, repeat_trace
from bench.traces import SyntheticSpec, Trace, TraceRequest, synthetic_multiturn
from cluster.config import ClusterConfig
from cluster.profiles import load_profile


def small_cfg(profile: str = "h100x8-bf16", policy: str = "ongoing-requests") -> ClusterConfig:
    cfg = load_profile(profile)
    for p in cfg.pools:
        p.min_replicas, p.max_replicas, p.initial_replicas = 1, 4, 1
        a = p.autoscaling
        a.policy = policy  # type: ignore[assignment]
        a.target_ongoing_requests = 4
        a.upscale_delay_s, a.downscale_delay_s = 10.0, 60.0
    return ClusterConfig.model_validate(cfg.model_dump())


def busy_trace(seed: int = 0) -> Trace:
    spec = SyntheticSpec(
        conversations=400,
        conversation_rate_per_s=0.5,
        mean_turns=3,
        system_prompt_tokens=1024,
        mean_output_tokens=120,
        mean_think_s=5.0,
        max_prompt_tokens=30000,
        seed=seed,
    )
    return apply_shape(
        synthetic_multiturn(spec), make_shape("burst", burst_factor=4.0, burst_start=0.1, burst_length=0.25)
    )


def run(cfg: ClusterConfig, trace: Trace, **fleet_args: float) -> tuple[FleetController, SimResult]:
    fleet = FleetController(cfg, **fleet_args)
    sim = ClusterSimulator(
        cfg, trace, policy="cache-aware", replicas=fleet.initial_replicas(), replica_factory=FleetReplica, fleet=fleet
    )
    fleet.attach(sim)
    return fleet, sim.run(check=True)  # check: every replica ends empty, caches consistent


@pytest.mark.parametrize("policy", ["ongoing-requests", "queue-kv", "slo"])
def test_a_burst_scales_out_and_new_replicas_serve_only_once_ready(policy: str) -> None:
    cfg = small_cfg(policy=policy)
    fleet, res = run(cfg, busy_trace(), cold_start_override_s=60.0)
    pf = fleet.pools["standard"]
    assert max(target for _, target, *_ in pf.timeline) > 1, pf.timeline
    assert all(f >= 0 for f in res.finish)  # nothing lost
    started = [life for life in fleet.lives.values() if life.asked_s > 0]
    assert started
    for life in started:
        assert life.ready_s - life.asked_s == pytest.approx(60.0)
    for rid, arrival in zip(res.replica, res.arrival, strict=True):
        assert fleet.lives[rid].ready_s <= arrival, (rid, arrival, fleet.lives[rid])


def test_scale_down_drains_before_a_replica_goes() -> None:
    cfg = small_cfg()
    fleet, res = run(cfg, busy_trace(), cold_start_override_s=30.0)
    drained = [life for life in fleet.lives.values() if life.drain_s is not None]
    assert drained, "the burst's end should scale the pool back in"
    for life in drained:
        assert life.stopped_s is not None and life.drain_s is not None
        assert life.stopped_s >= life.drain_s
        mine = [i for i, rid in enumerate(res.replica) if rid == life.replica_id]
        # No request routed after the drain began, every one finished before it stopped.
        assert all(res.arrival[i] < life.drain_s for i in mine)
        assert all(res.finish[i] <= life.stopped_s for i in mine)


def test_nodes_are_billed_whole_and_shared_by_tp4_replicas() -> None:
    cfg = small_cfg("h100x4-fp8")  # two TP=4 replicas per 8-GPU node
    fleet, res = run(cfg, busy_trace(), node_idle_timeout_s=1e9)
    end = max(res.finish)
    standard = [n for n in fleet.nodes if n.pool == "standard"]
    lives = [life for life in fleet.lives.values() if life.pool == "standard"]
    assert len(lives) > 2 and len(standard) >= 2  # the pool outgrew one node
    for node in standard:  # never more replicas on a node at once than it has slots
        spans = [
            (lf.asked_s, lf.stopped_s if lf.stopped_s is not None else end) for lf in lives if lf.node == node.node_id
        ]
        for t, _ in spans:
            assert sum(1 for a, b in spans if a <= t < b) <= 2
    # A replica placed next to another on a node that is up skips node provisioning.
    start = fleet.pools["standard"].start
    for life in lives:
        if life.asked_s > 0:
            node = next(n for n in standard if n.node_id == life.node)
            expected = max(life.asked_s, node.up_s) + start.on_free_slot_s
            assert life.ready_s == pytest.approx(expected)
    hours = fleet.gpu_hours(end)["standard"]
    assert hours == pytest.approx(sum((end - n.provisioned_s) * 8 / 3600 for n in standard))
    # A fixed fleet: whole nodes for the whole run.
    assert fixed_gpu_hours(cfg, {"standard": 3, "long": 1}, 3600.0) == {"standard": 16.0, "long": 8.0}


def test_traffic_shapes_move_arrivals_and_keep_requests() -> None:
    # Steady arrivals, one every 0.5 s.
    base = Trace("steady", 512, [TraceRequest(f"r{i}", i * 0.5, 600, 20, (i, i + 10**6)) for i in range(2000)])
    for name in ("flat", "diurnal", "burst", "ramp"):
        shaped = apply_shape(base, make_shape(name))
        assert [r.request_id for r in shaped.requests] == [r.request_id for r in base.requests]
        arrivals = [r.arrival_s for r in shaped.requests]
        assert arrivals == sorted(arrivals)
    flat = apply_shape(base, make_shape("flat"))
    assert flat.duration_s == pytest.approx(base.duration_s, rel=1e-3)
    burst = apply_shape(base, make_shape("burst", burst_factor=3.0, burst_start=0.4, burst_length=0.2))
    D = burst.duration_s
    inside = sum(1 for r in burst.requests if 0.45 * D <= r.arrival_s < 0.55 * D) / (0.1 * D)
    outside = sum(1 for r in burst.requests if 0.05 * D <= r.arrival_s < 0.35 * D) / (0.3 * D)
    assert inside / outside == pytest.approx(3.0, rel=0.25)
    ramp = apply_shape(base, make_shape("ramp", ramp_low=0.5, ramp_high=2.0))
    series = load_series(ramp, window_s=ramp.duration_s / 4)
    assert series[3][1] > 2 * series[0][1]  # (a 5th window holds only the last arrival)
    assert apply_shape(base, make_shape("flat"), rate_scale=2.0).duration_s == pytest.approx(
        base.duration_s / 2, rel=1e-3
    )
    with pytest.raises(ValueError, match="unknown shape"):
        make_shape("weekly")


def test_repeated_trace_copies_never_hit_each_other() -> None:
    base = synthetic_multiturn(SyntheticSpec(conversations=50, seed=1))
    twice = repeat_trace(base, 2)
    assert len(twice) == 2 * len(base)
    assert twice.duration_s > 2 * base.duration_s
    assert twice.stats().block_hit_ceiling == pytest.approx(base.stats().block_hit_ceiling, rel=1e-6)


def test_capacity_planner_finds_the_smallest_fixed_fleet_and_prices_it() -> None:
    from bench.sim.capacity_plan import cost_per_million, min_fixed_fleet

    cfg = small_cfg()
    trace = busy_trace()
    fleet, row, met = min_fixed_fleet(cfg, trace, slo_target=0.95)
    assert met and row["slo_attainment"] >= 0.95
    from bench.sim.autoscale_eval import run_fleet

    for pool, n in fleet.items():
        if n > 1:  # one replica fewer in any pool misses the target
            assert run_fleet(cfg, trace, fixed={**fleet, pool: n - 1})["slo_attainment"] < 0.95
    # $20 over 1M input + 1M output tokens, split 1:3 like the API's $2 / $6.
    assert cost_per_million(10.0, 2.0, 1_000_000, 1_000_000) == pytest.approx((5.0, 15.0))


def test_a_target_sweep_names_one_target_per_pool_in_config_order() -> None:
    from bench.sim.autoscale_eval import parse_target_sweep, with_targets

    sweep = parse_target_sweep("4/1,5.5/2", ["standard", "long"])
    assert sweep == [{"standard": 4.0, "long": 1.0}, {"standard": 5.5, "long": 2.0}]
    cfg = with_targets(small_cfg(), sweep[1])
    assert [p.autoscaling.target_ongoing_requests for p in cfg.pools] == [5.5, 2.0]
    for bad in ("4", "4/1/1", "0/1"):
        with pytest.raises(ValueError, match="one positive value per pool"):
            parse_target_sweep(bad, ["standard", "long"])


def test_the_cold_start_sweep_plot_is_written(tmp_path: Path) -> None:
    from bench.sim.autoscale_eval import plot_cold_start_sweep

    rows = [
        {"policy": p, "cold_start_override_s": c, "slo_attainment": a, "stalled_by_cold_start": n}
        for p, c, a, n in [("slo", 30.0, 0.998, 6), ("slo", 240.0, 0.99, 40), ("ongoing-requests", 30.0, 0.996, 15)]
    ]
    path = plot_cold_start_sweep(rows, tmp_path / "sweep.png", "sweep")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
