"""Step-time model of the simulator (bench/calibration/step_time.py) and the all-reduce fit
(bench/calibration/profile_allreduce.py): table points come back exactly, time never falls when work
grows, a missing table is flagged as analytic, and the all-reduce fit reproduces the
measured points within its recorded error. Tables are built here or read from the
committed bench/calibration/; nothing here touches a GPU."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from bench.calibration import profile_allreduce, profile_layers
from bench.calibration.profile_allreduce import HIDDEN, build_table, fit_alpha_beta, ring_us
from bench.calibration.step_time import (
    CALIBRATION_DIR,
    GPU_SPECS,
    AllReduceModel,
    Grid2D,
    StepTimeModel,
    layer_table_name,
)
from bench.calibration.vllm_allreduce import NcclCurve, VllmAllReduce, algorithm, fuses_rmsnorm
from cluster.config import ClusterConfig
from cluster.profiles import load_profile

GPU_PROFILES = ["h100x8-bf16", "h100x4-fp8", "h200x4-fp8"]
COMMITTED_LAYER_TABLES = sorted(CALIBRATION_DIR.glob("layers_*.json"))
# NCCL profiles (profile_allreduce.py); allreduce_local_*.json hold the one-GPU parts.
COMMITTED_ALLREDUCE_TABLES = sorted(p for p in CALIBRATION_DIR.glob("allreduce_*.json") if "_local_" not in p.name)
COMMITTED_LOCAL_PARTS = sorted(CALIBRATION_DIR.glob("allreduce_local_*.json"))


def _increasing(rng: random.Random, n: int, start: float, step: float) -> list[float]:
    out, v = [], start
    for _ in range(n):
        v += step * rng.uniform(0.2, 1.0)
        out.append(round(v, 6))
    return out


def synthetic_layer_table(rng: random.Random) -> dict[str, Any]:
    """A table in profile_layers' schema, monotone by construction, random values."""
    tokens = [1, 8, 64, 512, 4096, 8192]
    batch, dctx = [1, 8, 64, 256], [512, 4096, 32768]
    chunk, pctx = [16, 256, 2048, 8192], [0, 8192, 65536]
    fixed = rng.uniform(0.005, 0.02)
    decode = [[round(fixed + 1e-6 * b * c * rng.uniform(0.9, 1.1) + 1e-5 * b, 6) for c in dctx] for b in batch]
    prefill = [[round(fixed + 1e-8 * k * (c + k) * rng.uniform(0.9, 1.1), 6) for c in pctx] for k in chunk]
    # Force monotonicity of the random cells so every point is a true table point.
    for grid in (decode, prefill):
        for i in range(len(grid)):
            for j in range(len(grid[0])):
                grid[i][j] = max(grid[i][j], grid[i - 1][j] if i else 0.0, grid[i][j - 1] if j else 0.0)
    return {
        "gpu_name": "synthetic",
        "date": "test",
        "settings": {"kv_dtype": "bfloat16"},
        "dense_ms": {"tokens": tokens, "ms": _increasing(rng, len(tokens), 0.15, 0.5)},
        "lm_head_ms": {"tokens": [1, 64, 512], "ms": _increasing(rng, 3, 0.05, 0.05)},
        "decode_attn_ms": {"batch": batch, "context": dctx, "ms": decode},
        "prefill_attn_ms": {"chunk": chunk, "context": pctx, "ms": prefill},
        "attn_fixed_ms": fixed,
    }


def synthetic_allreduce_table(rng: random.Random, alpha: float, beta: float) -> dict[str, Any]:
    sizes = [t * HIDDEN * 2 for t in profile_allreduce.DECODE_TOKENS + profile_allreduce.PREFILL_TOKENS]
    us = [round(ring_us(2, b, alpha, beta) * rng.uniform(0.95, 1.05), 3) for b in sizes]
    table: dict[str, Any] = {"measured": {"2": {"bytes": sizes, "us": us}}}
    table.update(build_table(table["measured"]))
    return table


@pytest.fixture
def synthetic_dir(tmp_path: Path) -> Path:
    rng = random.Random(7)
    (tmp_path / layer_table_name("h100", 8, "bfloat16")).write_text(json.dumps(synthetic_layer_table(rng)))
    (tmp_path / "allreduce_h200.json").write_text(json.dumps(synthetic_allreduce_table(rng, 4.0, 300.0)))
    return tmp_path


