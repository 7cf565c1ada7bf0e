"""Validation of the cluster simulator on small traces built here (never ../shared):
a lone request reproduces the step-time model exactly, requests and tokens are
conserved, the hit rate stays under the trace's ceiling, seeds reproduce runs, and
over-long requests are rejected and counted."""

from __future__ import annotations

import itertools
import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from bench.calibration.step_time import StepTimeModel
from bench.sim.metrics import format_table, summarize
from bench.sim.simulator import ClusterSimulator, SimResult, split_replicas
from bench.traces import SyntheticSpec, Trace, TraceRequest, synthetic_multiturn
from cluster.config import ClusterConfig
from cluster.profiles import load_profile
from cluster.routing.policy import ReplicaView, RouteRequest
from cluster.routing.registry import POLICY_NAMES

B = 512


def _req(rid: str, t: float, prompt: int, output: int, first_id: int) -> TraceRequest:
    return TraceRequest(rid, t, prompt, output, tuple(range(first_id, first_id + math.ceil(prompt / B))))


@pytest.fixture(scope="module")
def cfg() -> ClusterConfig:
    return load_profile("h100x8-bf16")


@pytest.fixture(scope="module")
def conversations() -> Trace:
    spec = SyntheticSpec(
        conversations=50,
        conversation_rate_per_s=2.0,
        mean_turns=4,
        system_prompts=3,
        system_prompt_tokens=4096,
        mean_user_tokens=600,
        mean_output_tokens=150,
        mean_think_s=5.0,
        block_size=B,
        max_prompt_tokens=30000,
        seed=11,
    )
    return synthetic_multiturn(spec)


def _steps(model: StepTimeModel, prompt: int, output: int, budget: int, cached: int = 0) -> tuple[float, float]:
    """TTFT and E2E of a request alone on a replica, straight from the step-time model."""
    t = 0.0
    done = cached
    while done < prompt:
        n = min(prompt - done, budget)
        t += model.step_ms([(n, done)], 0, 0) / 1000.0
        done += n
    ttft = t
    for g in range(1, output):
        t += model.step_ms((), 1, prompt + g) / 1000.0
    return ttft, t


def test_lone_request_matches_step_time_model(cfg: ClusterConfig) -> None:
    pool = cfg.pool("standard")
    prompt, output = 20000, 40
    trace = Trace("lone", B, [_req("a", 0.0, prompt, output, 0)])
    res = ClusterSimulator(cfg, trace, policy="round-robin", replicas={"standard": 1}).run(check=True)
    ttft, e2e = _steps(StepTimeModel.for_pool(cfg, pool), prompt, output, pool.engine.max_num_batched_tokens)
    assert res.first_token[0] == pytest.approx(ttft, rel=1e-12)
    assert res.finish[0] == pytest.approx(e2e, rel=1e-12)
    assert res.hit_blocks[0] == 0


def test_repeated_prompt_is_served_from_cache(cfg: ClusterConfig) -> None:
    """The same prompt again, after the first finished: only its last token is computed."""
    pool = cfg.pool("standard")
    prompt, output = 20000, 3
    model = StepTimeModel.for_pool(cfg, pool)
    first = _req("a", 0.0, prompt, output, 0)
    again = TraceRequest("b", 100.0, prompt, output, first.block_ids)
    res = ClusterSimulator(cfg, Trace("again", B, [first, again]), policy="round-robin", replicas={"standard": 1}).run(
        check=True
    )
    ttft, e2e = _steps(model, prompt, output, pool.engine.max_num_batched_tokens, cached=prompt - 1)
    assert res.first_token[1] - 100.0 == pytest.approx(ttft, rel=1e-9)
    assert res.finish[1] - 100.0 == pytest.approx(e2e, rel=1e-9)
    assert res.hit_blocks[1] == len(first.block_ids)
    assert res.hit_tokens[1] == prompt - 1


