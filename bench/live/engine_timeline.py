"""What a replay's time is made of, from the engines' own measurements: each engine
replica's stat tap (deployments/engine_stats.py) keeps the engine core's per-step
intervals and per-request first-token / queue / prefill times; this module reads them
over Ray once a replay is done, matches every client request to the engine's record of
it, and splits the client's TTFT into the serving path (client minus engine) and the
engine's part, and the engine's steps into the step table's prediction and the excess
(the CPU the engine did not get). Also the CPU seconds each kind of cluster process used
during the replay (the cluster's processes are the driver's descendants).

Needs a Ray connection (the process that started the local cluster has one)."""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.sim.spread import horizon_autocorr, lag1_autocorr, quantiles_of

# (arrival wall, first-token latency, queued, prefill, decode, prompt, generated, cached)
EngineRequest = tuple[float, float, float, float, float, int, int, int]
# (frontend wall, prompt tokens computed, decode tokens, mean inter-token s, running, waiting)
EngineStep = tuple[float, int, int, float, int, int]


def _read_tap(_: Any) -> dict[str, list[Any]]:
    from deployments.engine_stats import latest_tap

    tap = latest_tap()
    if tap is None:
        return {"steps": [], "requests": []}
    return {"steps": list(tap.steps), "requests": list(tap.requests)}


def read_timelines(pools: Sequence[str]) -> dict[str, dict[str, list[Any]]]:
    """replica id -> its tap's steps and requests, for every engine replica of `pools`.
    RuntimeError without a Ray connection (never starts a Ray of its own)."""
    import ray

    from bench.live.replicas import replica_call

    if not ray.is_initialized():
        raise RuntimeError("the engines' timelines need this process's Ray connection (start the cluster here)")
    from deployments.serve_config import engine_deployment

    out: dict[str, dict[str, list[Any]]] = {}
    for pool in pools:
        out.update(replica_call(engine_deployment(pool), _read_tap))
    return out


@dataclass
class Matched:
    """One client request beside the engine's record of it."""

    sent_wall: float
    client_ttft_s: float
    engine_ttft_s: float  # engine frontend arrival -> first token
    queued_s: float
    prefill_s: float
    in_flight_at_send: int  # other client requests in flight when it was sent
    replica: str
    in_s: float = 0.0  # client send -> engine frontend arrival
    first_back_s: float = 0.0  # engine's first token -> the client has it
    last_back_s: float = 0.0  # engine's last token -> the client has it
    tokens: int = 0
    decode_s: float = 0.0  # engine's first token -> its last

    @property
    def engine_tpot_s(self) -> float:
        """The engine's mean time per output token after the first (0 for one token)."""
        return self.decode_s / (self.tokens - 1) if self.tokens > 1 else 0.0

    @property
    def client_overhead_s(self) -> float:
        """Client TTFT less the engine core's own queue and prefill: what the step model
        does not cover (the serving path both ways and the engine's intake)."""
        return self.client_ttft_s - self.queued_s - self.prefill_s


def match_requests(outcomes: Sequence[Any], timelines: dict[str, dict[str, list[Any]]]) -> list[Matched]:
    """Each completed outcome (with `sent_wall`, `first_token`, `sent`, `replica`,
    `completion_tokens`) paired with the engine request of the same replica and the same
    generated-token count that arrived first after it was sent (within 2 s)."""
    ok = [o for o in outcomes if o.status == 200 and o.first_token >= 0]
    spans = [(o.sent, o.finish) for o in ok]
    used: set[tuple[str, int]] = set()
    out: list[Matched] = []
    for o in sorted(ok, key=lambda o: o.sent_wall):
        best: tuple[float, int, EngineRequest] | None = None
        reqs = timelines.get(o.replica, {}).get("requests", [])
        for k, r in enumerate(reqs):
            lag = r[0] - o.sent_wall
            if (o.replica, k) in used or r[6] != o.completion_tokens or not -0.05 < lag < 2.0:
                continue
            if best is None or lag < best[0]:
                best = (lag, k, r)
        if best is None:
            continue
        used.add((o.replica, best[1]))
        r = best[2]
        others = sum(1 for s, f in spans if s <= o.sent < f) - 1
        engine_first = r[0] + r[1]
        out.append(
            Matched(
                o.sent_wall,
                o.first_token - o.sent,
                r[1],
                r[2],
                r[3],
                max(0, others),
                o.replica,
                in_s=r[0] - o.sent_wall,
                first_back_s=o.sent_wall + o.first_token - o.sent - engine_first,
                last_back_s=o.sent_wall + o.finish - o.sent - (engine_first + r[4]),
                tokens=r[6],
                decode_s=r[4],
            )
        )
    return out


