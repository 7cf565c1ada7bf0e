"""Runs of one (policy, rate scale) over several seeds, folded into one row.

A policy with random tie-breaks (SGLang's, the char tree's, pow2) gives a different run for
every seed, and past saturation a few different early choices move TTFT p50 by several
percent (Mooncake x6, char tree, seeds 0-3: p50 26.9-28.6 s). One seed is one draw of
that spread; comparing policies on it compares draws. `mean_over_seeds` averages every
figure of the runs (each run's percentile, then the mean) and keeps the per-seed values of
the headline figures, so a table can show the mean and results.json the spread.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

# Figures whose per-seed values are kept beside the mean.
PER_SEED = (
    "ttft_p50_s",
    "ttft_p90_s",
    "ttft_p99_s",
    "slo_attainment",
    "throughput_output_tok_s",
    "block_hit_rate",
)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _mean(values: Sequence[Any]) -> Any:
    """The mean of numbers (NaN where every run had none), dicts key by key, and the
    first value of anything else (names, notes, flags)."""
    first = values[0]
    if all(_is_number(v) for v in values):
        finite = [float(v) for v in values if not math.isnan(v)]
        return sum(finite) / len(finite) if finite else math.nan
    if all(isinstance(v, dict) for v in values):
        keys = [k for k in first if all(k in v for v in values)]
        return {k: _mean([v[k] for v in values]) for k in keys}
    return first


def mean_over_seeds(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One row from the runs of one (policy, rate scale) with different seeds."""
    if not rows:
        raise ValueError("mean_over_seeds needs at least one run")
    keys = {(r["policy"], r["rate_scale"]) for r in rows}
    if len(keys) != 1:
        raise ValueError(f"runs of one policy and rate scale expected, got {sorted(keys)}")
    out = {k: _mean([r[k] for r in rows]) for k in rows[0] if all(k in r for r in rows)}
    out["seeds"] = [r["seed"] for r in rows]
    out["per_seed"] = {k: [r[k] for r in rows] for k in PER_SEED if all(k in r for r in rows)}
    return out


def fold(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of many seeds -> one row per (policy, rate scale), in first-seen order."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["policy"], r["rate_scale"]), []).append(r)
    return [mean_over_seeds(g) for g in groups.values()]


__all__ = ["PER_SEED", "fold", "mean_over_seeds"]