def _check_conservation(res: SimResult, no_preemption: bool) -> None:
    for i, rejected in enumerate(res.rejected):
        if rejected:
            assert res.finish[i] < 0 and res.replica[i] == ""
        else:
            assert res.arrival[i] < res.first_token[i] <= res.finish[i], i
    decode = sum(r["decode_tokens"] for r in res.replica_stats)
    prefill = sum(r["prefill_tokens"] for r in res.replica_stats)
    done = [i for i, rej in enumerate(res.rejected) if not rej]
    emitted = sum(r["emitted_tokens"] for r in res.replica_stats)
    assert emitted == sum(res.output_tokens[i] for i in done)
    uncached = sum(res.prompt_tokens[i] - res.hit_tokens[i] for i in done)
    if no_preemption:
        # Each request: its uncached prompt in prefill steps, then one decode step per
        # token after the first.
        assert prefill == uncached
        assert decode == sum(res.output_tokens[i] - 1 for i in done)
    else:
        # Preempted sequences recompute (prefill again) and emit a token at its end.
        assert prefill > uncached
        assert decode < sum(res.output_tokens[i] - 1 for i in done)
    assert sum(r["requests"] for r in res.replica_stats) == len(done)
    assert sum(r["routed_tokens"] for r in res.replica_stats) == sum(
        res.prompt_tokens[i] + res.output_tokens[i] for i in done
    )


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_conservation_and_ceiling_every_policy(cfg: ClusterConfig, conversations: Trace, policy: str) -> None:
    res = ClusterSimulator(cfg, conversations, policy=policy, replicas={"standard": 4}).run(check=True)
    _check_conservation(res, no_preemption=sum(res.preemptions) == 0)
    s = summarize(res)
    assert s["completed"] == len(conversations)
    assert 0.0 <= s["block_hit_rate"] <= s["block_hit_ceiling"]
    assert 0.0 <= s["token_hit_rate"] <= s["token_hit_ceiling"]
    assert s["throughput_output_tok_s"] > 0
    json.dumps(s)  # results files hold summaries as they are


def test_cache_aware_routing_reuses_more_than_random(cfg: ClusterConfig, conversations: Trace) -> None:
    hit = {}
    for policy in ("cache-aware", "random"):
        res = ClusterSimulator(cfg, conversations, policy=policy, replicas={"standard": 4}, seed=3).run()
        hit[policy] = summarize(res)["block_hit_rate"]
    assert hit["cache-aware"] > hit["random"]


def test_identical_seeds_identical_results(cfg: ClusterConfig, conversations: Trace) -> None:
    def run(seed: int) -> SimResult:
        return ClusterSimulator(cfg, conversations, policy="random", replicas={"standard": 4}, seed=seed).run()

    a, b, c = run(5), run(5), run(6)
    for field in ("first_token", "finish", "replica", "hit_blocks", "preemptions"):
        assert getattr(a, field) == getattr(b, field)
    assert a.replica != c.replica  # the seed is what makes the random policy repeat


def test_decode_runs_equal_step_by_step(cfg: ClusterConfig, conversations: Trace) -> None:
    """Fast-forwarded decode runs give exactly the step-by-step results."""
    kw = dict(policy="cache-aware", replicas={"standard": 3}, seed=1)
    fast = ClusterSimulator(cfg, conversations, decode_runs=True, **kw).run(check=True)  # type: ignore[arg-type]
    slow = ClusterSimulator(cfg, conversations, decode_runs=False, **kw).run(check=True)  # type: ignore[arg-type]
    assert fast.first_token == slow.first_token
    assert fast.finish == slow.finish
    assert fast.replica == slow.replica
    assert sum(r["steps"] for r in fast.replica_stats) == sum(r["steps"] for r in slow.replica_stats)


def test_recorded_routes_replay_a_run_exactly() -> None:
    """Routing a run's requests where that run sent them (the labels renamed) reproduces
    it request by request: the recorded policy changes only who decides, not the timing
    model (what the real-vs-simulated timing check compares at the real routing)."""
    from bench.live.replay_cluster import simulate_same
    from bench.sim.recorded_routes import RecordedRoutes

    cpu = load_profile("cpu-tiny")  # measured spreads and contention: every term drawn per seed
    trace = _replay_trace(cpu.pools[0].engine.block_size, seed=5)
    replicas = {p.name: p.start_replicas for p in cpu.pools}
    runs = (ClusterSimulator(cpu, trace, policy="cache-aware", replicas=replicas, seed=s).run() for s in range(15))
    seed, split = next((s, res) for s, res in enumerate(runs) if len(set(res.replica)) > 1)
    routes = {r.request_id: f"real-{name[::-1]}" for r, name in zip(trace.requests, split.replica, strict=True)}
    again = ClusterSimulator(
        cpu,
        trace,
        policy="cache-aware",
        replicas=replicas,
        seed=seed,
        policy_factory=lambda name, **_: RecordedRoutes(routes),
    ).run()
    assert len(set(again.replica)) == len(set(split.replica)) == 2
    assert again.first_token == split.first_token and again.finish == split.finish
    summary = simulate_same(cpu, trace, repeats=3, routes=routes)
    shares = sorted(Counter(split.replica).values(), reverse=True)
    assert all(c == {"standard": shares} for c in summary["requests_per_replica_by_seed"])
    with pytest.raises(KeyError):
        RecordedRoutes({}).choose(RouteRequest("unknown", 1), [ReplicaView("a")])
    scaled = RecordedRoutes({"x": "r1", "y": "r2"})  # the real pool had a second replica
    assert scaled.choose(RouteRequest("x", 1), [ReplicaView("a")]).replica_id == "a"
    with pytest.raises(ValueError, match="used 2 replicas"):
        scaled.choose(RouteRequest("y", 1), [ReplicaView("a")])


