"""Runs of one (policy, rate scale) over several seeds fold into one row of means."""

from __future__ import annotations

import math

import pytest

from bench.sim.seeds import fold, mean_over_seeds


def _run(policy: str, scale: float, seed: int, p50: float, slo: float) -> dict[str, object]:
    return {
        "policy": policy,
        "rate_scale": scale,
        "seed": seed,
        "ttft_p50_s": p50,
        "slo_attainment": slo,
        "preemptions": seed,  # an int is averaged too
        "tpot_p50_ms": math.nan if seed == 0 else 20.0,  # a run without the figure
        "pools": {"standard": {"replicas": 4, "ttft_p50_s": p50}},
        "step_time_notes": [f"note {seed}"],
        "async_scheduling": True,
    }


def test_mean_over_seeds_averages_figures_and_keeps_the_per_seed_headline() -> None:
    row = mean_over_seeds([_run("char-tree", 6.0, s, p, a) for s, p, a in [(0, 26.0, 0.5), (1, 28.0, 0.3)]])
    assert row["policy"] == "char-tree" and row["rate_scale"] == 6.0
    assert row["ttft_p50_s"] == 27.0 and row["slo_attainment"] == pytest.approx(0.4)
    assert row["preemptions"] == 0.5
    assert row["tpot_p50_ms"] == 20.0  # NaN runs left out of the mean
    assert row["pools"] == {"standard": {"replicas": 4.0, "ttft_p50_s": 27.0}}
    assert row["step_time_notes"] == ["note 0"] and row["async_scheduling"] is True
    assert row["seeds"] == [0, 1]
    assert row["per_seed"] == {"ttft_p50_s": [26.0, 28.0], "slo_attainment": [0.5, 0.3]}


def test_one_seed_is_that_run() -> None:
    run = _run("cache-aware", 1.0, 0, 0.4, 0.99)
    row = mean_over_seeds([run])
    assert {k: row[k] for k in run if k != "tpot_p50_ms"} == {k: run[k] for k in run if k != "tpot_p50_ms"}
    assert math.isnan(row["tpot_p50_ms"])


def test_fold_groups_by_policy_and_scale_in_first_seen_order() -> None:
    runs = [_run(p, s, seed, 1.0 + seed, 0.9) for p in ("a", "b") for s in (1.0, 2.0) for seed in (0, 1, 2)]
    rows = fold(runs)
    assert [(r["policy"], r["rate_scale"]) for r in rows] == [("a", 1.0), ("a", 2.0), ("b", 1.0), ("b", 2.0)]
    assert all(r["ttft_p50_s"] == 2.0 and r["seeds"] == [0, 1, 2] for r in rows)


def test_runs_of_different_pairs_do_not_fold_into_one() -> None:
    with pytest.raises(ValueError, match="one policy and rate scale"):
        mean_over_seeds([_run("a", 1.0, 0, 1.0, 0.9), _run("a", 2.0, 1, 1.0, 0.9)])
    with pytest.raises(ValueError, match="at least one"):
        mean_over_seeds([])