def _pcts(values: Sequence[float], scale: float = 1.0) -> dict[str, float]:
    if not values:
        return {"p50": math.nan, "p90": math.nan, "mean": math.nan, "n": 0}
    a = np.asarray(values, dtype=float) * scale
    return {
        "p50": float(np.percentile(a, 50)),
        "p90": float(np.percentile(a, 90)),
        "mean": float(a.mean()),
        "n": len(values),
    }


def steps_in(timelines: dict[str, dict[str, list[Any]]], start_wall: float, end_wall: float) -> list[tuple[str, Any]]:
    return [
        (rid, s) for rid, t in timelines.items() for s in t.get("steps", []) if start_wall <= s[0] <= end_wall and s[2]
    ]


def step_overlaps(steps: Sequence[tuple[str, Any]]) -> list[int]:
    """For each step, how many other replicas stepped within its interval (engines
    sharing the machine's cores)."""
    spans: dict[str, tuple[list[float], list[float]]] = {}
    for rid, s in sorted(steps, key=lambda rs: rs[1][0]):
        starts, ends = spans.setdefault(rid, ([], []))
        starts.append(s[0] - s[3])
        ends.append(s[0])
    out = []
    for rid, s in steps:
        wall, start = s[0], s[0] - s[3]
        n = 0
        for other, (starts, ends) in spans.items():
            if other == rid:
                continue
            k = bisect.bisect_right(ends, start)  # the first of its steps ending after this one starts
            n += k < len(ends) and starts[k] < wall
        out.append(n)
    return out


def step_excess(steps: Sequence[tuple[str, Any]], ratios: Sequence[float], overlaps: Sequence[int]) -> dict[str, Any]:
    """Measured decode-step intervals against the table's step for the same batch (and
    the prefill computed in it; `ratios`, from `step_ratios`): measured / table, overall,
    by how many other replicas stepped within the same interval (`overlaps`:
    engine-on-engine CPU sharing) and by batch."""
    by_overlap: dict[int, list[float]] = {}
    by_batch: dict[int, list[float]] = {}
    for (_, s), ratio, overlap in zip(steps, ratios, overlaps, strict=True):
        by_overlap.setdefault(overlap, []).append(ratio)
        by_batch.setdefault(min(s[2], 4), []).append(ratio)
    return {
        "ratio": _pcts(ratios),
        "by_other_replicas_stepping": {k: _pcts(v) for k, v in sorted(by_overlap.items())},
        "by_batch": {k: _pcts(v) for k, v in sorted(by_batch.items())},
    }


# Fewer samples than this at a count (of requests in flight, of sequences in a step):
# that count is left out of the slope.
MIN_GROUP_SAMPLES = 5


def median_slope(values: Sequence[float], counts: Sequence[int]) -> tuple[float, float]:
    """(slope, value at count 0) of the count-weighted least-squares line through the
    medians of `values` by `counts` (medians: a few stalled samples do not tilt it), over
    the counts with at least MIN_GROUP_SAMPLES samples; slope 0 (and the overall median)
    when fewer than two counts have enough or the line falls."""
    groups: dict[int, list[float]] = {}
    for v, k in zip(values, counts, strict=True):
        groups.setdefault(k, []).append(v)
    kept = [(k, float(np.median(vs)), len(vs)) for k, vs in groups.items() if len(vs) >= MIN_GROUP_SAMPLES]
    flat = (0.0, float(np.median(values)) if len(values) else 0.0)
    if len(kept) < 2:
        return flat
    ks, meds, ns = (np.asarray(x, dtype=float) for x in zip(*kept, strict=True))
    k_bar = float(np.average(ks, weights=ns))
    m_bar = float(np.average(meds, weights=ns))
    slope = float(np.sum(ns * (ks - k_bar) * (meds - m_bar)) / np.sum(ns * (ks - k_bar) ** 2))
    return (slope, m_bar - slope * k_bar) if slope > 0 else flat


def overhead_slope_ms(overhead_ms: Sequence[float], in_flight: Sequence[int]) -> float:
    """How much the client overhead grows per other request in flight at the send."""
    return median_slope(overhead_ms, in_flight)[0]