def test_over_long_requests_are_rejected_and_pools_by_context(cfg: ClusterConfig) -> None:
    reqs = [
        _req("short", 0.0, 1000, 10, 0),
        _req("long", 0.1, 40000, 10, 1000),  # > 32k: the long pool
        _req("too-long-prompt", 0.2, 140000, 10, 2000),
        _req("too-long-total", 0.3, 130000, 2000, 3000),  # 132,000 > 131,072
    ]
    trace = Trace("mixed", B, reqs)
    res = ClusterSimulator(cfg, trace, policy="pow2", replicas={"standard": 1, "long": 1}).run(check=True)
    assert res.rejected == [False, False, True, True]
    assert res.pool[:2] == ["standard", "long"]
    s = summarize(res)
    assert s["rejected"] == 2 and s["completed"] == 2
    _check_conservation(res, no_preemption=True)


def test_preemption_under_kv_pressure(cfg: ClusterConfig) -> None:
    """A replica with little KV memory preempts and recomputes, and still finishes all."""
    data = cfg.to_dict()
    # 0.43 x 80 GiB leaves ~1.7 GiB per GPU for KV after weights and reserve: ~80 blocks.
    data["pools"] = [dict(data["pools"][0])]
    data["pools"][0]["engine"] = dict(data["pools"][0]["engine"], gpu_memory_utilization=0.43)
    small = ClusterConfig.model_validate(data)
    capacity = small.memory_plan(small.pools[0]).kv_tokens_per_replica // B
    assert 64 <= capacity <= 128
    reqs = [_req(f"r{i}", 0.01 * i, 6000, 1500, 100 * i) for i in range(20)]
    trace = Trace("pressure", B, reqs)
    res = ClusterSimulator(small, trace, policy="round-robin", replicas={"standard": 1}).run(check=True)
    assert sum(res.preemptions) > 0
    _check_conservation(res, no_preemption=False)
    # Decode runs stop before a step that would need a preemption: same as step by step.
    slow = ClusterSimulator(small, trace, policy="round-robin", replicas={"standard": 1}, decode_runs=False).run()
    assert (slow.finish, slow.preemptions) == (res.finish, res.preemptions)


def test_split_replicas_follows_token_share(cfg: ClusterConfig) -> None:
    # 60 x 2,100 tokens for the standard pool, 60,100 for the long one: about 2:1.
    reqs = [_req(f"s{i}", i, 2000, 100, 10 * i) for i in range(60)] + [_req("l", 70, 60000, 100, 9999)]
    split = split_replicas(cfg, Trace("t", B, reqs), 8)
    assert sum(split.values()) == 8
    assert split == {"standard": 5, "long": 3}


