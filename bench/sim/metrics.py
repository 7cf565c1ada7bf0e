"""Reduce a simulated (or replayed) run to the figures a sizing decision needs, and print
them as a table: latency percentiles, throughput, prefix-cache hit rate against the
trace's ceiling, per-replica load spread, rejections."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from bench.sim.floor import TtftFloors
from bench.sim.goodput import SloSpec, attainment, slo_met
from bench.sim.simulator import SimResult


def _pct(values: Sequence[float], q: float) -> float:
    if len(values) == 0:
        return math.nan
    return float(np.percentile(np.asarray(values, dtype=float), q))


def latency_summary(
    arrival: Sequence[float], first_token: Sequence[float], finish: Sequence[float], output_tokens: Sequence[int]
) -> dict[str, float]:
    """TTFT / TPOT / E2E percentiles over completed requests (first_token >= 0)."""
    ttft: list[float] = []
    e2e: list[float] = []
    tpot: list[float] = []
    for a, f, d, o in zip(arrival, first_token, finish, output_tokens, strict=True):
        if f < 0 or d < 0:
            continue
        ttft.append(f - a)
        e2e.append(d - a)
        if o > 1:
            tpot.append((d - f) / (o - 1))
    return {
        "ttft_p50_s": _pct(ttft, 50),
        "ttft_p90_s": _pct(ttft, 90),
        "ttft_p99_s": _pct(ttft, 99),
        "ttft_mean_s": float(np.mean(ttft)) if ttft else math.nan,
        "tpot_p50_ms": _pct(tpot, 50) * 1e3,
        "tpot_p90_ms": _pct(tpot, 90) * 1e3,
        "tpot_p99_ms": _pct(tpot, 99) * 1e3,
        "e2e_p50_s": _pct(e2e, 50),
        "e2e_p90_s": _pct(e2e, 90),
        "e2e_p99_s": _pct(e2e, 99),
        "e2e_mean_s": float(np.mean(e2e)) if e2e else math.nan,
    }


def spread(values: Sequence[float]) -> dict[str, float]:
    """How evenly work landed: max/mean and coefficient of variation."""
    if not values:
        return {"max_over_mean": math.nan, "cv": math.nan}
    a = np.asarray(values, dtype=float)
    mean = float(a.mean())
    if mean == 0:
        return {"max_over_mean": math.nan, "cv": math.nan}
    return {"max_over_mean": float(a.max() / mean), "cv": float(a.std() / mean)}


def floor_summary(res: SimResult, floors: TtftFloors, slo: SloSpec) -> dict[str, Any]:
    """TTFT floors (percentiles over the completed requests), TTFT/floor ratios at each
    percentile, and SLO attainment over every request (see bench.sim.goodput)."""
    done = [i for i, rej in enumerate(res.rejected) if not rej and res.finish[i] >= 0]
    ttft = [res.first_token[i] - res.arrival[i] for i in done]
    perfect = [floors.perfect_reuse_s[i] for i in done]
    cold = [floors.no_cache_s[i] for i in done]
    out: dict[str, Any] = {}
    for q in (50, 90, 99):
        f = _pct(perfect, q)
        out[f"floor_ttft_p{q}_s"] = f
        out[f"floor_nocache_ttft_p{q}_s"] = _pct(cold, q)
        out[f"ttft_over_floor_p{q}"] = _pct(ttft, q) / f if f > 0 else math.nan
    per_request = [t / f for t, f in zip(ttft, perfect, strict=True) if f > 0]
    out["ttft_over_floor_per_request_p50"] = _pct(per_request, 50)
    met = slo_met(slo, res.arrival, res.first_token, res.finish, res.output_tokens, floors.no_cache_s)
    out["slo_attainment"] = attainment(met)
    out["slo"] = slo.to_dict()
    return out


def summarize(res: SimResult, floors: TtftFloors | None = None, slo: SloSpec | None = None) -> dict[str, Any]:
    """Every figure of a run; with `floors`, also the floor figures and SLO attainment."""
    done = [i for i, rej in enumerate(res.rejected) if not rej and res.finish[i] >= 0]
    out: dict[str, Any] = dict(latency_summary(res.arrival, res.first_token, res.finish, res.output_tokens))
    start = min(res.arrival) if res.arrival else 0.0
    end = max((res.finish[i] for i in done), default=start)
    makespan = max(end - start, 1e-9)
    out_tokens = sum(res.output_tokens[i] for i in done)
    in_tokens = sum(res.prompt_tokens[i] for i in done)
    accepted = [i for i, rej in enumerate(res.rejected) if not rej]
    blocks = sum(res.prompt_blocks[i] for i in accepted)
    hit_blocks = sum(res.hit_blocks[i] for i in accepted)
    hit_tokens = sum(res.hit_tokens[i] for i in accepted)
    pools: dict[str, Any] = {}
    for name in res.replicas:
        rs = [r for r in res.replica_stats if r["pool"] == name]
        idx = [i for i in done if res.pool[i] == name]
        lat = latency_summary(
            [res.arrival[i] for i in idx],
            [res.first_token[i] for i in idx],
            [res.finish[i] for i in idx],
            [res.output_tokens[i] for i in idx],
        )
        pools[name] = {
            "ttft_p50_s": lat["ttft_p50_s"],
            "ttft_p99_s": lat["ttft_p99_s"],
            "tpot_p50_ms": lat["tpot_p50_ms"],
            "e2e_p99_s": lat["e2e_p99_s"],
            "replicas": len(rs),
            "requests": sum(r["requests"] for r in rs),
            "tokens_spread": spread([r["routed_tokens"] for r in rs]),
            "requests_spread": spread([r["requests"] for r in rs]),
            # Time with any sequence in the engine (decoding counts): not utilization.
            "busy_fraction_mean": float(np.mean([r["busy_s"] for r in rs])) / makespan if rs else math.nan,
            "busy_fraction_max": max((r["busy_s"] for r in rs), default=0.0) / makespan,
            "preemptions": sum(r["preemptions"] for r in rs),
        }
    # The pool with most replicas stands for "the" spread in one-line tables.
    main = max(pools, key=lambda n: pools[n]["replicas"]) if pools else ""
    out.update(
        {
            "policy": res.policy,
            "requests": len(res.arrival),
            "completed": len(done),
            "rejected": sum(res.rejected),
            "spilled": sum(res.spilled),
            "preemptions": sum(res.preemptions),
            "makespan_s": makespan,
            "throughput_output_tok_s": out_tokens / makespan,
            "throughput_total_tok_s": (out_tokens + in_tokens) / makespan,
            "throughput_req_s": len(done) / makespan,
            "block_hit_rate": hit_blocks / blocks if blocks else 0.0,
            "token_hit_rate": hit_tokens / in_tokens if in_tokens else 0.0,
            "block_hit_ceiling": res.ceiling.block_hit_ceiling,
            "token_hit_ceiling": res.ceiling.token_hit_ceiling,
            "prefill_tokens_computed": sum(r["prefill_tokens"] for r in res.replica_stats),
            "load_spread_pool": main,
            "load_spread_max_over_mean": pools[main]["tokens_spread"]["max_over_mean"] if main else math.nan,
            "load_spread_cv": pools[main]["tokens_spread"]["cv"] if main else math.nan,
            "pools": pools,
            "replica_stats": res.replica_stats,
            "sim_wall_s": res.wall_s,
            "sim_cpu_s": res.cpu_s,
        }
    )
    if floors is not None:
        out.update(floor_summary(res, floors, slo or SloSpec()))
    return out


COLUMNS = [
    ("policy", "policy", "{}"),
    ("rate", "rate_scale", "x{:g}"),
    ("TTFT p50", "ttft_p50_s", "{:.2f}s"),
    ("p90", "ttft_p90_s", "{:.2f}s"),
    ("p99", "ttft_p99_s", "{:.2f}s"),
    ("/floor p50", "ttft_over_floor_p50", "{:.2f}"),
    ("p90", "ttft_over_floor_p90", "{:.2f}"),
    ("p99", "ttft_over_floor_p99", "{:.2f}"),
    ("SLO", "slo_attainment", "{:.1%}"),
    ("TPOT p50", "tpot_p50_ms", "{:.1f}ms"),
    ("p99", "tpot_p99_ms", "{:.1f}ms"),
    ("E2E p50", "e2e_p50_s", "{:.1f}s"),
    ("p99", "e2e_p99_s", "{:.1f}s"),
    ("out tok/s", "throughput_output_tok_s", "{:,.0f}"),
    ("hit", "block_hit_rate", "{:.1%}"),
    ("ceiling", "block_hit_ceiling", "{:.1%}"),
    ("spread", "load_spread_max_over_mean", "{:.2f}"),
    ("rejected", "rejected", "{:.5g}"),  # a mean over seeds need not be whole
    ("preempt", "preemptions", "{:.5g}"),
]


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Fixed-width table of summaries (spread = max/mean routed tokens per replica, in the
    largest pool)."""
    header = [c[0] for c in COLUMNS]
    body = []
    for r in rows:
        line = []
        for _, key, fmt in COLUMNS:
            v = r.get(key, "")
            try:
                line.append(fmt.format(v))
            except (ValueError, TypeError):
                line.append(str(v))
        body.append(line)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body, strict=True)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(x.rjust(w) for x, w in zip(row, widths, strict=True)) for row in body]
    return "\n".join(lines)
