"""Capacity planning on a trace: the smallest fleet that meets the SLO, what it costs, and
what the router and autoscaling save.

    cluster plan --trace ../shared/traces/mooncake_conversation.jsonl --profile h100x8-bf16 \\
        --gpu-hour-price 2.5 [--slo 0.99] [--shape diurnal] [--window-min 0:30]

* fixed fleet: per pool, the fewest replicas (bisection, pools in turn, the others held)
  for which at least `--slo` of the requests meet the per-request SLO (bench/sim/slo.py);
* autoscaled: each autoscaling policy (bench/sim/fleet.py) started at the fleet the first
  10 minutes need, with the profile's bounds and `target_ongoing_requests` set to the
  requests in flight per replica of that fixed fleet: GPU-hours and SLO attainment;
* cost: GPU-hours x price per hour, per 1M input and 1M output tokens. Input and output
  share the cost in the Mistral API's own 1:3 price ratio ($2 / $6 per 1M for Mistral
  Large), so the two figures compare like for like with the API price;
* router: the fixed fleet again with power-of-two routing (Ray's default) at the same
  SLO; the GPU-hours it needs more are the router's share of the saving.
"""

from __future__ import annotations

from typing import Any

from bench.sim.autoscale_eval import (
    AUTOSCALING_POLICIES,
    calibrated_targets,
    run_fleet,
    with_initial,
    with_policy,
    with_targets,
)
from bench.traces import Trace

MISTRAL_API_INPUT_PER_M = 2.0
MISTRAL_API_OUTPUT_PER_M = 6.0
START_WINDOW_S = 600.0


def head_window(trace: Trace, seconds: float) -> Trace:
    reqs = [r for r in trace.requests if r.arrival_s < seconds]
    return Trace(f"{trace.name}[:{seconds:g}s]", trace.block_size, reqs, trace.has_prefix_info, dict(trace.meta))


def min_fixed_fleet(
    cfg: Any, trace: Trace, *, slo_target: float, router: str | None = None, log: Any = None
) -> tuple[dict[str, int], dict[str, Any], bool]:
    """(replicas per pool, the run's figures, whether the target was met at all)."""
    fleet = {p.name: p.max_replicas for p in cfg.pools}
    cache: dict[tuple[tuple[str, int], ...], dict[str, Any]] = {}

    def attain(f: dict[str, int]) -> dict[str, Any]:
        key = tuple(sorted(f.items()))
        if key not in cache:
            cache[key] = run_fleet(cfg, trace, router=router, fixed=f)
            if log:
                log(f"    fixed {f}: SLO {cache[key]['slo_attainment']:.1%}")
        return cache[key]

    if attain(fleet)["slo_attainment"] < slo_target:
        return fleet, attain(fleet), False
    for p in cfg.pools:
        lo, hi = 1, fleet[p.name]  # hi meets the target
        while lo < hi:
            mid = (lo + hi) // 2
            if attain({**fleet, p.name: mid})["slo_attainment"] >= slo_target:
                hi = mid
            else:
                lo = mid + 1
        fleet[p.name] = hi
    return fleet, attain(fleet), True


def cost_per_million(gpu_hours: float, price: float, input_tokens: int, output_tokens: int) -> tuple[float, float]:
    """($ per 1M input, $ per 1M output) splitting the cost 1:3 like the API's prices."""
    ratio = MISTRAL_API_OUTPUT_PER_M / MISTRAL_API_INPUT_PER_M
    weighted = input_tokens + ratio * output_tokens
    if weighted <= 0:
        return float("nan"), float("nan")
    per_input = gpu_hours * price / weighted * 1e6
    return per_input, per_input * ratio