def test_cli_writes_results_and_plots(tmp_path: Path, conversations: Trace) -> None:
    from bench.sim import cli as sim_cli

    path = tmp_path / "trace.jsonl"
    with path.open("w") as f:
        for r in conversations.requests[:60]:
            row = {
                "timestamp": int(r.arrival_s * 1000),
                "input_length": r.prompt_tokens,
                "output_length": r.output_tokens,
                "hash_ids": list(r.block_ids),
            }
            f.write(json.dumps(row) + "\n")
    out = tmp_path / "out"
    rc = sim_cli.main(
        ["--trace", str(path), "--replicas", "2", "--policy", "cache-aware,random", "--rate-scale", "1,2"]
        + ["--jobs", "1", "--out", str(out)]
    )
    assert rc == 0
    result = json.loads((out / "results.json").read_text())
    assert len(result["runs"]) == 4
    assert {r["policy"] for r in result["runs"]} == {"cache-aware", "random"}
    assert (out / "latency_vs_load.png").stat().st_size > 10_000
    assert (out / "hit_rate.png").stat().st_size > 10_000
    assert "cache-aware" in format_table(result["runs"])
    assert sim_cli.main(["--trace", str(path), "--policy", "nope", "--out", str(out)]) == 2
    assert sim_cli.main(["--trace", str(path), "--seeds", "0", "--out", str(out)]) == 2

    # Three seeds: one row per (policy, rate scale), the mean of its seeds' runs.
    rc = sim_cli.main(
        ["--trace", str(path), "--replicas", "2", "--policy", "pow2", "--rate-scale", "2", "--seeds", "3"]
        + ["--jobs", "1", "--out", str(out), "--no-plots", "--goodput", "pow2", "--goodput-max", "4"]
    )
    assert rc == 0
    result = json.loads((out / "results.json").read_text())
    (row,) = result["runs"]
    assert row["seeds"] == [0, 1, 2] and result["seeds"] == 3
    per_seed = row["per_seed"]["ttft_p50_s"]
    assert len(per_seed) == 3 and row["ttft_p50_s"] == pytest.approx(sum(per_seed) / 3)
    assert result["goodput_runs"] and all(r["seeds"] == [0, 1, 2] for r in result["goodput_runs"])
    assert "mean over seeds 0-2" in (out / "table.txt").read_text()

    # The perfect-reuse fleet's goodput, searched beside the policy's, bounds it.
    rc = sim_cli.main(
        ["--trace", str(path), "--replicas", "2", "--policy", "pow2", "--rate-scale", "2", "--goodput", "pow2"]
        + ["--ceiling", "pow2", "--ceiling-cache", "perfect,pooled", "--goodput-max", "64"]
        + ["--jobs", "1", "--out", str(out)]
    )
    assert rc == 0
    assert (out / "slo_attainment.png").stat().st_size > 10_000
    result = json.loads((out / "results.json").read_text())
    perfect = result["goodput_ceiling"]["perfect-reuse/pow2"]
    pooled = result["goodput_ceiling"]["pooled-cache/pow2"]
    assert perfect["bounded"] and pooled["bounded"] and result["goodput"]["pow2"]["bounded"]
    assert result["goodput_ceiling_rate_scale"] == {"perfect": perfect["rate_scale"], "pooled": pooled["rate_scale"]}
    assert perfect["rate_scale"] >= pooled["rate_scale"] >= result["goodput_rate_scale"]["pow2"] > 0
    assert {r["policy"] for r in result["goodput_runs"]} == {"pow2", "perfect-reuse/pow2", "pooled-cache/pow2"}
    table = (out / "table.txt").read_text()
    assert "perfect-reuse fleet" in table and "pooled-cache fleet" in table
    assert sim_cli.main(["--trace", str(path), "--ceiling", "nope", "--out", str(out)]) == 2
    assert sim_cli.main(["--trace", str(path), "--ceiling", "pow2", "--ceiling-cache", "big", "--out", str(out)]) == 2