def _model(
    profile: str, calibration_dir: Path | None = None, scaling: str = "vllm"
) -> tuple[ClusterConfig, StepTimeModel]:
    cfg = load_profile(profile)
    return cfg, StepTimeModel.for_pool(cfg, cfg.pools[0], calibration_dir=calibration_dir, allreduce_scaling=scaling)


# -- flags ------------------------------------------------------------------------------


def test_missing_tables_fall_back_to_analytic_and_say_so(tmp_path: Path) -> None:
    _, model = _model("h100x8-bf16", calibration_dir=tmp_path)
    assert model.is_analytic
    assert model.allreduce.source == "analytic"
    assert "ANALYTIC" in model.describe()
    assert model.step_ms([], 1, 1000) > 0


def test_cpu_profile_is_analytic_without_allreduce() -> None:
    _, model = _model("cpu-tiny")
    assert model.is_analytic
    assert model.allreduce.source == "none"
    assert model.breakdown_ms([], 4, 400)["allreduce"] == 0.0


def test_synthetic_tables_are_used_and_the_allreduce_is_extrapolated_to_tp8(synthetic_dir: Path) -> None:
    _, model = _model("h100x8-bf16", calibration_dir=synthetic_dir, scaling="ring")
    assert model.source == "measured"
    # Measured at TP=2 only (on an H200: same NVLink generation as the H100): TP=8 is extrapolated.
    assert model.allreduce.source == "extrapolated"
    assert "extrapolated" in model.describe()


def test_default_allreduce_is_vllms_paths_and_says_modelled(synthetic_dir: Path) -> None:
    _, model = _model("h100x8-bf16", calibration_dir=synthetic_dir)
    assert model.allreduce.source == "modelled" and model.allreduce.vllm is not None
    assert "NVLink kernels modelled" in model.describe()
    # No local-parts file in this directory: no fused-RMSNorm credit, and it says so.
    assert "no local parts" in model.describe()
    assert model.allreduce.algorithm(HIDDEN * 2) == "custom-1shot"


def test_unusable_table_is_flagged(tmp_path: Path) -> None:
    (tmp_path / layer_table_name("h100", 8, "bfloat16")).write_text(json.dumps({"dense_ms": {}}))
    _, model = _model("h100x8-bf16", calibration_dir=tmp_path)
    assert model.is_analytic
    assert "unusable" in model.describe()


# -- table points -----------------------------------------------------------------------


def test_synthetic_table_points_come_back_exactly(synthetic_dir: Path) -> None:
    table = json.loads((synthetic_dir / layer_table_name("h100", 8, "bfloat16")).read_text())
    _, model = _model("h100x8-bf16", calibration_dir=synthetic_dir)
    layers = model.arch.num_layers
    for t, ms in zip(table["dense_ms"]["tokens"], table["dense_ms"]["ms"], strict=True):
        assert model.breakdown_ms([(t, 0)], 0, 0)["dense"] == pytest.approx(layers * ms, rel=1e-12)
    for s, ms in zip(table["lm_head_ms"]["tokens"], table["lm_head_ms"]["ms"], strict=True):
        assert model.breakdown_ms([], s, s * 512)["lm_head"] == pytest.approx(ms, rel=1e-12)
    dec = table["decode_attn_ms"]
    for i, b in enumerate(dec["batch"]):
        for j, c in enumerate(dec["context"]):
            got = model.breakdown_ms([], b, b * c)["attention"]
            assert got == pytest.approx(layers * dec["ms"][i][j], rel=1e-9)
    pre = table["prefill_attn_ms"]
    for i, k in enumerate(pre["chunk"]):
        for j, c in enumerate(pre["context"]):
            got = model.breakdown_ms([(k, c)], 0, 0)["attention"]
            assert got == pytest.approx(layers * pre["ms"][i][j], rel=1e-9)