def batch_stretch(ratios: Sequence[float], sequences: Sequence[int]) -> float:
    """How much longer, as a fraction of a one-sequence step, a step grows per sequence
    beyond the first (the step scale's medians by sequences in the step)."""
    slope, at_zero = median_slope(ratios, [n - 1 for n in sequences])
    return slope / at_zero if slope > 0 and at_zero > 0 else 0.0


# Fewer steps than this on either side (alone, beside another engine's): no contention
# is measured, and the spread comes from every step.
MIN_CONTENTION_STEPS = 20


def contention_scale(ratios: Sequence[float], overlaps: Sequence[int]) -> float:
    """1 + the step-scale stretch per other engine stepping alongside: the median ratio
    of steps beside k >= 1 others over that of steps alone, less 1, per other engine (the
    mean k); 1 when either side has too few steps or the shared ones are not slower."""
    alone = [r for r, k in zip(ratios, overlaps, strict=True) if k == 0]
    shared = [(r, k) for r, k in zip(ratios, overlaps, strict=True) if k > 0]
    if len(alone) < MIN_CONTENTION_STEPS or len(shared) < MIN_CONTENTION_STEPS:
        return 1.0
    base = float(np.median(alone))
    stretch = float(np.median([r for r, _ in shared])) / base - 1.0
    return 1.0 + max(0.0, stretch / float(np.mean([k for _, k in shared])))


def step_ratios(steps: Sequence[tuple[str, Any]], table: Any, mean_context: float) -> list[float]:
    """Each step's engine-measured interval over the (unscaled) table's step of the same
    batch and computed prompt tokens."""
    out = []
    for _, s in steps:
        prompt, decode, itl = s[1], s[2], s[3]
        chunks = [(prompt, 0)] if prompt else []
        out.append(itl / (table.step_ms(chunks, decode, int(decode * mean_context)) / 1e3))
    return out


def prefill_contexts(steps: Sequence[tuple[str, Any]], timelines: dict[str, dict[str, list[Any]]]) -> list[int]:
    """Per step, the cached tokens its prefill chunk was computed over: those of the
    request on the same replica whose first token came out of that step (its record's
    arrival + first-token latency within half the step's interval of the step, at most
    20 ms: the two are read on different clocks), else 0. A prompt that fits one step's
    budget is prefilled in the step that gives its first token."""
    out = []
    for rid, s in steps:
        context = 0
        if s[1]:
            best = min(0.5 * s[3], 0.02)
            for r in timelines.get(rid, {}).get("requests", []):
                gap = abs(r[0] + r[1] - s[0])
                if gap <= best:
                    best, context = gap, int(r[7])
        out.append(context)
    return out


def step_parts(
    steps: Sequence[tuple[str, Any]], table: Any, mean_context: float, contexts: Sequence[int] | None = None
) -> list[tuple[float, float]]:
    """Each step's (unscaled) table cost split into its decode part (with the step's fixed
    costs) and its prefill chunk's part above them (over `contexts` cached tokens, 0
    where not given), as `EngineStepTable.step_ms` adds them."""
    out = []
    for j, (_, s) in enumerate(steps):
        prompt, decode = s[1], s[2]
        context = contexts[j] if contexts is not None else 0
        whole = table.step_ms([(prompt, context)] if prompt else [], decode, int(decode * mean_context))
        base = table.step_ms([], decode, int(decode * mean_context)) if decode else table.fixed_ms
        out.append((base, whole - base))
    return out


def prefill_scale(alone: Sequence[float], parts: Sequence[tuple[float, float]], min_steps: int = 5) -> float:
    """How many times slower than its decode part a step's prefill part ran, against the
    table: with the decode-only steps' median scale s, a step with parts (D, P) that
    took a x (D + P) is s x (D + k P), so k = (a / s x (D + P) - D) / P; the median k
    over the steps that carried a prefill chunk (1.0 with fewer than `min_steps` of them
    or no decode-only step)."""
    decode_only = [a for a, (_, p) in zip(alone, parts, strict=True) if p <= 0]
    mixed = [(a, d, p) for a, (d, p) in zip(alone, parts, strict=True) if p > 0]
    if len(mixed) < min_steps or not decode_only:
        return 1.0
    s = float(np.median(decode_only))
    k = float(np.median([(a / s * (d + p) - d) / p for a, d, p in mixed]))
    return max(0.1, k)


