"""`cluster bench autoscale`: autoscaling policies on shaped traffic, in the simulator.

    cluster bench autoscale --trace ../shared/traces/mooncake_conversation.jsonl \\
        --profile h100x8-bf16 --shape diurnal,burst --policy all --out out/autoscale

Per (shape, policy): the trace replayed under the shape (bench/sim/traffic_shapes.py) on a
changing fleet (bench/sim/fleet.py) where each pool's autoscaling policy object decides as
in Serve, plus two fixed fleets as references: `fixed-peak` (per pool, the most
replicas any autoscaled run used) and `fixed-mean` (the time-mean of the
`ongoing-requests` run's fleet, rounded up). Figures per run: GPU-hours (whole nodes,
provisioning to release), SLO attainment (bench/sim/slo.py: TTFT <= max(2 s, 1.5 x own
no-cache floor), TPOT <= 100 ms), TTFT p50/p99, requests stalled by cold starts (SLO
missed while a replica of their pool was starting), scale-ups. Writes results.json (one
run per policy and shape), table.txt and replicas_<shape>.png (replicas over time next
to the load). `--cold-start-sweep 30,60,120,240,480` reruns one policy with the replica
start time (ask to serving, node included) forced to each value. `--target-sweep 4/1,5/1`
reruns one policy on every shape with `target_ongoing_requests` set to each value (per
pool, in the config's order); `--no-fixed-peak` skips sizing the peak fleet (the costly
reference) when only the sweep is wanted.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.traces import Trace

AUTOSCALING_POLICIES = ("ongoing-requests", "queue-kv", "slo")
_JOB: dict[str, Any] = {}


def with_policy(cfg: Any, policy: str) -> Any:
    """A copy of the config with every pool on `policy`."""
    out = cfg.model_copy(deep=True)
    for p in out.pools:
        p.autoscaling.policy = policy
    return out


def with_bounds(cfg: Any, bounds: dict[str, tuple[int, int]]) -> Any:
    out = cfg.model_copy(deep=True)
    for p in out.pools:
        if p.name in bounds:
            lo, hi = bounds[p.name]
            p.min_replicas, p.max_replicas, p.initial_replicas = lo, hi, lo
    return type(cfg).model_validate(out.model_dump())


def with_targets(cfg: Any, targets: dict[str, float]) -> Any:
    """A copy with each pool's target_ongoing_requests set (what all three policies'
    ongoing-requests term divides by)."""
    out = cfg.model_copy(deep=True)
    for p in out.pools:
        if p.name in targets:
            p.autoscaling.target_ongoing_requests = targets[p.name]
    return out


def calibrated_targets(row: dict[str, Any]) -> dict[str, float]:
    """target_ongoing_requests per pool from a fixed fleet that meets the SLO: the
    requests in flight per replica it carried (rounded to 0.5)."""
    return {name: max(1.0, round(v * 2) / 2) for name, v in row["ongoing_per_replica"].items()}


def with_initial(cfg: Any, initial: dict[str, int]) -> Any:
    out = cfg.model_copy(deep=True)
    for p in out.pools:
        if p.name in initial:
            p.initial_replicas = max(p.min_replicas, min(p.max_replicas, initial[p.name]))
    return out


def run_fleet(
    cfg: Any,
    trace: Trace,
    *,
    router: str | None = None,
    fixed: dict[str, int] | None = None,
    cold_start_override_s: float | None = None,
    node_idle_timeout_s: float | None = None,
    seed: int = 0,
    keep_result: list[Any] | None = None,
) -> dict[str, Any]:
    """One simulated run on an autoscaled fleet (or a fixed one) and its figures."""
    from bench.sim.fleet import DEFAULT_NODE_IDLE_TIMEOUT_S, FleetController, FleetReplica, fixed_gpu_hours
    from bench.sim.metrics import latency_summary
    from bench.sim.simulator import ClusterSimulator, default_step_time
    from bench.sim.slo import FloorTable, RequestSLO, meets_slo

    started = time.perf_counter()
    router = router or cfg.router.policy
    fleet = None
    if fixed is None:
        fleet = FleetController(
            cfg,
            cold_start_override_s=cold_start_override_s,
            node_idle_timeout_s=DEFAULT_NODE_IDLE_TIMEOUT_S if node_idle_timeout_s is None else node_idle_timeout_s,
        )
        replicas = fleet.initial_replicas()
    else:
        replicas = dict(fixed)
    sim = ClusterSimulator(
        cfg, trace, policy=router, replicas=replicas, seed=seed, replica_factory=FleetReplica, fleet=fleet
    )
    if fleet is not None:
        fleet.attach(sim)
    res = sim.run()
    if keep_result is not None:
        keep_result.append(res)
    done = [f for f in res.finish if f >= 0]
    end = max(done) if done else 0.0
    floors = FloorTable(
        {p.name: default_step_time(cfg, p) for p in cfg.pools},
        {p.name: p.engine.max_num_batched_tokens for p in cfg.pools},
    )
    slo = RequestSLO()
    ok: list[bool] = []
    stalled = 0
    for i in range(len(res.arrival)):
        if res.rejected[i]:
            ok.append(False)
            continue
        met = meets_slo(
            slo,
            res.arrival[i],
            res.first_token[i],
            res.finish[i],
            res.output_tokens[i],
            floors.floor_s(res.pool[i], res.prompt_tokens[i]),
        )
        ok.append(met)
        if not met and fleet is not None and fleet.starting_at(res.pool[i], res.arrival[i]):
            stalled += 1
    lat = latency_summary(res.arrival, res.first_token, res.finish, res.output_tokens)
    if fleet is not None:
        gpu_hours = fleet.gpu_hours(end)
        series = {name: fleet.replicas_series(name) for name in fleet.pools}
        scale_ups = {
            name: sum(1 for life in fleet.lives.values() if life.pool == name and life.asked_s > 0)
            for name in fleet.pools
        }
        cold = {
            name: {"free_slot_s": pf.start.on_free_slot_s, "new_node_s": pf.start.on_new_node_s}
            for name, pf in fleet.pools.items()
        }
    else:
        gpu_hours = fixed_gpu_hours(cfg, replicas, end)
        series = {name: [(0.0, n, n, 0, 0)] for name, n in replicas.items()}
        scale_ups = {name: 0 for name in replicas}
        cold = {}
    replicas_mean = {name: _time_mean(s, end) for name, s in series.items()}
    replicas_max = {name: max(x[2] for x in s) for name, s in series.items()}
    # Requests in flight per serving replica (Little: sum of time in system / time).
    in_system = {name: 0.0 for name in series}
    for a, f, pool in zip(res.arrival, res.finish, res.pool, strict=True):
        if f >= 0 and pool in in_system:
            in_system[pool] += f - a
    ongoing_per_replica = {
        name: in_system[name] / end / replicas_mean[name] if end > 0 and replicas_mean[name] > 0 else 0.0
        for name in series
    }
    in_tok = sum(res.prompt_tokens[i] for i in range(len(res.arrival)) if res.finish[i] >= 0)
    out_tok = sum(res.output_tokens[i] for i in range(len(res.arrival)) if res.finish[i] >= 0)
    return {
        "router": router,
        "requests": len(res.arrival),
        "rejected": sum(res.rejected),
        "makespan_s": end,
        "gpu_hours": sum(gpu_hours.values()),
        "gpu_hours_per_pool": gpu_hours,
        "slo_attainment": sum(ok) / len(ok) if ok else math.nan,
        "ttft_p50_s": lat["ttft_p50_s"],
        "ttft_p99_s": lat["ttft_p99_s"],
        "tpot_p99_ms": lat["tpot_p99_ms"],
        "stalled_by_cold_start": stalled,
        "scale_ups": scale_ups,
        "replicas_mean": replicas_mean,
        "replicas_max": replicas_max,
        "replicas_series": series,
        "cold_start": cold,
        "ongoing_per_replica": ongoing_per_replica,
        "input_tokens": in_tok,
        "output_tokens": out_tok,
        "sim_wall_s": time.perf_counter() - started,
    }


def _time_mean(series: list[tuple[float, int, int, int, int]], end: float) -> float:
    """Time-mean of the running replicas of a (time, target, running, ...) series."""
    if end <= 0 or not series:
        return float(series[-1][2]) if series else 0.0
    total = 0.0
    for (t0, _, n, _, _), (t1, *_rest) in zip(series, [*series[1:], (end, 0, 0, 0, 0)], strict=True):
        total += n * max(0.0, min(t1, end) - min(t0, end))
    return total / end


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", required=True, help="Mooncake JSONL or Azure CSV")
    p.add_argument("--profile", default="h100x8-bf16")
    p.add_argument("--config", default=None, help="a ClusterConfig YAML instead of --profile")
    p.add_argument("--shape", default="diurnal", help="comma list of flat, diurnal, burst, ramp, or 'all'")
    p.add_argument("--policy", default="all", help="'all' or a comma list of " + ", ".join(AUTOSCALING_POLICIES))
    p.add_argument("--router", default=None, help="routing policy (default: the config's)")
    p.add_argument("--rate-scale", type=float, default=1.0, help="multiplies the whole shape")
    p.add_argument("--limit", type=int, default=None, help="only the first N requests")
    p.add_argument("--window-min", default=None, help="START:END minutes of the trace, e.g. 0:30")
    p.add_argument("--repeat", type=int, default=1, help="replay the trace N times back to back (a longer day)")
    p.add_argument("--pool-bounds", default=None, help="min:max replicas per pool, e.g. standard=2:16,long=1:8")
    p.add_argument("--cold-start-sweep", default=None, help="replica start times in s, e.g. 30,60,120,240,480")
    p.add_argument("--sweep-policy", default=None, help="policy of the sweep (default: the best by SLO attainment)")
    p.add_argument("--sweep-shape", default=None, help="shape of the cold-start sweep (default: the first)")
    p.add_argument(
        "--target-sweep",
        default=None,
        help="target_ongoing_requests per pool in config order, e.g. 4/1,5/1,6/1: reruns the sweep policy "
        "(default slo) on every shape at each",
    )
    p.add_argument("--no-fixed-peak", action="store_true", help="skip the fleet sized for the peak (a reference)")
    p.add_argument(
        "--slo-target", type=float, default=0.99, help="fraction of requests the fixed fleets must serve in SLO"
    )
    p.add_argument(
        "--targets",
        choices=["calibrated", "profile"],
        default="calibrated",
        help="target_ongoing_requests of the autoscaled runs: the profile's, or calibrated on the fixed fleet "
        "that meets the SLO at the mean load (requests in flight per replica)",
    )
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--out", default="out/autoscale")
    p.add_argument("--no-plots", action="store_true")


def load_window(path: str, limit: int | None, window_min: str | None) -> Trace:
    from bench.traces import read_trace

    trace = read_trace(path, limit=limit)
    if window_min:
        a, b = (float(x) * 60 for x in window_min.split(":"))
        from dataclasses import replace

        reqs = [replace(r, arrival_s=r.arrival_s - a) for r in trace.requests if a <= r.arrival_s < b]
        trace = Trace(f"{trace.name}[{window_min}min]", trace.block_size, reqs, trace.has_prefix_info, dict(trace.meta))
    return trace


def parse_bounds(text: str | None) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for part in (text or "").split(","):
        if part.strip():
            name, rng = part.split("=")
            lo, hi = rng.split(":")
            out[name.strip()] = (int(lo), int(hi))
    return out


Task = tuple[str, str, dict[str, int] | None, float | None, dict[str, float] | None]


def _one(task: Task) -> dict[str, Any]:
    shape, policy, fixed, cold, targets = task
    if policy.startswith("fixed"):
        cfg = _JOB["cfg"]
    else:
        auto = _JOB["auto_cfg"] if targets is None else with_targets(_JOB["auto_cfg"], targets)
        cfg = with_initial(with_policy(auto, policy), _JOB["start"][shape])
    row = run_fleet(cfg, _JOB["traces"][shape], router=_JOB["router"], fixed=fixed, cold_start_override_s=cold)
    row.update(
        shape=shape,
        policy=policy,
        cold_start_override_s=cold,
        target_ongoing_requests={p.name: p.autoscaling.target_ongoing_requests for p in cfg.pools},
    )
    label = "" if cold is None else f" start {cold:g}s"
    if targets is not None:
        label = " target " + "/".join(f"{v:g}" for v in targets.values())
    print(
        f"  {shape:8s} {policy:17s}{label:>14}  GPU-h {row['gpu_hours']:8.1f}  "
        f"SLO {row['slo_attainment']:6.1%}  TTFT p99 {row['ttft_p99_s']:7.2f}s  "
        f"stalled {row['stalled_by_cold_start']:5d}  "
        f"({row['sim_wall_s']:.0f} s)",
        flush=True,
    )
    return row


def parse_target_sweep(text: str | None, pools: list[str]) -> list[dict[str, float]]:
    """'4/1,5/1' -> [{standard: 4, long: 1}, {standard: 5, long: 1}] (values in pool order)."""
    out: list[dict[str, float]] = []
    for item in (text or "").split(","):
        if not item.strip():
            continue
        values = [float(v) for v in item.split("/")]
        if len(values) != len(pools) or min(values) <= 0:
            raise ValueError(f"--target-sweep item {item!r}: one positive value per pool ({'/'.join(pools)})")
        out.append(dict(zip(pools, values, strict=True)))
    return out


def _map(tasks: list[Any], jobs: int) -> list[dict[str, Any]]:
    if jobs <= 1 or len(tasks) <= 1:
        return [_one(t) for t in tasks]
    with mp.get_context("fork").Pool(min(jobs, len(tasks))) as pool:
        return pool.map(_one, tasks)


COLUMNS = [
    ("shape", "shape", "{}"),
    ("policy", "policy", "{}"),
    ("GPU-h", "gpu_hours", "{:.1f}"),
    ("SLO", "slo_attainment", "{:.1%}"),
    ("TTFT p50", "ttft_p50_s", "{:.2f}s"),
    ("p99", "ttft_p99_s", "{:.2f}s"),
    ("TPOT p99", "tpot_p99_ms", "{:.0f}ms"),
    ("stalled", "stalled_by_cold_start", "{}"),
    ("replicas mean", "replicas_mean_text", "{}"),
    ("max", "replicas_max_text", "{}"),
]


def format_table(rows: list[dict[str, Any]]) -> str:
    body = []
    for r in rows:
        r = dict(r)
        r["replicas_mean_text"] = "/".join(f"{v:.1f}" for v in r["replicas_mean"].values())
        r["replicas_max_text"] = "/".join(str(v) for v in r["replicas_max"].values())
        body.append([fmt.format(r[key]) for _, key, fmt in COLUMNS])
    header = [c[0] for c in COLUMNS]
    widths = [max(len(x) for x in col) for col in zip(header, *body, strict=True)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(x.rjust(w) for x, w in zip(row, widths, strict=True)) for row in body]
    return "\n".join(lines)


def plot_replicas(rows: list[dict[str, Any]], load: list[tuple[float, float]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pools = list(rows[0]["replicas_series"])
    fig, axes = plt.subplots(len(pools) + 1, 1, figsize=(11, 3 + 2.5 * len(pools)), sharex=True)
    axes[0].plot([t / 60 for t, _ in load], [v for _, v in load], color="black")
    axes[0].set_ylabel("arrivals (req/s)")
    axes[0].set_title(title)
    for ax, pool in zip(axes[1:], pools, strict=True):
        for r in rows:
            s = r["replicas_series"][pool]
            end = r["makespan_s"]
            xs = [t / 60 for t, *_ in s] + [end / 60]
            ys = [x[2] for x in s] + [s[-1][2]]
            ax.step(
                xs, ys, where="post", label=f"{r['policy']} ({r['slo_attainment']:.0%} SLO, {r['gpu_hours']:.0f} GPU-h)"
            )
        ax.set_ylabel(f"{pool}: serving replicas")
        ax.legend(fontsize=7, loc="upper left")
    axes[-1].set_xlabel("minutes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_cold_start_sweep(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """SLO attainment and requests stalled by cold starts against the replica start time,
    one line per policy (rows: run_fleet figures with `policy`, `cold_start_override_s`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for policy in dict.fromkeys(r["policy"] for r in rows):
        rs = sorted((r for r in rows if r["policy"] == policy), key=lambda r: r["cold_start_override_s"])
        xs = [r["cold_start_override_s"] for r in rs]
        top.plot(xs, [100 * r["slo_attainment"] for r in rs], marker="o", label=policy)
        bottom.plot(xs, [r["stalled_by_cold_start"] for r in rs], marker="o", label=policy)
    top.axhline(99, color="grey", linestyle="--", linewidth=0.8)
    top.set_ylabel("SLO attainment (%)")
    top.set_title(title)
    top.legend(fontsize=8)
    bottom.set_ylabel("requests stalled by cold starts")
    bottom.set_xlabel("replica start, ask to serving (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> int:
    from bench.sim.traffic_shapes import SHAPES, apply_shape, load_series, make_shape, repeat_trace
    from cluster.config import ClusterConfig
    from cluster.profiles import load_profile

    try:
        cfg = ClusterConfig.from_file(args.config) if args.config else load_profile(args.profile)
        bounds = parse_bounds(args.pool_bounds)
        if bounds:
            cfg = with_bounds(cfg, bounds)
        base = repeat_trace(load_window(args.trace, args.limit, args.window_min), args.repeat)
        shapes = list(SHAPES[1:]) if args.shape == "all" else [s.strip() for s in args.shape.split(",")]
        traces = {s: apply_shape(base, make_shape(s), args.rate_scale) for s in shapes}
        policies = list(AUTOSCALING_POLICIES) if args.policy == "all" else [p.strip() for p in args.policy.split(",")]
        bad = [p for p in policies if p not in AUTOSCALING_POLICIES]
        if bad:
            raise ValueError(f"unknown autoscaling policies {bad}; known: {AUTOSCALING_POLICIES}")
        sweep = [float(x) for x in args.cold_start_sweep.split(",")] if args.cold_start_sweep else []
        target_sweep = parse_target_sweep(args.target_sweep, [p.name for p in cfg.pools])
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not base.requests:
        print("error: no requests in the trace window", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"trace {base.name}: {len(base):,} requests over {base.duration_s / 60:.1f} min; profile {cfg.profile}; "
        f"pools " + ", ".join(f"{p.name} {p.min_replicas}-{p.max_replicas}" for p in cfg.pools)
    )
    for s, t in traces.items():
        print(f"  shape {s}: {t.meta.get('shape_describe')}, {t.duration_s / 60:.1f} min")
    started = time.perf_counter()
    # Fixed references at the SLO target (bench/sim/capacity_plan.py): sized for the shaped
    # trace (its peak decides) and for the flat trace at the same mean rate; the
    # autoscaled runs start at the fleet the first 10 minutes need (a fleet that has
    # followed the night, not a cold cluster).
    from bench.sim.capacity_plan import START_WINDOW_S, head_window, min_fixed_fleet

    def size(trace: Trace) -> dict[str, int]:
        return min_fixed_fleet(cfg, trace, slo_target=args.slo_target, router=args.router)[0]

    mean_fleet, mean_row, _ = min_fixed_fleet(
        cfg, apply_shape(base, make_shape("flat"), args.rate_scale), slo_target=args.slo_target, router=args.router
    )
    calibrated = calibrated_targets(mean_row)
    profile_targets = {p.name: p.autoscaling.target_ongoing_requests for p in cfg.pools}
    targets = calibrated if args.targets == "calibrated" else profile_targets
    in_flight = {k: round(v, 2) for k, v in mean_row["ongoing_per_replica"].items()}
    print(
        f"  target_ongoing_requests ({args.targets}): {targets}; calibrated {calibrated} "
        f"(in flight per replica of the fixed fleet {mean_fleet} at the mean load: {in_flight})",
        flush=True,
    )
    auto_cfg = with_targets(cfg, targets)
    sizing: dict[str, dict[str, dict[str, int]]] = {}
    for s in shapes:
        sizing[s] = {"mean": mean_fleet, "start": size(head_window(traces[s], START_WINDOW_S))}
        if not args.no_fixed_peak:
            sizing[s]["peak"] = size(traces[s])
        print(f"  {s}: fixed fleets meeting {args.slo_target:.0%}: {sizing[s]}", flush=True)
    _JOB.update(
        cfg=cfg, auto_cfg=auto_cfg, traces=traces, router=args.router, start={s: z["start"] for s, z in sizing.items()}
    )
    tasks: list[Task] = []
    for s in shapes:
        tasks += [(s, p, None, None, None) for p in policies]
        tasks += [(s, f"fixed-{k}", sizing[s][k], None, None) for k in ("peak", "mean") if k in sizing[s]]
    rows = _map(tasks, args.jobs)
    target_rows: list[dict[str, Any]] = []
    if target_sweep:
        policy = args.sweep_policy or "slo"
        print(f"target sweep: {policy} on {', '.join(shapes)}")
        target_rows = _map([(s, policy, None, None, t) for t in target_sweep for s in shapes], args.jobs)
    sweep_rows: list[dict[str, Any]] = []
    if sweep:
        shape = args.sweep_shape or shapes[0]
        auto = [r for r in rows if r["shape"] == shape and not r["policy"].startswith("fixed")]
        policy = args.sweep_policy or max(auto, key=lambda r: (r["slo_attainment"], -r["gpu_hours"]))["policy"]
        print(f"cold-start sweep: {policy} on {shape}")
        sweep_rows = _map([(shape, policy, None, c, None) for c in sweep], args.jobs)
    table = format_table(rows)
    print(table)
    if sweep_rows:
        print("replica start (s)  SLO attainment  GPU-h  stalled")
        for r in sweep_rows:
            print(
                f"{r['cold_start_override_s']:17g}  {r['slo_attainment']:14.1%}  {r['gpu_hours']:5.1f}  "
                f"{r['stalled_by_cold_start']:7d}"
            )
    if target_rows:
        print("target (per pool)  shape     SLO attainment  GPU-h  stalled")
        for r in target_rows:
            per_pool = "/".join(f"{v:g}" for v in r["target_ongoing_requests"].values())
            print(
                f"{per_pool:>17}  {r['shape']:8s}  {r['slo_attainment']:14.1%}  {r['gpu_hours']:5.1f}  "
                f"{r['stalled_by_cold_start']:7d}"
            )
    print(f"{len(rows) + len(sweep_rows) + len(target_rows)} runs in {time.perf_counter() - started:.0f} s")
    result = {
        "trace": {"name": base.name, "requests": len(base), "duration_s": base.duration_s, **base.meta},
        "profile": cfg.profile,
        "pools": {p.name: {"min": p.min_replicas, "max": p.max_replicas} for p in cfg.pools},
        "shapes": {s: t.meta for s, t in traces.items()},
        "sizing": sizing,
        "target_ongoing_requests": {
            "source": args.targets,
            "values": targets,
            "calibrated": calibrated,
            "in_flight_at_mean_load": mean_row["ongoing_per_replica"],
        },
        "slo": "TTFT <= max(2 s, 1.5 x own no-cache prefill floor) and TPOT <= 100 ms",
        "runs": rows,
        "cold_start_sweep": sweep_rows,
        "target_sweep": target_rows,
    }
    (out / "results.json").write_text(json.dumps(result, indent=1, default=_json_default))
    (out / "table.txt").write_text(table + "\n")
    written = [out / "results.json", out / "table.txt"]
    if not args.no_plots:
        for s in shapes:
            rs = [r for r in rows if r["shape"] == s]
            written.append(
                plot_replicas(rs, load_series(traces[s]), out / f"replicas_{s}.png", f"{base.name}, {s}, {cfg.profile}")
            )
        if sweep_rows:
            title = f"{base.name}, {sweep_rows[0]['shape']}, {cfg.profile}: cold-start sweep"
            written.append(plot_cold_start_sweep(sweep_rows, out / "cold_start_sweep.png", title))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    return float(o)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cluster bench autoscale", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