@pytest.mark.parametrize("path", COMMITTED_LAYER_TABLES, ids=lambda p: p.name)
def test_committed_layer_table_points_come_back_exactly(path: Path) -> None:
    table = json.loads(path.read_text())
    dec = table["decode_attn_ms"]
    grid = Grid2D.from_json(dec, "batch")
    # The cells monotonization left alone are true table points; nearly all should be.
    kept = [
        (b, c, dec["ms"][i][j])
        for i, b in enumerate(dec["batch"])
        for j, c in enumerate(dec["context"])
        if dec["ms"][i][j] is not None and grid.at(b, c) == dec["ms"][i][j]
    ]
    measured = sum(v is not None for row in dec["ms"] for v in row)
    assert len(kept) >= 0.8 * measured
    key, tp, wdtype = table["gpu_key"], table["settings"]["tp"], table["settings"]["weight_dtype"]
    arch = load_profile("h100x8-bf16").model.architecture
    model = StepTimeModel(
        arch=arch,
        tp=tp,
        weight_dtype=wdtype,
        kv_dtype="bfloat16",
        gpu=GPU_SPECS[key],
        max_tokens=8192,
        layer_table=table,
    )
    for b, c, ms in kept:
        assert model.breakdown_ms([], b, b * c)["attention"] == pytest.approx(arch.num_layers * ms, rel=1e-9)


def test_step_is_the_sum_of_its_breakdown(synthetic_dir: Path) -> None:
    _, model = _model("h100x8-bf16", calibration_dir=synthetic_dir)
    rng = random.Random(3)
    for _ in range(200):
        chunks = [(rng.randint(1, 3000), rng.randint(0, 100_000)) for _ in range(rng.randint(0, 3))]
        n = rng.randint(0, 200)
        kv = n * rng.randint(1, 20_000)
        assert model.step_ms(chunks, n, kv) == pytest.approx(sum(model.breakdown_ms(chunks, n, kv).values()))


