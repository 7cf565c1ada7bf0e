"""Traffic shapes: replay a trace with a time-varying rate multiplier m(t).

A shaped replay keeps every request (its tokens, prefix blocks, order) and moves its
arrival: the request at original time t arrives at tau with integral_0^tau m(s) ds = t,
so the instantaneous rate is m(tau) times the trace's own. Shapes, over the shaped
replay's own clock (its length is fixed so the trace's requests fill it exactly):

* `diurnal`: a compressed day, m = 1 + a sin(2 pi tau / period - pi/2) (trough at the
  start, peak half way), `a` = amplitude (0.6: trough 0.4, peak 1.6);
* `burst`: m = factor (3) between start and start + length, 1 elsewhere;
* `ramp`: m rising linearly from `low` to `high` over the replay;
* `flat`: m = 1 (the trace as recorded).

`--rate-scale` multiplies the whole shape (a busier day).
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, replace

from bench.traces import Trace

SHAPES = ("flat", "diurnal", "burst", "ramp")


@dataclass(frozen=True)
class Shape:
    name: str
    multiplier: Callable[[float], float]  # of the fraction of the shaped replay elapsed (0..1)
    describe: str


def make_shape(
    name: str,
    *,
    amplitude: float = 0.6,
    burst_factor: float = 3.0,
    burst_start: float = 0.4,
    burst_length: float = 0.15,
    ramp_low: float = 0.5,
    ramp_high: float = 2.0,
) -> Shape:
    """A shape over the replay's elapsed fraction x in [0, 1]."""
    if name == "flat":
        return Shape(name, lambda x: 1.0, "x1 throughout")
    if name == "diurnal":
        if not 0 <= amplitude < 1:
            raise ValueError(f"diurnal amplitude must be in [0, 1), got {amplitude}")
        return Shape(
            name,
            lambda x: 1.0 + amplitude * math.sin(2 * math.pi * x - math.pi / 2),
            f"one compressed day: x{1 - amplitude:g} at night, x{1 + amplitude:g} at midday",
        )
    if name == "burst":
        if burst_factor <= 0 or not 0 <= burst_start < 1 or burst_length <= 0:
            raise ValueError("burst needs factor > 0, start in [0, 1), length > 0")
        end = burst_start + burst_length
        return Shape(
            name,
            lambda x: burst_factor if burst_start <= x < end else 1.0,
            f"x{burst_factor:g} from {burst_start:.0%} to {min(end, 1):.0%} of the replay",
        )
    if name == "ramp":
        if ramp_low <= 0 or ramp_high <= 0:
            raise ValueError("ramp needs positive low and high")
        return Shape(name, lambda x: ramp_low + (ramp_high - ramp_low) * x, f"x{ramp_low:g} rising to x{ramp_high:g}")
    raise ValueError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")


def shaped_duration(shape: Shape, trace_duration_s: float, rate_scale: float = 1.0, grid: int = 4000) -> float:
    """Length D of the shaped replay: integral_0^D m(tau/D) ds = trace duration / scale."""
    mean = sum(shape.multiplier((k + 0.5) / grid) for k in range(grid)) / grid
    return trace_duration_s / (rate_scale * mean)


def apply_shape(trace: Trace, shape: Shape, rate_scale: float = 1.0, grid: int = 4000) -> Trace:
    """The trace replayed under the shape (see the module docstring)."""
    if rate_scale <= 0:
        raise ValueError(f"rate scale must be > 0, got {rate_scale}")
    if not trace.requests:
        return trace
    duration = trace.duration_s
    D = shaped_duration(shape, duration, rate_scale, grid)
    # Cumulative original time at each grid point of the shaped clock (midpoint rule).
    taus = [D * k / grid for k in range(grid + 1)]
    cum = [0.0]
    for k in range(grid):
        cum.append(cum[-1] + rate_scale * shape.multiplier((k + 0.5) / grid) * D / grid)
    t0 = trace.requests[0].arrival_s
    reqs = []
    for r in trace.requests:
        t = r.arrival_s - t0
        j = min(max(bisect_left(cum, t), 1), grid)
        lo, hi = cum[j - 1], cum[j]
        frac = (t - lo) / (hi - lo) if hi > lo else 0.0
        reqs.append(replace(r, arrival_s=taus[j - 1] + frac * (taus[j] - taus[j - 1])))
    name = f"{trace.name}@{shape.name}" + (f"x{rate_scale:g}" if rate_scale != 1 else "")
    meta = {**trace.meta, "shape": shape.name, "shape_describe": shape.describe, "rate_scale": str(rate_scale)}
    return Trace(name, trace.block_size, reqs, trace.has_prefix_info, meta)


def repeat_trace(trace: Trace, times: int) -> Trace:
    """The trace `times` times back to back (a longer day from a one-hour trace). Each
    copy gets fresh block ids and session ids, so copies never hit each other's cache:
    the hit-rate ceiling stays the trace's own."""
    if times < 1:
        raise ValueError(f"repeat must be >= 1, got {times}")
    if times == 1 or not trace.requests:
        return trace
    top = 1 + max((max(r.block_ids + r.output_block_ids, default=0) for r in trace.requests), default=0)
    span = trace.duration_s + (trace.duration_s / max(1, len(trace) - 1))  # one mean gap between copies
    reqs = []
    for k in range(times):
        off = k * top
        for r in trace.requests:
            reqs.append(
                replace(
                    r,
                    request_id=f"{r.request_id}.{k}" if k else r.request_id,
                    arrival_s=r.arrival_s + k * span,
                    block_ids=tuple(b + off for b in r.block_ids),
                    output_block_ids=tuple(b + off for b in r.output_block_ids),
                    session_id=f"{r.session_id}.{k}" if (k and r.session_id) else r.session_id,
                )
            )
    return Trace(f"{trace.name}x{times}", trace.block_size, reqs, trace.has_prefix_info, dict(trace.meta))


def load_series(trace: Trace, window_s: float = 60.0) -> list[tuple[float, float]]:
    """(window start, requests/s) of a trace: the load next to the replicas in plots."""
    if not trace.requests:
        return []
    end = trace.requests[-1].arrival_s
    n = int(end // window_s) + 1
    counts = [0] * n
    for r in trace.requests:
        counts[int(r.arrival_s // window_s)] += 1
    return [(k * window_s, c / window_s) for k, c in enumerate(counts)]
