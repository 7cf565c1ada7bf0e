"""A measured spread as the simulator draws from it: the deciles' midpoints (quantiles at
0.05, 0.15, ..., 0.95) of a quantity observed per request or per step, sampled by
inverse transform with piecewise-linear interpolation (clamped beyond the outer ones).

Used for the cpu-tiny profile's serving-path terms (bench/live/engine_timeline.py
measures them during a replay): on a few shared cores the serving path's time per
request and the engine's steps vary by 2x and more from one to the next, and the
percentiles a replay reports (p90) come from that spread, not from its median."""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence

import numpy as np

PROBS: tuple[float, ...] = tuple((i + 0.5) / 10 for i in range(10))


def quantiles_of(values: Sequence[float], digits: int = 2) -> list[float]:
    """The spread of `values` (at PROBS), rounded; [] for no values."""
    if len(values) == 0:
        return []
    return [round(float(q), digits) for q in np.quantile(np.asarray(values, dtype=float), PROBS)]


_NORMAL = statistics.NormalDist()


def normal_scores(values: Sequence[float]) -> list[float]:
    """Each value's rank as a standard normal quantile; equal values share their mean rank
    (a run of equal ratios is no correlation)."""
    n = len(values)
    order = sorted(range(n), key=lambda i: values[i])
    z = [0.0] * n
    lo = 0
    while lo < n:
        hi = lo
        while hi + 1 < n and values[order[hi + 1]] == values[order[lo]]:
            hi += 1
        score = _NORMAL.inv_cdf(((lo + hi) / 2 + 0.5) / n)
        for k in range(lo, hi + 1):
            z[order[k]] = score
        lo = hi + 1
    return z


def _scores_by_series(series: Sequence[Sequence[float]]) -> list[list[float]]:
    """Each series' values as normal scores ranked over all of them pooled (one scale for
    every replica's steps), split back into the series."""
    scores = normal_scores([v for s in series for v in s])
    out = []
    start = 0
    for s in series:
        out.append(scores[start : start + len(s)])
        start += len(s)
    return out


def lag1_autocorr(series: Sequence[Sequence[float]]) -> float:
    """Lag-1 correlation of consecutive values' normal scores, pooled over several series
    (one per replica, in time order): how much one step's slowdown carries into the next,
    on the scale the draws use. 0 for fewer than 3 pairs or no variation; clamped to
    [0, 0.99]."""
    pairs: list[tuple[float, float]] = []
    for zs in _scores_by_series(series):
        pairs.extend(zip(zs, zs[1:], strict=False))
    if len(pairs) < 3:
        return 0.0
    try:
        r = statistics.correlation([a for a, _ in pairs], [b for _, b in pairs])
    except statistics.StatisticsError:  # a constant side: no correlation to speak of
        return 0.0
    return min(0.99, max(0.0, r))


def ar1_mean_variance(rho: float, horizon: int) -> float:
    """Variance of the mean of `horizon` consecutive draws of a unit-variance AR(1) with
    lag-1 correlation `rho`: (1 + 2 sum_k (1 - k/h) rho^k) / h."""
    h = max(1, horizon)
    return (1 + 2 * sum((1 - k / h) * rho**k for k in range(1, h))) / h


def horizon_autocorr(series: Sequence[Sequence[float]], horizon: int) -> float:
    """The lag-1 correlation of the AR(1) whose means over `horizon` consecutive steps
    vary as much as the measured ones (normal scores, non-overlapping windows of each
    series, pooled). A request's mean time per token is such a mean, so this is the
    correlation at the span that sets TPOT: on shared cores a slow spell lasts seconds,
    longer than one step's correlation (`lag1_autocorr`) carries under AR(1) decay, and
    matching lag 1 alone leaves a request's mean too steady. Clamped to [0, 0.99]; 0 for
    fewer than 3 windows or no variation."""
    h = max(2, horizon)
    by_series = _scores_by_series(series)
    means = [sum(zs[i : i + h]) / h for zs in by_series for i in range(0, len(zs) - h + 1, h)]
    scores = [z for zs in by_series for z in zs]
    unit = sum(z * z for z in scores) / len(scores) if scores else 0.0
    if len(means) < 3 or unit <= 0:
        return 0.0
    target = sum(m * m for m in means) / len(means) / unit
    lo, hi = 0.0, 0.99
    if target <= ar1_mean_variance(lo, h):
        return 0.0
    if target >= ar1_mean_variance(hi, h):
        return hi
    for _ in range(40):  # bisection: the variance grows with rho
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ar1_mean_variance(mid, h) < target else (lo, mid)
    return (lo + hi) / 2


class Spread:
    """Draws from measured quantiles; a constant when given one value.

    With `autocorr` > 0 consecutive draws are correlated (a Gaussian AR(1) process mapped
    through the quantiles, so each draw still has the measured spread): on shared cores
    the slow steps come in runs (the machine's other work lasts seconds), and a request's
    mean over its steps then varies as much as the runs do, not as independent draws'."""

    def __init__(self, quantiles: Sequence[float], seed: int | str = 0, autocorr: float = 0.0) -> None:
        if not quantiles:
            raise ValueError("a spread needs at least one quantile")
        if len(quantiles) not in (1, len(PROBS)):
            raise ValueError(f"a spread has 1 or {len(PROBS)} quantiles, got {len(quantiles)}")
        if not 0 <= autocorr < 1:
            raise ValueError(f"autocorr must be in [0, 1), got {autocorr}")
        self.quantiles = sorted(float(q) for q in quantiles)  # sorted: a monotone inverse CDF
        self.autocorr = autocorr
        self._rng = random.Random(f"spread-{seed}")
        self._z: float | None = None

    @property
    def median(self) -> float:
        return float(np.interp(0.5, PROBS, self.quantiles)) if len(self.quantiles) > 1 else self.quantiles[0]

    def at(self, u: float) -> float:
        if len(self.quantiles) == 1:
            return self.quantiles[0]
        return float(np.interp(u, PROBS, self.quantiles))

    def draw(self) -> float:
        if len(self.quantiles) == 1:
            return self.quantiles[0]
        if not self.autocorr:
            return self.at(self._rng.random())
        rho = self.autocorr
        fresh = self._rng.gauss(0.0, 1.0)
        self._z = fresh if self._z is None else rho * self._z + math.sqrt(1 - rho * rho) * fresh
        return self.at(_NORMAL.cdf(self._z))