def test_fp8_kv_decode_reads_the_bf16_table_at_half_the_context(synthetic_dir: Path) -> None:
    table = json.loads((synthetic_dir / layer_table_name("h100", 8, "bfloat16")).read_text())
    cfg = load_profile("h100x8-bf16")
    kwargs: dict[str, Any] = {
        "arch": cfg.model.architecture,
        "tp": 8,
        "weight_dtype": "bfloat16",
        "gpu": GPU_SPECS["h100"],
        "max_tokens": 8192,
        "layer_table": table,
    }
    bf16 = StepTimeModel(kv_dtype="bfloat16", **kwargs)
    fp8 = StepTimeModel(kv_dtype="fp8", **kwargs)
    for b, ctx in [(1, 4096), (8, 30000), (64, 8000)]:
        assert fp8.breakdown_ms([], b, b * ctx)["attention"] == pytest.approx(
            bf16.breakdown_ms([], b, b * ctx // 2)["attention"]
        )


# -- monotonicity -----------------------------------------------------------------------


def _monotone_models(synthetic_dir: Path) -> list[StepTimeModel]:
    models = [_model(p)[1] for p in GPU_PROFILES]  # committed tables where present, else analytic
    models.append(_model("h100x8-bf16", calibration_dir=synthetic_dir)[1])
    models.append(_model("h100x8-bf16", calibration_dir=synthetic_dir.parent / "empty")[1])
    return models


def _non_decreasing(values: list[float]) -> bool:
    return all(b >= a - 1e-12 for a, b in zip(values, values[1:], strict=False))


def test_step_time_never_falls_when_work_grows(synthetic_dir: Path) -> None:
    for model in _monotone_models(synthetic_dir):
        tokens = [1, 3, 16, 100, 500, 1000, 2049, 5000, 8192, 9000]
        assert _non_decreasing([model.step_ms([(t, 0)], 0, 0) for t in tokens]), model.describe()
        contexts = [0, 100, 2000, 9000, 40000, 130000]
        assert _non_decreasing([model.step_ms([(512, c)], 0, 0) for c in contexts]), model.describe()
        batches = [1, 2, 3, 7, 16, 50, 64, 100, 128, 200, 256, 300]
        assert _non_decreasing([model.step_ms([], b, b * 3000) for b in batches]), model.describe()
        kv = [1, 1000, 10_000, 100_000, 1_000_000, 3_000_000]
        assert _non_decreasing([model.step_ms([], 32, k) for k in kv]), model.describe()
        # Adding decode sequences to a prefill step costs time too.
        assert _non_decreasing([model.step_ms([(1024, 0)], b, b * 2000) for b in batches]), model.describe()


# -- all-reduce -------------------------------------------------------------------------


def test_fit_recovers_the_parameters_of_exact_ring_data() -> None:
    alpha, beta = 3.5, 320.0
    points = [(n, float(b), ring_us(n, b, alpha, beta)) for n in (2, 4, 8) for b in (24576, 1.5e6, 2e8)]
    a, bt, err = fit_alpha_beta(points)
    assert a == pytest.approx(alpha, rel=1e-9)
    assert bt == pytest.approx(beta, rel=1e-9)
    assert err < 1e-9


@pytest.mark.parametrize("path", COMMITTED_ALLREDUCE_TABLES, ids=lambda p: p.name)
def test_committed_allreduce_fit_reproduces_measured_points_within_fit_error(path: Path) -> None:
    table = json.loads(path.read_text())
    fit = table["fit"]
    points = [(int(n), b, us) for n, c in table["measured"].items() for b, us in zip(c["bytes"], c["us"], strict=True)]
    alpha, beta, err = fit_alpha_beta(points)
    assert alpha == pytest.approx(fit["alpha_us"], abs=1e-3)
    assert beta == pytest.approx(fit["beta_gbps"], rel=1e-3)
    for n, b, us in points:
        assert abs(ring_us(n, b, alpha, beta) - us) / us <= fit["max_rel_error"] + 1e-3
    # Measured and extrapolated rows stay apart: every measured group size is labelled so.
    measured_tp = {int(n) for n in table["measured"]}
    for row in table["table"]:
        assert row["source"] == ("measured" if row["tp"] in measured_tp else "extrapolated")


def test_committed_tables_exist() -> None:
    # The simulator's headline numbers rely on them (see bench/calibration/README.md).
    assert COMMITTED_LAYER_TABLES and COMMITTED_ALLREDUCE_TABLES


def test_allreduce_model_interpolates_measured_and_extrapolates_other_sizes(tmp_path: Path) -> None:
    rng = random.Random(5)
    table = synthetic_allreduce_table(rng, 5.0, 250.0)
    path = tmp_path / "allreduce_h200.json"
    path.write_text(json.dumps(table))
    at2 = AllReduceModel.load(path, 2, "ring")
    assert at2.source == "measured"
    for b, us in zip(at2.measured_bytes, at2.measured_us, strict=True):
        assert at2.time_us(b) == pytest.approx(us, rel=1e-9)
    at8 = AllReduceModel.load(path, 8, "ring")
    assert at8.source == "extrapolated" and at8.measured_tp == 2
    fit = table["fit"]
    assert at8.time_us(1e6) == pytest.approx(ring_us(8, 1e6, fit["alpha_us"], fit["beta_gbps"]))
    # The optimistic alternative keeps the measured TP=2 latency and adds only the ring's
    # extra bandwidth term: it lies between the TP=2 measurement and the ring formula.
    flat = AllReduceModel.load(path, 8, "flat-latency")
    for tokens in (1, 64, 512, 8192):
        nbytes = tokens * HIDDEN * 2
        assert at2.time_us(nbytes) <= flat.time_us(nbytes) <= at8.time_us(nbytes) * (1 + 1e-9)
    with pytest.raises(ValueError, match="scaling"):
        AllReduceModel.load(path, 8, "tree")


def test_refit_rewrites_fit_and_table(tmp_path: Path) -> None:
    table = synthetic_allreduce_table(random.Random(9), 6.0, 200.0)
    table["fit"] = {"alpha_us": 0.0}
    path = tmp_path / "allreduce_h200.json"
    path.write_text(json.dumps(table))
    assert profile_allreduce.main(["--refit", str(path)]) == 0
    refit = json.loads(path.read_text())
    assert refit["fit"]["alpha_us"] > 0
    assert {r["tp"] for r in refit["table"]} == {2, 4, 8}


# -- the profiler's own output ----------------------------------------------------------


def test_profiler_smoke_output_is_a_table_the_model_loads(tmp_path: Path) -> None:
    """profile_layers --smoke (tiny shapes, CPU) writes the schema step_time reads."""
    assert profile_layers.main(["--smoke", "--out", str(tmp_path)]) == 0
    written = tmp_path / "layers_cpu_tp1_bf16.json"
    table = json.loads(written.read_text())
    assert table["smoke"] is True and table["settings"]["cuda_graphs"] is False
    # Load it as if it were an H100 table to exercise the reader on the real schema.
    written.rename(tmp_path / layer_table_name("h100", 8, "bfloat16"))
    _, model = _model("h100x8-bf16", calibration_dir=tmp_path)
    assert model.source == "measured"
    assert model.step_ms([(16, 0)], 4, 4 * 64) > 0


# -- vLLM's all-reduce paths ------------------------------------------------------------


def test_vllm_algorithm_follows_its_sm90_thresholds() -> None:
    """The path per message and TP, as all_reduce_utils.py / custom_all_reduce.cuh /
    symm_mem.py choose it on an NVSwitch sm90 node (bytes = tokens x 12288 x 2)."""
    tok = HIDDEN * 2
    kib, mib = 1024, 1024 * 1024
    # TP=8: one-shot below 256 KB (10 tokens), then symmetric-memory multimem up to
    # 64 MB (2,730 tokens), NCCL beyond.
    assert algorithm(8, 10 * tok) == "custom-1shot"
    assert algorithm(8, 256 * kib) == "symm-mem-multimem"
    assert algorithm(8, 2730 * tok) == "symm-mem-multimem"
    assert algorithm(8, 64 * mib) == "nccl"
    # TP=4: one-shot below 512 KB, two-shot to 32 MB; symm-mem's limit is the same, so NCCL next.
    assert algorithm(4, 512 * kib - 16) == "custom-1shot"
    assert algorithm(4, 512 * kib) == "custom-2shot"
    assert algorithm(4, 32 * mib) == "nccl"
    # TP=2: one-shot all the way to 64 MB.
    assert algorithm(2, 60 * mib) == "custom-1shot"
    # FlashInfer's all-reduce + RMSNorm fusion: up to 1 MB at TP=8, 2 MB at TP=4.
    assert fuses_rmsnorm(8, mib) and not fuses_rmsnorm(8, mib + 1)
    assert fuses_rmsnorm(4, 2 * mib) and not fuses_rmsnorm(4, 2 * mib + 1)


def test_vllm_allreduce_uses_the_nccl_curve_only_beyond_its_own_kernels() -> None:
    nccl = NcclCurve(latency_us=12.0, bus_gbps=300.0)
    ar = VllmAllReduce(8, nccl)
    big = 8192 * HIDDEN * 2
    assert ar.time_us(big) == pytest.approx(nccl.time_us(8, big))
    small = HIDDEN * 2
    assert ar.time_us(small) < nccl.time_us(8, small)
    assert VllmAllReduce(1, nccl).time_us(small) == 0.0


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_committed_vllm_allreduce_never_falls_with_message_size(tp: int) -> None:
    """With the committed NCCL profile and local parts: more bytes never cost less, and
    the fused calls are cheaper than the same all-reduce without the fusion."""
    assert COMMITTED_LOCAL_PARTS
    key = COMMITTED_LOCAL_PARTS[0].name.removeprefix("allreduce_local_").removesuffix(".json")
    model = AllReduceModel.load(CALIBRATION_DIR / f"allreduce_{key}.json", tp, "vllm", COMMITTED_LOCAL_PARTS[0])
    assert model.vllm is not None and model.vllm.local is not None
    sizes = [t * HIDDEN * 2 for t in range(1, 9000, 7)]
    times = [model.time_us(b) for b in sizes]
    assert all(b >= a - 1e-9 for a, b in zip(times, times[1:], strict=False))
    assert all(t > 0 for t in times)
    unfused = VllmAllReduce(tp, model.vllm.nccl, model.vllm.local, fuse_rmsnorm=False)
    assert model.time_us(HIDDEN * 2) < unfused.time_us(HIDDEN * 2)


def test_vllm_allreduce_is_faster_than_the_ring_bound_for_decode() -> None:
    cfg, vllm_model = _model("h100x8-bf16")
    _, ring_model = _model("h100x8-bf16", scaling="ring")
    for b in (1, 16, 64):
        assert vllm_model.step_ms([], b, b * 2048) < ring_model.step_ms([], b, b * 2048)