def plan(
    cfg: Any,
    trace: Trace,
    *,
    price: float,
    slo_target: float,
    router: str | None = None,
    baseline_router: str = "pow2",
    log: Any = print,
) -> dict[str, Any]:
    router = router or cfg.router.policy
    log(f"  fixed fleet with {router} routing ...")
    fixed, fixed_row, met = min_fixed_fleet(cfg, trace, slo_target=slo_target, router=router, log=log)
    log(f"  fixed fleet with {baseline_router} routing ...")
    base, base_row, base_met = min_fixed_fleet(cfg, trace, slo_target=slo_target, router=baseline_router, log=log)
    log("  starting fleet (first 10 min) ...")
    start, _, _ = min_fixed_fleet(cfg, head_window(trace, START_WINDOW_S), slo_target=slo_target, router=router)
    # The autoscalers aim at the load per replica the SLO-meeting fixed fleet carried.
    targets = calibrated_targets(fixed_row)
    auto_cfg = with_targets(cfg, targets)
    auto_rows = []
    for policy in AUTOSCALING_POLICIES:
        row = run_fleet(with_initial(with_policy(auto_cfg, policy), start), trace, router=router)
        row["policy"] = policy
        log(f"    autoscaled {policy}: SLO {row['slo_attainment']:.1%}, {row['gpu_hours']:.1f} GPU-h")
        auto_rows.append(row)
    meeting = [r for r in auto_rows if r["slo_attainment"] >= slo_target]
    best = min(meeting, key=lambda r: r["gpu_hours"]) if meeting else max(auto_rows, key=lambda r: r["slo_attainment"])

    def costs(row: dict[str, Any]) -> dict[str, float]:
        i, o = cost_per_million(row["gpu_hours"], price, row["input_tokens"], row["output_tokens"])
        return {"usd": row["gpu_hours"] * price, "usd_per_m_input": i, "usd_per_m_output": o}

    api = (
        fixed_row["input_tokens"] * MISTRAL_API_INPUT_PER_M + fixed_row["output_tokens"] * MISTRAL_API_OUTPUT_PER_M
    ) / 1e6
    return {
        "trace": trace.name,
        "duration_s": trace.duration_s,
        "requests": len(trace),
        "slo_target": slo_target,
        "price_per_gpu_hour": price,
        "fixed": {"replicas": fixed, "met": met, **_figures(fixed_row), **costs(fixed_row)},
        "fixed_baseline_router": {
            "router": baseline_router,
            "replicas": base,
            "met": base_met,
            **_figures(base_row),
            **costs(base_row),
        },
        "start_replicas": start,
        "target_ongoing_requests": targets,
        "autoscaled": [{"policy": r["policy"], **_figures(r), **costs(r)} for r in auto_rows],
        "best_autoscaled": best["policy"],
        "api_usd": api,
    }


def _figures(row: dict[str, Any]) -> dict[str, Any]:
    return {
        k: row[k]
        for k in (
            "gpu_hours",
            "slo_attainment",
            "ttft_p99_s",
            "replicas_mean",
            "replicas_max",
            "input_tokens",
            "output_tokens",
            "makespan_s",
        )
    }


def format_plan(p: dict[str, Any]) -> str:
    hours = p["duration_s"] / 3600
    lines = [
        f"trace {p['trace']}: {p['requests']:,} requests over {hours * 60:.1f} min; "
        f"SLO target {p['slo_target']:.0%} of requests; ${p['price_per_gpu_hour']:g} per GPU-hour",
        f"{'fleet':34s} {'replicas':>22s} {'GPU-h':>7s} {'SLO':>6s} {'$ / 1M in':>10s} {'$ / 1M out':>11s}",
    ]

    def line(name: str, reps: str, r: dict[str, Any]) -> str:
        return (
            f"{name:34s} {reps:>22s} {r['gpu_hours']:7.1f} {r['slo_attainment']:6.1%} "
            f"{r['usd_per_m_input']:10.3f} {r['usd_per_m_output']:11.3f}"
        )

    f = p["fixed"]
    b = p["fixed_baseline_router"]
    lines.append(line("fixed, our router", _reps(f["replicas"]), f) + ("" if f["met"] else "  (max; target missed)"))
    lines.append(
        line(f"fixed, {b['router']} router", _reps(b["replicas"]), b) + ("" if b["met"] else "  (max; missed)")
    )
    for r in p["autoscaled"]:
        mean = "/".join(f"{v:.1f}" for v in r["replicas_mean"].values())
        mx = "/".join(str(v) for v in r["replicas_max"].values())
        mark = " *" if r["policy"] == p["best_autoscaled"] else ""
        lines.append(line(f"autoscaled {r['policy']}{mark}", f"mean {mean} max {mx}", r))
    lines.append(
        f"{'Mistral API':34s} {'':>22s} {'':>7s} {'':>6s} "
        f"{MISTRAL_API_INPUT_PER_M:10.3f} {MISTRAL_API_OUTPUT_PER_M:11.3f}"
        f"   (${p['api_usd']:,.0f} for this trace)"
    )
    saving_router = b["usd"] - f["usd"]
    saving_total = p["api_usd"] - f["usd"]
    share = saving_router / saving_total if saving_total > 0 else float("nan")
    missed = (
        "" if b["met"] else f" (it misses the target even at the pool maxima: {b['slo_attainment']:.1%}; a lower bound)"
    )
    lines.append(
        f"router: {b['router']} costs ${saving_router:+,.0f} ({b['gpu_hours'] - f['gpu_hours']:+.1f} GPU-h) more "
        f"for the same SLO{missed}; the fixed fleet saves ${saving_total:,.0f} against the API, "
        f"the router's share of it {share:.0%}"
    )
    lines.append(
        f"autoscaled runs start at {_reps(p['start_replicas'])} (the fleet the first 10 minutes need), "
        f"target_ongoing_requests {p['target_ongoing_requests']} (in flight per replica of the fixed fleet); * best"
    )
    return "\n".join(lines)


def _reps(d: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items())