def breakdown(
    outcomes: Sequence[Any],
    timelines: dict[str, dict[str, list[Any]]],
    table: Any | None,
    mean_context: float,
) -> dict[str, Any]:
    """The replay's TTFT split into serving path and engine, by in-flight requests at
    send, and the engine's decode steps against the table."""
    matched = match_requests(outcomes, timelines)
    path = [m.client_ttft_s - m.engine_ttft_s for m in matched]
    by_in_flight: dict[int, list[float]] = {}
    for m, p in zip(matched, path, strict=True):
        by_in_flight.setdefault(min(m.in_flight_at_send, 3), []).append(p)
    out: dict[str, Any] = {
        "matched": len(matched),
        "client_ttft_ms": _pcts([m.client_ttft_s for m in matched], 1e3),
        "engine_ttft_ms": _pcts([m.engine_ttft_s for m in matched], 1e3),
        "engine_queued_ms": _pcts([m.queued_s for m in matched], 1e3),
        "engine_prefill_ms": _pcts([m.prefill_s for m in matched], 1e3),
        "serving_path_ms": _pcts(path, 1e3),
        "path_in_ms": _pcts([m.in_s for m in matched], 1e3),
        "path_first_token_back_ms": _pcts([m.first_back_s for m in matched], 1e3),
        "path_last_token_back_ms": _pcts([m.last_back_s for m in matched if m.tokens > 1], 1e3),
        "stream_lead_ms": _pcts([m.first_back_s - m.last_back_s for m in matched if m.tokens > 1], 1e3),
        "client_overhead_ms": _pcts([m.client_overhead_s for m in matched], 1e3),
        "engine_tpot_ms": _pcts([m.engine_tpot_s for m in matched if m.tokens > 1], 1e3),
        "serving_path_ms_by_in_flight": {k: _pcts(v, 1e3) for k, v in sorted(by_in_flight.items())},
    }
    # The raw per-request and per-step values `calibrate` takes its spreads from.
    # The serving path slows with the requests in flight; the overhead a request sent
    # alone would have had is the spread the simulator draws from.
    slope = overhead_slope_ms([1e3 * m.client_overhead_s for m in matched], [m.in_flight_at_send for m in matched])
    out["request_overhead_per_in_flight_ms"] = round(slope, 1)
    samples: dict[str, Any] = {
        "client_overhead_ms": [1e3 * m.client_overhead_s - slope * m.in_flight_at_send for m in matched],
        "stream_lead_ms": [1e3 * (m.first_back_s - m.last_back_s) for m in matched if m.tokens > 1],
    }
    out["samples"] = samples
    ok = [o for o in outcomes if o.status == 200 and o.first_token >= 0]
    if ok:
        start = min(o.sent_wall for o in ok)
        end = max(o.sent_wall + (o.finish - o.sent) for o in ok)
        steps = steps_in(timelines, start, end + 0.5)
        itl = [s[3] for _, s in steps for _ in range(s[2])]
        out["engine_itl_ms"] = _pcts(itl, 1e3)
        if table is not None:
            ratios = step_ratios(steps, table, mean_context)
            overlaps = step_overlaps(steps)
            out["decode_steps_vs_table"] = step_excess(steps, ratios, overlaps)
            # Engines sharing the cores: the stretch per other engine stepping alongside,
            # and each step's ratio as if it had run alone (the spread the draws take).
            contention = contention_scale(ratios, overlaps)
            out["engine_contention_scale"] = round(contention, 2)
            alone = [r / (1 + (contention - 1) * k) for r, k in zip(ratios, overlaps, strict=True)]
            # Each sequence beyond the first streams on the same cores too (the table's
            # batch cost is the engine's alone): the stretch per sequence, and each step's
            # ratio as if it had held one.
            sequences = [s[2] + (1 if s[1] else 0) for _, s in steps]
            per_seq = batch_stretch(alone, sequences)
            out["engine_batch_stretch"] = round(per_seq, 3)
            alone = [r / (1 + per_seq * (n - 1)) for r, n in zip(alone, sequences, strict=True)]
            # The steps that carried a prefill chunk: how much slower their prefill part
            # ran than the decode steps' scale gives. Reported, not a calibrated term: as
            # a factor on every chunk it put a 248-request check (k 3.5) past capacity in
            # the simulator (TTFT p90 +2,333%; k 1: -28%), while it brought a 34-request
            # one from -38% to +8% TTFT p50; part of it is a cost per new request, not
            # per prefilled token (bench/calibration/README.md, "Known gaps").
            parts = step_parts(steps, table, mean_context, prefill_contexts(steps, timelines))
            out["engine_prefill_scale_measured"] = round(prefill_scale(alone, parts), 2)
            samples["engine_step_scale"] = alone
            # Per replica in time order: how long a slow spell lasts. A reply's TPOT is a
            # mean over its decode steps, so the correlation is matched at that span.
            series: dict[str, list[float]] = {}
            for (rid, _), ratio in zip(steps, alone, strict=True):
                series.setdefault(rid, []).append(ratio)
            per_replica = list(series.values())
            decodes = [m.tokens - 1 for m in matched if m.tokens > 1]
            horizon = int(np.median(decodes)) if decodes else 1
            out["engine_step_scale_lag1_autocorr"] = round(lag1_autocorr(per_replica), 2)
            out["engine_step_scale_horizon_steps"] = horizon
            out["engine_step_scale_autocorr"] = round(horizon_autocorr(per_replica, horizon), 2)
            samples["engine_step_scale_by_replica"] = per_replica
    return out


