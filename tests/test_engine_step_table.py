"""Whole-engine step tables (bench/calibration/engine_step_table.py): cells come back
exactly, a mixed step composes its parts, time never falls when work grows, the
simulator picks the committed cpu-tiny table, runs the CPU backend's synchronous
scheduler, and adds the profile's serving-path overhead to TTFT and E2E but not TPOT.
Tables are built here or read from the committed bench/calibration/; no engine runs."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest

from bench.calibration.engine_step_table import EngineStepTable, engine_step_table_for, engine_table_name
from bench.calibration.step_time import CALIBRATION_DIR, StepTimeModel
from bench.sim.metrics import summarize
from bench.sim.simulator import ClusterSimulator, default_step_time
from bench.traces import Trace, TraceRequest
from cluster.config import ClusterConfig, SimulatorConfig
from cluster.profiles import load_profile

COMMITTED = CALIBRATION_DIR / engine_table_name("cpu-tiny")


def _table() -> dict[str, Any]:
    return {
        "decode_ms": {"batch": [1, 4, 16], "context": [32, 1024, 8064], "ms": [[5, 6, 9], [6, 8, 14], [9, 12, 30]]},
        "prefill_ms": {
            "chunk": [32, 512, 2048],
            "context": [0, 2048],
            "ms": [[8, 12], [60, 80], [300, 380]],
        },
        "architecture": load_profile("cpu-tiny").model.architecture.model_dump(mode="json"),
    }


def test_cells_come_back_and_mixed_steps_add_their_work() -> None:
    t = EngineStepTable(_table())
    assert t.step_ms([], 4, 4 * 1024) == pytest.approx(8.0)
    assert t.step_ms([(512, 2048)], 0, 0) == pytest.approx(80.0)
    # The fixed part of a step (the smallest decode cell) is paid once.
    assert t.fixed_ms == 5.0
    assert t.step_ms([(512, 0)], 4, 4 * 1024) == pytest.approx(8.0 + 60.0 - 5.0)
    assert t.step_ms([(512, 0), (32, 0)], 0, 0) == pytest.approx(60.0 + 8.0 - 5.0)
    assert t.step_ms([], 0, 0) == 0.0


def test_time_never_falls_when_work_grows() -> None:
    data = _table()
    data["decode_ms"]["ms"][1][1] = 4.0  # a noisy cell below its neighbours
    t = EngineStepTable(data)
    for b, c in itertools.product([1, 2, 4, 8, 16], [32, 100, 1024, 4000, 8064]):
        assert t.step_ms([], b + 1, (b + 1) * c) >= t.step_ms([], b, b * c)
        assert t.step_ms([], b, b * (c + 50)) >= t.step_ms([], b, b * c)
    for p, c in itertools.product([16, 32, 200, 512, 2048], [0, 100, 2048, 6000]):
        assert t.step_ms([(p + 1, c)], 0, 0) >= t.step_ms([(p, c)], 0, 0)
        assert t.step_ms([(p, c + 32)], 0, 0) >= t.step_ms([(p, c)], 0, 0)


def test_a_table_of_another_architecture_is_refused(tmp_path: Path) -> None:
    data = _table()
    data["architecture"] = dict(data["architecture"], hidden_size=512)
    (tmp_path / engine_table_name("cpu-tiny")).write_text(json.dumps(data))
    cfg = load_profile("cpu-tiny")
    assert engine_step_table_for(cfg, cfg.pools[0], calibration_dir=tmp_path) is None
    data["architecture"]["hidden_size"] = 384
    (tmp_path / engine_table_name("cpu-tiny")).write_text(json.dumps(data))
    assert engine_step_table_for(cfg, cfg.pools[0], calibration_dir=tmp_path) is not None


def test_the_committed_cpu_tiny_table_is_what_the_simulator_uses() -> None:
    assert COMMITTED.exists()
    cfg = load_profile("cpu-tiny")
    for pool in cfg.pools:
        st = default_step_time(cfg, pool)
        assert isinstance(st, EngineStepTable)
        assert "measured whole engine steps" in st.describe()
        assert st.step_ms([(256, 0)], 0, 0) > 0
        assert st.step_ms([], 8, 8 * 512) > 0
    # GPU profiles keep the layer model.
    gpu = load_profile("h100x8-bf16")
    assert isinstance(default_step_time(gpu, gpu.pools[0]), StepTimeModel)


def _lone(prompt: int, output: int, first_id: int, t: float = 0.0, block: int = 32) -> TraceRequest:
    n = math.ceil(prompt / block)
    return TraceRequest(f"r{first_id}", t, prompt, output, tuple(range(first_id, first_id + n)))


def test_cpu_backend_schedules_synchronously() -> None:
    cfg = load_profile("cpu-tiny")
    trace = Trace("t", 32, [_lone(256, 8, 1)])
    sim = ClusterSimulator(cfg, trace, policy="round-robin", replicas={"standard": 1})
    assert sim.async_scheduling is False
    gpu = load_profile("h100x8-bf16")
    assert ClusterSimulator(gpu, Trace("t", 512, []), policy="round-robin", replicas={"standard": 1}).async_scheduling


def _constant_terms() -> ClusterConfig:
    """cpu-tiny with the serving-path terms as plain constants (no measured spreads)."""
    cfg = load_profile("cpu-tiny")
    cfg.simulator = SimulatorConfig()
    return cfg


def test_request_overhead_shifts_ttft_and_e2e_but_not_tpot() -> None:
    cfg = _constant_terms()
    reqs = [_lone(256, 8, 1), _lone(96, 12, 100, t=0.01), _lone(300, 6, 200, t=0.5)]
    trace = Trace("t", 32, reqs)
    kw: dict[str, Any] = {"policy": "round-robin", "replicas": {"standard": 2}}
    bare = summarize(ClusterSimulator(cfg, trace, **kw).run(check=True))
    cfg.simulator.request_overhead_ms = 40.0
    with_path = summarize(ClusterSimulator(cfg, trace, **kw).run(check=True))
    assert with_path["ttft_p50_s"] == pytest.approx(bare["ttft_p50_s"] + 0.040)
    assert with_path["e2e_p50_s"] == pytest.approx(bare["e2e_p50_s"] + 0.040)
    assert with_path["tpot_p50_ms"] == pytest.approx(bare["tpot_p50_ms"])
    assert with_path["tpot_p90_ms"] == pytest.approx(bare["tpot_p90_ms"])


def test_stream_lead_shortens_tpot_and_e2e_but_not_ttft() -> None:
    cfg = _constant_terms()
    reqs = [_lone(256, 11, 1), _lone(96, 6, 100, t=0.5), _lone(64, 1, 200, t=1.0)]
    trace = Trace("t", 32, reqs)
    kw: dict[str, Any] = {"policy": "round-robin", "replicas": {"standard": 1}}
    bare = ClusterSimulator(cfg, trace, **kw).run(check=True)
    cfg.simulator.stream_lead_ms = 20.0
    led = ClusterSimulator(cfg, trace, **kw).run(check=True)
    assert led.first_token == bare.first_token
    assert led.finish[0] == pytest.approx(bare.finish[0] - 0.020)
    assert led.finish[1] == pytest.approx(max(bare.first_token[1], bare.finish[1] - 0.020))
    assert led.finish[2] == bare.finish[2] == bare.first_token[2]  # one token: nothing after the first
    # Client TPOT of the 11-token reply: the engine's less 20 ms over its 10 later tokens.
    tpot = lambda r: (r.finish[0] - r.first_token[0]) / 10  # noqa: E731
    assert tpot(led) == pytest.approx(tpot(bare) - 0.002)


def test_step_scale_stretches_every_step_and_only_cpu_tables_have_it() -> None:
    cfg = _constant_terms()
    base = default_step_time(cfg, cfg.pools[0])
    cfg.simulator.engine_step_scale = 1.5
    scaled = default_step_time(cfg, cfg.pools[0])
    assert isinstance(scaled, EngineStepTable)
    for chunks, dec, kv in (([(256, 0)], 0, 0), ([], 4, 4 * 300), ([(64, 128)], 2, 600)):
        assert scaled.step_ms(chunks, dec, kv) == pytest.approx(1.5 * base.step_ms(chunks, dec, kv))
    assert "x 1.5" in scaled.describe()
    gpu = load_profile("h100x8-bf16")
    before = default_step_time(gpu, gpu.pools[0]).step_ms([], 8, 8 * 2048)
    gpu.simulator.engine_step_scale = 3.0
    assert default_step_time(gpu, gpu.pools[0]).step_ms([], 8, 8 * 2048) == pytest.approx(before)


def test_prefill_scale_stretches_only_the_prefill_part_of_a_step() -> None:
    t = EngineStepTable(_table(), scale=2.0, prefill_scale=3.0)
    assert t.step_ms([], 4, 4 * 1024) == pytest.approx(2.0 * 8.0)  # decode alone: the step scale
    # The prefill chunk's part above the fixed costs, 3x; the fixed part once, as before.
    assert t.step_ms([(512, 0)], 4, 4 * 1024) == pytest.approx(2.0 * (8.0 + 3.0 * (60.0 - 5.0)))
    assert t.step_ms([(512, 0)], 0, 0) == pytest.approx(2.0 * (5.0 + 3.0 * 55.0))
    cfg = _constant_terms()
    cfg.simulator.engine_prefill_scale = 2.5
    table = default_step_time(cfg, cfg.pools[0])
    assert isinstance(table, EngineStepTable) and table.prefill_scale == 2.5
    assert "prefill parts x 2.5" in table.describe()
    with pytest.raises(ValueError, match="positive"):
        EngineStepTable(_table(), prefill_scale=0.0)


def test_measured_spreads_are_drawn_per_request_and_replay_identically() -> None:
    cfg = _constant_terms()
    cfg.simulator.request_overhead_spread_ms = [30, 35, 40, 45, 50, 55, 60, 70, 80, 120]
    cfg.simulator.engine_step_scale_spread = [0.8, 0.9, 1.0, 1.0, 1.1, 1.2, 1.3, 1.5, 2.0, 3.0]
    reqs = [_lone(96, 4, 100 * k, t=0.5 * k) for k in range(1, 41)]
    trace = Trace("t", 32, reqs)
    kw: dict[str, Any] = {"policy": "round-robin", "replicas": {"standard": 1}}
    one = ClusterSimulator(cfg, trace, **kw).run(check=True)
    two = ClusterSimulator(cfg, trace, **kw).run(check=True)
    assert one.first_token == two.first_token and one.finish == two.finish
    sim = ClusterSimulator(cfg, trace, **kw)
    overheads = sim.request_overhead_s
    assert min(overheads) >= 0.030 - 1e-9 and max(overheads) <= 0.120 + 1e-9
    assert len(set(overheads)) > 20  # drawn, not one constant
    # Requests reach the engine in the order of their own paths' ends.
    ends = [sim.engine_arrival_s[k] for k in sim.arrival_order]
    assert all(a <= b for a, b in itertools.pairwise(ends))
    assert ends == sorted(r.arrival_s + o for r, o in zip(reqs, overheads, strict=True))
    ttft = sorted(f - a for f, a in zip(one.first_token, one.arrival, strict=True))
    assert ttft[-1] - ttft[0] > 0.05  # the spread reaches the percentiles


def test_each_replica_draws_its_own_chain_of_step_scales() -> None:
    """The measured lag-1 correlation is of one replica's consecutive steps: a replica's
    draws are its own chain, the same whatever the other replicas of its pool do (one
    chain shared by a pool would interleave them and dilute the correlation)."""
    cfg = _constant_terms()
    cfg.simulator.engine_step_scale_spread = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.4, 1.8, 2.5]
    cfg.simulator.engine_step_scale_autocorr = 0.6
    table = default_step_time(cfg, cfg.pools[0])
    assert isinstance(table, EngineStepTable)
    table.reseed("7-standard")
    step = ([], 4, 4 * 300)
    alone = table.for_replica("standard-0")
    own = [alone.step_ms(*step) for _ in range(50)]
    a, b = table.for_replica("standard-0"), table.for_replica("standard-1")
    interleaved = []
    for _ in range(50):
        interleaved.append(a.step_ms(*step))
        b.step_ms(*step)
    assert interleaved == own
    assert [table.for_replica("standard-1").step_ms(*step) for _ in range(50)] != own
    table.reseed("8-standard")  # another simulation seed: other draws
    assert [table.for_replica("standard-0").step_ms(*step) for _ in range(50)] != own


def test_a_spread_needs_ten_quantiles() -> None:
    with pytest.raises(ValueError, match="10 quantiles"):
        SimulatorConfig(request_overhead_spread_ms=[1.0, 2.0])
    with pytest.raises(ValueError, match="> 0"):
        SimulatorConfig(engine_step_scale_spread=[0.0] * 10)


def test_engines_sharing_the_cores_stretch_each_others_steps() -> None:
    """With `engine_contention_scale`, a CPU replica's steps taken while another replica
    steps are that much longer; a replica alone keeps the table's time, and GPU profiles
    (own devices per replica) never share."""
    cfg = _constant_terms()
    # Two requests at once on two replicas: every step has the other engine beside it.
    pair = Trace("t", 32, [_lone(256, 24, 1), _lone(256, 24, 100)])
    kw: dict[str, Any] = {"policy": "round-robin", "replicas": {"standard": 2}}
    apart = ClusterSimulator(cfg, pair, **kw).run(check=True)
    cfg.simulator.engine_contention_scale = 1.5
    shared = ClusterSimulator(cfg, pair, **kw).run(check=True)
    assert sorted(set(shared.replica)) == sorted(set(apart.replica)) and len(set(shared.replica)) == 2
    # The first replica's prefill ran before the second had work; everything after it
    # ran beside the other engine's steps.
    assert shared.first_token[0] == pytest.approx(apart.first_token[0])
    assert shared.first_token[1] - shared.arrival[1] == pytest.approx(1.5 * (apart.first_token[1] - apart.arrival[1]))
    for k in range(2):
        assert shared.finish[k] - shared.first_token[k] == pytest.approx(1.5 * (apart.finish[k] - apart.first_token[k]))
    assert any("share the machine's cores" in n for n in shared.step_time_notes)
    # One request alone is not stretched.
    lone = Trace("t", 32, [_lone(256, 24, 1)])
    one: dict[str, Any] = {"policy": "round-robin", "replicas": {"standard": 2}}
    alone = ClusterSimulator(_constant_terms(), lone, **one).run().finish
    assert ClusterSimulator(cfg, lone, **one).run().finish == alone
    gpu = load_profile("h100x8-bf16")
    gpu.simulator.engine_contention_scale = 1.5
    base = load_profile("h100x8-bf16")
    gpair = Trace("t", 16, [_lone(256, 24, 1, block=16), _lone(256, 24, 100, block=16)])
    g: dict[str, Any] = {"policy": "round-robin", "replicas": {"standard": 2}}
    assert ClusterSimulator(gpu, gpair, **g).run().finish == ClusterSimulator(base, gpair, **g).run().finish


def test_the_serving_path_slows_with_the_requests_in_flight() -> None:
    """`request_overhead_per_in_flight_ms`: each request reaches its engine that much later
    per other request the client has in flight when it is sent; one sent alone does not."""
    cfg = _constant_terms()
    cfg.simulator.request_overhead_ms = 50.0
    # Three requests at once, a fourth after the others have finished.
    reqs = [_lone(256, 8, 1), _lone(96, 12, 100), _lone(300, 6, 200), _lone(256, 8, 300, t=5.0)]
    kw: dict[str, Any] = {"policy": "round-robin", "replicas": {"standard": 4}}
    flat = ClusterSimulator(cfg, Trace("t", 32, reqs), **kw).run(check=True)
    cfg.simulator.request_overhead_per_in_flight_ms = 20.0
    loaded = ClusterSimulator(cfg, Trace("t", 32, reqs), **kw).run(check=True)
    late = [lf - ff for lf, ff in zip(loaded.first_token, flat.first_token, strict=True)]
    assert late == pytest.approx([0.0, 0.020, 0.040, 0.0])  # sent 1st, 2nd, 3rd of a burst; alone


def test_each_sequence_beyond_the_first_stretches_a_cpu_step() -> None:
    """`engine_batch_stretch`: a step of n sequences takes 1 + stretch x (n - 1) times the
    table's; a lone request keeps the table's time."""
    cfg = _constant_terms()
    pair = Trace("t", 32, [_lone(256, 24, 1), _lone(256, 24, 100)])
    kw: dict[str, Any] = {"policy": "round-robin", "replicas": {"standard": 1}}
    table = default_step_time(cfg, cfg.pools[0])
    plain = ClusterSimulator(cfg, pair, **kw).run(check=True)
    cfg.simulator.engine_batch_stretch = 0.5
    batched = ClusterSimulator(cfg, pair, **kw).run(check=True)
    # Both decode together in every step after their prefills: 1.5x the table's step.
    step = table.step_ms((), 2, 2 * 270) / 1e3
    decode = [f - t for f, t in zip(batched.finish, batched.first_token, strict=True)]
    assert max(decode) > 23 * 1.5 * step * 0.95
    assert max(decode) > 1.4 * max(f - t for f, t in zip(plain.finish, plain.first_token, strict=True))
    lone = Trace("t", 32, [_lone(256, 24, 1)])
    alone = ClusterSimulator(_constant_terms(), lone, **kw).run().finish
    assert ClusterSimulator(cfg, lone, **kw).run().finish == alone
