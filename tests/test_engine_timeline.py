"""The replay timing breakdown (bench/live/engine_timeline.py) on records built here: the
stat tap keeps what vLLM's own stats objects report per step and per finished request,
client requests are matched to the engine's records, the client's TTFT splits into the
serving path's legs, steps are set against the table, and `calibrate` turns the measured
components into simulator terms; bench/sim/spread.py draws from measured quantiles."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import pytest

from bench.calibration.engine_step_table import EngineStepTable, engine_step_table_for
from bench.live import engine_timeline as et
from bench.sim.spread import PROBS, Spread, ar1_mean_variance, horizon_autocorr, lag1_autocorr, quantiles_of
from cluster.config import SimulatorConfig
from cluster.profiles import load_profile
from deployments.engine_stats import SchedulerStatsTap


@dataclass
class _Outcome:  # the fields of bench.live.replay_cluster.Outcome the breakdown reads
    index: int
    sent: float
    sent_wall: float
    first_token: float
    finish: float
    completion_tokens: int
    replica: str
    status: int = 200


def test_the_tap_keeps_vllms_per_step_and_per_request_figures() -> None:
    from vllm.v1.metrics.stats import FinishedRequestStats, IterationStats, SchedulerStats

    tap = SchedulerStatsTap()
    it = IterationStats()
    it.inter_token_latencies_iter = [0.006, 0.006]
    it.finished_requests.append(
        FinishedRequestStats(
            finish_reason=None,  # type: ignore[arg-type]
            e2e_latency=0.100,
            num_prompt_tokens=200,
            num_generation_tokens=9,
            queued_time=0.001,
            prefill_time=0.012,
            decode_time=0.048,
            num_cached_tokens=128,
        )
    )
    tap.record(SchedulerStats(num_running_reqs=2), it)
    wall, prompt, decode, itl, running, waiting = tap.steps[0]
    assert (prompt, decode, running, waiting) == (0, 2, 2, 0) and itl == pytest.approx(0.006)
    arrival, first, queued, prefill, dec, p, g, cached = tap.requests[0]
    assert arrival == pytest.approx(wall - 0.100)
    assert first == pytest.approx(0.052) and (queued, prefill, dec) == (0.001, 0.012, 0.048)
    assert (p, g, cached) == (200, 9, 128)


def _table() -> EngineStepTable:
    cfg = load_profile("cpu-tiny")
    cfg.simulator = SimulatorConfig()
    table = engine_step_table_for(cfg, cfg.pools[0])
    assert table is not None
    return table


def test_breakdown_splits_the_client_ttft_and_calibrate_reads_the_legs() -> None:
    table = _table()
    t0 = 1_000_000.0
    outcomes: list[_Outcome] = []
    requests: list[et.EngineRequest] = []
    steps: list[et.EngineStep] = []
    step = table.step_ms([], 1, 200) / 1e3
    for k in range(20):
        sent = 2.0 * k
        arrival = t0 + sent + 0.020  # 20 ms in
        first = 0.015  # engine: arrival -> first token
        decode = 9 * 2 * step  # steps twice the table's
        # first token back after 40 ms, the last after 15 ms: the stream lead is 25 ms
        outcomes.append(
            _Outcome(k, sent, t0 + sent, sent + 0.020 + first + 0.040, sent + 0.020 + first + decode + 0.015, 10, "r1")
        )
        requests.append((arrival, first, 0.001, 0.012, decode, 200, 10, 128))
        steps.extend((arrival + first + (j + 1) * 2 * step, 0, 1, 2 * step, 1, 0) for j in range(9))
    # A record of another replica and one generated-token count apart never match.
    timelines: dict[str, dict[str, list[Any]]] = {
        "r1": {"requests": list(requests), "steps": list(steps)},
        "r2": {"requests": requests[:3], "steps": []},
    }
    b = et.breakdown(outcomes, timelines, table, 200.0)
    assert b["matched"] == 20
    assert b["path_in_ms"]["p50"] == pytest.approx(20.0)
    assert b["path_first_token_back_ms"]["p50"] == pytest.approx(40.0)
    assert b["stream_lead_ms"]["p50"] == pytest.approx(25.0)
    assert b["client_overhead_ms"]["p50"] == pytest.approx(75.0 - 13.0)  # less queue and prefill
    assert b["decode_steps_vs_table"]["ratio"]["p50"] == pytest.approx(2.0)
    terms = et.calibrate(b)
    assert terms["request_overhead_ms"] == pytest.approx(62.0)
    assert terms["stream_lead_ms"] == pytest.approx(25.0)
    assert terms["engine_step_scale"] == pytest.approx(2.0)
    assert terms["engine_step_scale_autocorr"] == 0.0  # every step exactly twice the table
    SimulatorConfig.model_validate(terms)  # what it measures is a valid profile section


def test_a_spread_draws_between_its_quantiles_and_a_constant_stays_one() -> None:
    values = [float(v) for v in range(101)]
    q = quantiles_of(values)
    assert len(q) == len(PROBS) and q[0] == pytest.approx(5.0) and q[-1] == pytest.approx(95.0)
    s = Spread(q, seed=1)
    draws = [s.draw() for _ in range(2000)]
    assert 5.0 <= min(draws) and max(draws) <= 95.0
    assert s.median == pytest.approx(50.0)
    assert sorted(draws)[1000] == pytest.approx(50.0, abs=5.0)
    assert Spread(q, seed=1).draw() == Spread(q, seed=1).draw()
    assert Spread([7.0]).draw() == 7.0
    with pytest.raises(ValueError):
        Spread([1.0, 2.0])


def test_correlated_draws_keep_the_spread_and_carry_into_the_next() -> None:
    q = quantiles_of([float(v) for v in range(101)])
    alone = Spread(q, seed=3)
    runs = Spread(q, seed=3, autocorr=0.9)
    a = [alone.draw() for _ in range(4000)]
    b = [runs.draw() for _ in range(4000)]
    # Each draw has the same measured spread either way ...
    assert sorted(b)[2000] == pytest.approx(50.0, abs=6.0)
    assert 5.0 <= min(b) and max(b) <= 95.0
    # ... and the lag-1 correlation measured back is what was drawn (about).
    assert lag1_autocorr([a]) < 0.1
    assert lag1_autocorr([b]) == pytest.approx(0.9, abs=0.05)

    # Means over 20 consecutive draws (one request's steps) vary far more in runs.
    def spread_of_means(xs: list[float]) -> float:
        means = sorted(sum(xs[i : i + 20]) / 20 for i in range(0, len(xs), 20))
        return means[int(len(means) * 0.9)] - means[int(len(means) * 0.1)]

    assert spread_of_means(b) > 2 * spread_of_means(a)
    with pytest.raises(ValueError, match="autocorr"):
        Spread(q, autocorr=1.0)


def test_autocorr_pools_series_and_never_pairs_across_them() -> None:
    up = [float(v) for v in range(50)]
    # Two rising series: strongly correlated within each; the jump between them is no pair.
    assert lag1_autocorr([up, up]) > 0.9
    assert lag1_autocorr([[1.0, 2.0]]) == 0.0  # too few pairs
    alternating = [float(v % 2) for v in range(60)]
    assert lag1_autocorr([alternating]) == 0.0  # negative correlation clamps to 0


def test_horizon_autocorr_reads_back_an_ar1_and_sees_spells_longer_than_lag_one() -> None:
    q = quantiles_of([float(v) for v in range(101)])
    ar = Spread(q, seed=4, autocorr=0.6)
    steps = [ar.draw() for _ in range(6000)]
    # From an AR(1) the 20-step means give back its own correlation ...
    assert horizon_autocorr([steps], 20) == pytest.approx(0.6, abs=0.08)
    assert ar1_mean_variance(0.0, 20) == pytest.approx(1 / 20)
    assert ar1_mean_variance(0.6, 1) == pytest.approx(1.0)
    # ... while slow spells of 40 steps under step-to-step jitter (little lag-1
    # correlation) make 20-step means vary like a strongly correlated chain.
    rng = random.Random(7)
    spells = [(3.0 if (i // 40) % 4 == 0 else 1.0) * rng.uniform(0.3, 1.7) for i in range(6000)]
    assert horizon_autocorr([spells], 20) > lag1_autocorr([spells]) + 0.2
    assert horizon_autocorr([[1.0, 2.0, 3.0]], 20) == 0.0  # no whole window
    assert horizon_autocorr([[float(v % 2) for v in range(200)]], 20) == 0.0  # means of alternation are flat


def test_contention_is_measured_from_steps_beside_another_engines() -> None:
    # Replica a steps every 10 ms; b steps only in the second half, where both run
    # 1.6x slower (ratio 2.0 alone, 3.2 beside the other).
    steps: list[tuple[str, Any]] = []
    ratios: list[float] = []
    for j in range(100):
        end = 0.010 * (j + 1)
        steps.append(("a", (end, 0, 1, 0.010, 1, 0)))
        ratios.append(2.0 if j < 50 else 3.2)
        if j >= 50:
            steps.append(("b", (end + 0.002, 0, 1, 0.010, 1, 0)))
            ratios.append(3.2)
    overlaps = et.step_overlaps(steps)
    assert overlaps[:50] == [0] * 50 and all(k == 1 for k in overlaps[50:])
    assert et.contention_scale(ratios, overlaps) == pytest.approx(1.6)
    assert et.contention_scale(ratios[:30], overlaps[:30]) == 1.0  # nothing shared to measure
    assert et.contention_scale([2.0] * 60, [0] * 30 + [1] * 30) == 1.0  # shared steps no slower


def test_overhead_slope_reads_the_medians_by_requests_in_flight() -> None:
    # 70 ms alone, +15 ms per other request in flight, one stalled request per count.
    overhead, in_flight = [], []
    for k, n in ((0, 40), (1, 20), (2, 10), (3, 6)):
        overhead += [70.0 + 15 * k] * (n - 1) + [900.0]
        in_flight += [k] * n
    assert et.overhead_slope_ms(overhead, in_flight) == pytest.approx(15.0)
    # A count with too few requests is left out; one count alone has no slope.
    assert et.overhead_slope_ms(overhead + [5000.0] * 4, in_flight + [9] * 4) == pytest.approx(15.0)
    assert et.overhead_slope_ms([70.0] * 10, [0] * 10) == 0.0
    assert et.overhead_slope_ms([90.0] * 10 + [70.0] * 10, [0] * 10 + [1] * 10) == 0.0  # falling: none


def test_batch_stretch_is_the_step_scales_growth_per_sequence_beyond_the_first() -> None:
    # One sequence: 2.0x the table; each more: +0.5 (a quarter of the one-sequence step).
    ratios, sequences = [], []
    for n, count in ((1, 60), (2, 20), (3, 8)):
        ratios += [2.0 + 0.5 * (n - 1)] * count
        sequences += [n] * count
    assert et.batch_stretch(ratios, sequences) == pytest.approx(0.25)
    assert et.batch_stretch([2.0] * 30, [1] * 30) == 0.0  # one batch size: nothing to read
    assert et.median_slope([3.0] * 10 + [2.0] * 10, [0] * 10 + [1] * 10) == (0.0, 2.5)  # falling: flat


def test_prefill_scale_is_solved_from_the_steps_that_carried_a_prefill_chunk() -> None:
    # Decode steps at 2x the table; steps with a prefill chunk whose prefill part ran 3x
    # further: a x (D + P) = 2 x (D + 3 P).
    table = EngineStepTable(
        {
            "decode_ms": {"batch": [1, 8], "context": [0, 4096], "ms": [[5, 6], [7, 9]]},
            "prefill_ms": {"chunk": [32, 1024], "context": [0, 4096], "ms": [[10, 14], [105, 140]]},
        }
    )
    steps: list[tuple[str, Any]] = [("a", (0.01 * j, 0, 2, 0.01, 2, 0)) for j in range(40)]
    steps += [("a", (1.0 + 0.05 * j, 256 + 64 * j, 2, 0.05, 3, 0)) for j in range(9)]
    parts = et.step_parts(steps, table, 100.0)
    assert all(p == 0 for _, p in parts[:40]) and all(p > 0 for _, p in parts[40:])
    d, p = parts[40]
    assert d + p == pytest.approx(table.step_ms([(256, 0)], 2, 200))
    alone = [2.0] * 40 + [2.0 * (d + 3 * p) / (d + p) for d, p in parts[40:]]
    assert et.prefill_scale(alone, parts) == pytest.approx(3.0)
    # Too few such steps, or no decode step to compare with: the table's mix.
    assert et.prefill_scale(alone[:44], parts[:44]) == 1.0
    assert et.prefill_scale(alone[40:], parts[40:]) == 1.0
    # A chunk's context: the cached tokens of the request whose first token that step gave
    # (arrival + first-token latency at the step, on another clock: within half a step).
    timelines = {"a": {"requests": [(0.9, 0.152, 0.0, 0.1, 0.2, 2368, 8, 2048), (1.0, 0.5, 0.0, 0.5, 0.1, 64, 4, 32)]}}
    contexts = et.prefill_contexts(steps, timelines)
    assert contexts[:40] == [0] * 40 and contexts[41] == 2048 and contexts.count(2048) == 1
    assert contexts.count(32) == 0  # its first token came out of no step here
    d, p = et.step_parts(steps, table, 100.0, contexts)[41]
    assert d + p == pytest.approx(table.step_ms([(320, 2048)], 2, 200)) and p > parts[41][1]


def test_cpu_flags_are_read_off_cpuinfo_and_a_difference_from_the_tables_machine_is_named() -> None:
    from bench.calibration.cpu_flags import flags_note, parse_cpu_flags

    cpuinfo = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 ht\n\nprocessor\t: 1\nflags\t: fpu\n"
    assert parse_cpu_flags(cpuinfo) == ["avx2", "fma", "avx512f", "avx512_bf16"]
    assert parse_cpu_flags("processor\t: 0\n") == []
    assert flags_note(["avx2", "avx512f"], ["avx2", "avx512f"]) is None
    assert flags_note(None, ["avx2"]) is None
    note = flags_note(["avx2", "fma", "avx512f", "avx512_bf16"], ["avx2", "fma"])
    assert note is not None and "lacks avx512f, avx512_bf16" in note and "adds" not in note


def test_a_replay_says_when_the_step_table_is_not_this_machines() -> None:
    from bench.live.replay_cluster import table_mismatch

    assert table_mismatch({"engine_prefill_scale_measured": 1.3, "cpu_flags": {"here": ["avx2"]}}) is None
    assert "x4.4" in (table_mismatch({"engine_prefill_scale_measured": 4.4}) or "")
    flags = {"here": ["avx2", "avx512f"], "step_table": ["avx2", "avx512f", "amx_bf16"]}
    both = table_mismatch({"engine_prefill_scale_measured": 0.2, "cpu_flags": flags})
    assert both is not None and "x0.2" in both and "lacks amx_bf16" in both