def cluster_cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) so far of this driver's descendant processes, by kind:
    engine cores, their model workers, engine replicas (vLLM frontends), the gateway, the
    proxy, the rest."""
    import psutil

    out: dict[str, float] = {}
    for p in psutil.Process().children(recursive=True):
        try:
            name = " ".join(p.cmdline()[:2]) or p.name()
            t = p.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        out[_kind(name)] = out.get(_kind(name), 0.0) + t.user + t.system + t.children_user + t.children_system
    return out


def _kind(cmd: str) -> str:
    for needle, kind in (
        ("EngineCore", "engine_core"),
        ("VLLM::Worker", "engine_worker"),  # the model runs here (vLLM's CPU executor)
        ("engine-", "engine_replica"),
        ("gateway", "gateway"),
        ("ProxyActor", "proxy"),
        ("ServeController", "controller"),
        ("raylet", "raylet"),
        ("gcs_server", "gcs"),
    ):
        if needle in cmd:
            return kind
    return "other"


def cpu_delta(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict[str, float]:
    """Cores used per process kind over `wall_s` (CPU seconds / wall seconds)."""
    return {k: round((after.get(k, 0.0) - before.get(k, 0.0)) / wall_s, 3) for k in sorted(after)}


def calibrate(b: dict[str, Any]) -> dict[str, Any]:
    """The cpu-tiny profile's simulator terms from one replay's breakdown, each a median
    of a measured component (not a fit to the replay's percentiles): the client's TTFT
    beyond the engine core's queue and prefill for a request sent alone
    (`request_overhead_ms`) and its growth per other request in flight
    (`request_overhead_per_in_flight_ms`), the first token's
    extra way back (`stream_lead_ms`), the engine's decode steps against the table as if
    each had run alone (`engine_step_scale` and its spread), how long a slow spell lasts
    (`engine_step_scale_autocorr`, matched over a reply's decode steps), how much
    longer a step takes beside another engine's (`engine_contention_scale`) and per
    sequence beyond the first (`engine_batch_stretch`). `engine_prefill_scale` stays
    the profile's: the breakdown's `engine_prefill_scale_measured` is not yet a term
    the simulator can take from one replay."""
    samples = b["samples"]
    scale = samples.get("engine_step_scale", [])
    overhead = samples["client_overhead_ms"]
    return {
        "request_overhead_ms": round(float(np.median(overhead)), 1),
        "stream_lead_ms": round(float(np.median(samples["stream_lead_ms"])), 1),
        "engine_step_scale": round(float(np.median(scale)), 2) if scale else 1.0,
        "request_overhead_spread_ms": [max(0.0, v) for v in quantiles_of(overhead, 1)],
        "stream_lead_spread_ms": quantiles_of(samples["stream_lead_ms"], 1),
        "engine_step_scale_spread": quantiles_of(scale, 2),
        "engine_step_scale_autocorr": b.get("engine_step_scale_autocorr", 0.0),
        "engine_contention_scale": b.get("engine_contention_scale", 1.0),
        "engine_batch_stretch": b.get("engine_batch_stretch", 0.0),
        "request_overhead_per_in_flight_ms": b.get("request_overhead_per_in_flight_ms", 0.0),
    }