def test_bench_subcommands_pass_options_through(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from bench.cli import BENCHMARKS, register

    parser = argparse.ArgumentParser(prog="cluster")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", "sim", "--trace", str(tmp_path / "missing.jsonl"), "--replicas", "2"])
    assert args.bench_name == "sim"
    assert args.bench_argv == ["--trace", str(tmp_path / "missing.jsonl"), "--replicas", "2"]
    assert args.func(args) == 2  # the sim benchmark ran and refused the missing trace
    assert "trace not found" in capsys.readouterr().err
    assert set(BENCHMARKS) >= {"sim", "replay", "router", "router-cluster", "sessions"}


def _replay_trace(block_size: int, seed: int) -> Trace:
    """The scaled synthetic conversation trace the real-vs-simulated test replays."""
    from bench.live.replay_cluster import scale_trace

    spec = SyntheticSpec(
        conversations=12,
        conversation_rate_per_s=1.0,
        mean_turns=3,
        system_prompts=2,
        mean_think_s=3.0,
        seed=seed,
    )
    source = synthetic_multiturn(spec)
    # Outputs 4x longer than the tokens' scale (8-48 tokens): over 1-16 tokens client TPOT
    # was mostly the first token's ~17 ms extra way back, not the engine's steps.
    scale = block_size / source.block_size
    return scale_trace(source, scale, max_output=48, output_scale=4 * scale, min_output=8)


@pytest.mark.e2e
def test_replay_hit_rate_and_timing_match_real_engines(local_cluster: Any) -> None:
    """The same scaled conversation trace through the real cluster (gateway, request
    router, vLLM engines) and through the simulator: vLLM's own prefix-cache counters
    agree with the simulator's cache model, and the client's TTFT and TPOT p50/p90 agree
    with the simulator's, as a prediction: the simulator's serving-path terms (request
    overhead, stream lead, step scale, with their spreads) are measured from the
    engines' own records during a replay of a *different* trace (seed 6) right after
    the test trace (seed 5), and the simulator's prediction for seed 5 is compared. Loose bounds: the machine is a
    noisy shared 2-core VM; `cluster bench replay --engine-timing` reports the figures."""
    import os

    from bench.live.prefix_counters import metrics_urls
    from bench.live.replay_cluster import (
        SIM_REPEATS,
        TIMING_KEYS,
        apply_sim_terms,
        at_replay_speed,
        disjoint_twin,
        engine_timing,
        recorded_routes,
        replay_and_measure,
        simulate_same,
        table_mismatch,
        timing_errors,
    )

    cfg = local_cluster.cfg
    api_key = getattr(local_cluster, "api_key", None) or "none"
    block = cfg.pools[0].engine.block_size
    metrics_url = next(iter(metrics_urls()), None)
    assert metrics_url is not None
    # What ran before on the shared cluster (a replica being replaced, another cluster
    # torn down) can leave the cores busy, and the checked replay then runs its engines
    # and serving path slower than the calibration replay right after it: a clean-clone CI
    # run started at load average 7.9 and predicted TTFT p50 -48% (engine step scale 3.42
    # against 2.67, request overhead 101 against 64 ms). Wait, bounded, for it to settle.
    settle_until = time.monotonic() + 120
    while os.getloadavg()[0] > 2.5 and time.monotonic() < settle_until:
        time.sleep(5)
    load_before = os.getloadavg()
    # The checked trace first, on a cache that has none of its blocks (both traces share
    # system prompts), then the calibration trace right after it: the prediction for
    # seed 5 uses only what seed 6's replay measured.
    # Warmed by the same trace on blocks of its own: the first replay after the engines
    # start met each batch shape first and ran slower than the one after it (the
    # prediction's errors all went one way: TTFT p50 -29%, -37%, -48%, -60% in four runs,
    # with two short warm-up requests only).
    trace = _replay_trace(block, seed=5)
    outcomes, real = replay_and_measure(
        local_cluster.base_url,
        metrics_url,
        cfg,
        trace,
        warm_up_requests=2,
        warm_up_trace=disjoint_twin(trace),
        api_key=api_key,
    )
    calibration_trace = _replay_trace(block, seed=6)
    calibration_outcomes, _ = replay_and_measure(
        local_cluster.base_url, None, cfg, calibration_trace, warm_up_requests=0, api_key=api_key
    )
    measured = engine_timing(cfg, calibration_trace, calibration_outcomes)
    terms = measured["calibration"]
    assert real["completed"] == len(trace) and real["failed"] == 0, real["failures"]
    assert real["generated_tokens"] == real["expected_tokens"]
    profile_sim = simulate_same(cfg, trace)
    ceiling = trace.stats().token_hit_ceiling
    engine = real["engine_token_hit_rate"]
    assert engine is not None
    assert 0.3 < engine <= ceiling + 1e-9
    assert abs(engine - profile_sim["token_hit_rate"]) < 0.1

    predicted_cfg = cfg.model_copy(deep=True)
    apply_sim_terms(predicted_cfg, terms)
    # The median over the CLI's seeds, as `bench replay` reports it: one draw of 34
    # requests' spreads moves a p90 by 10-20% on its own.
    sim = simulate_same(predicted_cfg, trace, repeats=SIM_REPEATS)
    errors = timing_errors(real, sim)
    # The same prediction at the checked replay's own machine speed (its engines' step
    # scale and its serving path's overhead): the model's error without the machine's
    # drift between the two replays.
    checked = engine_timing(cfg, trace, outcomes)
    at_speed_cfg = cfg.model_copy(deep=True)
    apply_sim_terms(at_speed_cfg, at_replay_speed(terms, checked["calibration"]))
    at_speed = timing_errors(real, simulate_same(at_speed_cfg, trace, repeats=SIM_REPEATS))
    # ... and with every request where the real router sent it: the timing model alone.
    routes = recorded_routes(trace, outcomes)
    assert len(routes) == len(trace)
    routed_sim = simulate_same(at_speed_cfg, trace, repeats=SIM_REPEATS, routes=routes)
    at_routing = timing_errors(real, routed_sim)
    print(
        "replay timing:",
        json.dumps(
            {
                "real": {k: real[k] for k in TIMING_KEYS},
                "predicted": {k: sim[k] for k in TIMING_KEYS},
                "errors": errors,
                "errors_at_the_checked_engine_speed": at_speed,
                "errors_at_that_speed_and_the_real_routing": at_routing,
                "simulated_per_replica": sim["requests_per_replica_by_seed"],
                "profile_terms_errors": timing_errors(real, profile_sim),
                "terms_from_the_calibration_replay": terms,
                "calibration_breakdown": {k: v for k, v in measured.items() if k not in ("samples", "calibration")},
                "validation_breakdown": {k: v for k, v in checked.items() if k != "samples"},
                "real_per_replica": real["requests_per_replica"],
                "load_average": [load_before, os.getloadavg()],
            }
        ),
    )
    assert set(errors) == set(TIMING_KEYS)
    # Bounds (lower, upper) on (predicted - real) / real on the shared 2-core VM
    # (bench/calibration/README.md, "Prediction"). TTFT p50 +16% / +14% / -17% / -11% / -4%
    # over five runs, p90 +52% / -4% / -7% / -6% / -1%; a lost overhead term (main's
    # constant 41 ms: -32% / -56%) or a lost engine part fails the p50 bound. TPOT: with
    # replies of 1-16 tokens it was mostly the first token's ~17-30 ms extra way back, a
    # small difference of two terms (errors -81% to +252%); with 8-48 tokens it is the
    # engine's steps: p50 +25% / -9% / -11%, p90 -30% / -29% / -22% (three runs, load 1.5-5.6),
    # but a clean-clone CI run gave p50 -37%, p90 -68%: the engines stepped 1.4-1.7x slower
    # in this replay than in the calibration one right after it (ITL p90 24.2 against
    # 14.2 ms). Either way the machine's other work changes the engines' speed between the
    # two replays (1.6x in one session), so the TPOT bounds stay as loose as that. The same
    # drift the other way failed TTFT p50 at +50% in a clean-clone run (p90 +54%): the
    # calibration replay's client TTFT p50 was 178 ms against the checked replay's 127 ms,
    # so its measured request overhead (140 ms) was too high. A lost term makes the
    # prediction low, which the lower bound still catches; the upper one allows that drift.
    # The drift the other way: a clean-clone CI run at load average 7.9 gave TTFT p50 -48%
    # (-38% at the checked replay's engine speed; its serving path took 101 ms against the
    # calibration replay's 64) and a solo run on a fresh cluster -37% (-24% at engine
    # speed), so the prediction's lower bound allows that much; the at-speed bounds below,
    # which take the serving path's overhead from the checked replay too, catch a lost term.
    bounds = {
        "ttft_p50_s": (-0.55, 0.6),
        "ttft_p90_s": (-0.75, 0.75),
        "tpot_p50_ms": (-0.8, 1.5),
        "tpot_p90_ms": (-0.75, 1.5),
    }
    # A failure on a CPU unlike the step table's says so (bench/calibration/cpu_flags.py).
    mismatch = table_mismatch(checked)
    assert all(lo < errors[k] < hi for k, (lo, hi) in bounds.items()), (errors, mismatch)
    # At the checked replay's own machine speed the drift between the replays is gone.
    # Before the engines' contention, the in-flight path slope and the spell-length
    # correlation were modelled, TPOT p90 stayed low there (-17% / -26% / -35%, and a
    # clean-clone CI run failed a -35% bound at -36%): its slowest replies were those
    # decoding beside another engine's steps (1.7-2.2x slower). With them, a 248-request
    # replay gave +5 / +11 / +5 / -5% at its own speed (bench/calibration/README.md,
    # session 10). This trace's p90s are the 4th-largest of 25-35 requests, and the real
    # router sometimes splits it over two replicas where the simulator's keeps it on one
    # (34 / 0 in one run, 18 / 16 in the next, which then gave TTFT p90 -37% and TPOT p90
    # -48% at speed, p50s -14% / -9%), so the p90 bounds stay wide; a lost term (the step
    # scale, the overhead) or a wrong table shape still fails the p50 bounds.
    # On a VM with AVX2 only (AMD EPYC, engine step scale 3.5 against the table) TTFT p50
    # was -37% / -38% at speed in two solo runs, both replays' terms alike: the engines'
    # prefill (157 ms at the median) was far above the simulator's while TPOT p50 was
    # -17%. The step scale is measured mostly on decode steps; a prefill scale measured
    # from the steps with a prefill chunk brought it to +14% / +8% but put a 248-request
    # check past capacity, so it is not applied and the TTFT p50 bound is -50%:
    # losing the overhead (a third of this TTFT) still fails it. On a VM with AVX-512 BF16
    # (2026-12-04) that prefill scale was 1.22-1.45 and this test gave +3 / +1 / -2 / -39%
    # at speed: the gap was most likely the table's CPU, which `mismatch` names.
    at_speed_bounds = {
        "ttft_p50_s": (-0.5, 0.5),
        "ttft_p90_s": (-0.6, 0.75),
        "tpot_p50_ms": (-0.35, 0.5),
        "tpot_p90_ms": (-0.65, 0.75),
    }
    assert all(lo < at_speed[k] < hi for k, (lo, hi) in at_speed_bounds.items()), (at_speed, mismatch)
    assert all(lo < at_routing[k] < hi for k, (lo, hi) in at_speed_bounds.items()), (at_routing, mismatch)
    # The profile's committed overhead still describes this serving path, on a machine as
    # fast as the one it was measured on; on a slower one the path slows with the engines
    # beside it on the same cores (a VM without AVX-512: engine steps 6.8-7.4x the table
    # against the profile's 1.21x, request overhead 161-175 ms against 72 ms), so the upper
    # bound scales by how much slower this replay's engines were. A lost term still fails
    # the lower bound.
    committed = cfg.simulator.request_overhead_ms
    slower = max(1.0, terms["engine_step_scale"] / cfg.simulator.engine_step_scale)
    assert 0.5 * committed < terms["request_overhead_ms"] < 2 * slower * committed, (terms, slower)


# -- async scheduling and reply blocks ----------------------------------------------------


def test_async_scheduling_admits_a_request_one_step_later(cfg: ClusterConfig) -> None:
    """A request arriving while a step runs joins the batch after next (the next one was
    formed when the running step launched); an idle engine takes an arrival at once."""
    long = _req("long", 0.0, 4000, 400, 0)
    late = _req("late", 0.5, 1000, 5, 100)  # arrives during the long request's decode
    trace = Trace("async", B, [long, late])
    kw: dict[str, Any] = {"policy": "round-robin", "replicas": {"standard": 1}}
    sync = ClusterSimulator(cfg, trace, async_scheduling=False, **kw).run(check=True)
    asyn = ClusterSimulator(cfg, trace, async_scheduling=True, **kw).run(check=True)
    # The idle engine: identical first step for the first request.
    assert asyn.first_token[0] == sync.first_token[0]
    model = StepTimeModel.for_pool(cfg, cfg.pool("standard"))
    decode_step = model.step_ms((), 1, 4000) / 1000.0
    delay = asyn.first_token[1] - sync.first_token[1]
    assert 0.5 * decode_step < delay < 2.5 * decode_step


def test_async_scheduling_frees_a_finished_slot_one_step_late(cfg: ClusterConfig) -> None:
    """With every batch slot taken, a waiting request gets a finished request's slot one
    step later under async scheduling; both runs keep every block accounted for."""
    data = cfg.to_dict()
    data["pools"] = [dict(data["pools"][0])]
    data["pools"][0]["engine"] = dict(data["pools"][0]["engine"], max_num_seqs=2)
    two = ClusterConfig.model_validate(data)
    reqs = [_req("short", 0.0, 1000, 20, 0), _req("long", 0.0, 1000, 200, 10), _req("waits", 0.01, 1000, 5, 20)]
    trace = Trace("slots", B, reqs)
    kw: dict[str, Any] = {"policy": "round-robin", "replicas": {"standard": 1}}
    sync = ClusterSimulator(two, trace, async_scheduling=False, **kw).run(check=True)
    asyn = ClusterSimulator(two, trace, async_scheduling=True, **kw).run(check=True)
    assert sync.first_token[2] > sync.finish[0]  # it did wait for the short request's slot
    assert asyn.first_token[2] > sync.first_token[2]
    _check_conservation(asyn, no_preemption=True)


def test_inferred_reply_blocks_let_a_follow_up_turn_hit_the_reply(cfg: ClusterConfig) -> None:
    """A follow-up turn (prompt + reply + more) whose ids extend an earlier request: the
    earlier request's reply blocks are read off the follow-up, so on the same replica the
    follow-up hits them; without the inference only the earlier prompt's blocks hit."""
    from bench.traces import infer_reply_blocks

    first = _req("t0", 0.0, 3000, 1200, 0)  # 5 full prompt blocks; prompt + reply fill 8
    follow_ids = first.block_ids[:5] + tuple(range(500, 505))  # 10 blocks: 5 shared, then new
    follow = TraceRequest("t1", 200.0, 5000, 10, follow_ids)
    other = _req("x", 1.0, 600, 5, 900)  # shares nothing: gets no reply blocks
    trace = Trace("turns", B, [first, other, follow])
    inferred, n = infer_reply_blocks(trace)
    assert n == 1
    assert inferred.requests[0].output_block_ids == follow_ids[5:8]
    assert inferred.requests[1].output_block_ids == ()
    kw: dict[str, Any] = {"policy": "round-robin", "replicas": {"standard": 1}}
    plain = ClusterSimulator(cfg, trace, **kw).run(check=True)
    reuse = ClusterSimulator(cfg, inferred, **kw).run(check=True)
    assert plain.hit_blocks[2] == 5
    # The reply's full blocks (computed tokens 3000 + 1199 -> blocks 5, 6, 7) hit too.
    assert reuse.hit_blocks[2] == 8
    assert inferred.stats().block_hit_ceiling > trace.stats().block_hit_ceiling


def test_published_check_replays_the_published_setup() -> None:
    """bench.calibration.published_check replays Lambda's 320 requests on one TP=8 replica: every
    request completes, the recorded steps cover the run, and the figures are reported
    next to the published ones (the comparison itself is in the README, not asserted)."""
    from bench.calibration.published_check import PUBLISHED, format_check, run_check, weighted_median

    assert weighted_median([(1.0, 1), (5.0, 3), (9.0, 0)]) == 5.0
    pub = json.loads(PUBLISHED.read_text())
    assert sum(pub["output_lens"]) == pub["figures"]["total_output_tokens"]
    result = run_check()
    sim = result["simulated"]
    assert 0 < sim["max_running"] <= pub["setup"]["server_args"]["max_num_seqs"]
    assert sim["duration_s"] > 0 and sim["median_itl_ms"] > 0
    assert sim["output_throughput_tok_s"] == pytest.approx(pub["figures"]["total_output_tokens"] / sim["duration_s"])
    assert "published" in format_check(result)


def test_blocks_are_cached_at_schedule_time(cfg: ClusterConfig) -> None:
    """Two requests with the same new prefix admitted into one batch (both arrive while a
    long prefill runs): the second shares the first's prompt blocks at once, as vLLM
    caches blocks when it allocates them, so only the first computes the shared part."""
    busy = _req("busy", 0.0, 20000, 5, 1000)  # three 8,192-token chunk steps
    first = _req("a", 0.01, 3000, 5, 0)
    second = TraceRequest("b", 0.01, 3000, 5, first.block_ids)
    res = ClusterSimulator(
        cfg, Trace("same-step", B, [busy, first, second]), policy="round-robin", replicas={"standard": 1}
    ).run(check=True)
    assert res.first_token[1] == res.first_token[2]  # one batch
    full = 3000 // B
    assert res.hit_blocks == [0, 0, full]
    assert sum(r["prefill_tokens"] for r in res.replica_stats) == 20000 + 3000 + (3000 - full * B)


class _UnitSteps:
    """Every step takes 1 ms: the replica logic alone (a fake for pure scheduling logic)."""

    def step_ms(self, prefill_chunks: Any, num_decode: int, decode_kv_tokens: int) -> float:
        return 1.0


def test_a_preempted_request_resumes_from_its_cached_prompt_and_reply() -> None:
    from bench.sim.replica_model import ReplicaModel, Seq
    from bench.traces import chain_block_ids

    bs = 16
    ids = itertools.count(1)
    rep = ReplicaModel(
        "r",
        step_time=_UnitSteps(),
        capacity_blocks=64,
        block_size=bs,
        max_num_seqs=4,
        max_num_batched_tokens=512,
        fresh_id=lambda: -next(ids),
    )
    req = TraceRequest("p", 0.0, 40, 100, (1, 2, 3))  # 2 full prompt blocks + a partial one
    seq = Seq(0, req, chain_block_ids(req.block_ids), bs)
    rep.enqueue(seq)
    now = 0.0
    while seq.generated < 30:
        now = rep.start_step(now, now + 0.0015)  # one step per event
        rep.finish_step(now)
    assert seq.computed == 40 + 29  # 4 full blocks: 2 of the prompt, 2 with the reply
    rep.running.remove(seq)
    rep._preempt(seq)  # what KV pressure does to the newest running sequence
    assert len(seq.resume) == 4
    now = rep.start_step(now, now + 0.0015)
    assert seq.computed == 4 * bs  # resumed from the cache, not from token 0
    while rep.has_work():
        rep.finish_step(now)
        if rep.has_work():
            now = rep.start_step(now, float("inf"))
    rep.release_finished(seq)
    rep.flush_late()
    rep.kv.check(0)
