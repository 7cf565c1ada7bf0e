"""A measured spread as the simulator draws from it: the deciles' midpoints (quantiles at
0.05, 0.15, ..., 0.95) of a quantity observed per request or per step, sampled by
inverse transform with piecewise-linear interpolation (clamped beyond the outer ones).

Used for the cpu-tiny profile's serving-path terms (bench/live/engine_timeline.py
measures them during a replay): on a few shared cores the serving path's time per
request and the engine's steps vary by 2x and more from one to the next, and the
percentiles a replay reports (p90) come from that spread, not from its median."""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np

PROBS: tuple[float, ...] = tuple((i + 0.5) / 10 for i in range(10))


def quantiles_of(values: Sequence[float], digits: int = 2) -> list[float]:
    """The spread of `values` (at PROBS), rounded; [] for no values."""
    if len(values) == 0:
        return []
    return [round(float(q), digits) for q in np.quantile(np.asarray(values, dtype=float), PROBS)]


class Spread:
    """Draws from measured quantiles; a constant when given one value."""

    def __init__(self, quantiles: Sequence[float], seed: int | str = 0) -> None:
        if not quantiles:
            raise ValueError("a spread needs at least one quantile")
        if len(quantiles) not in (1, len(PROBS)):
            raise ValueError(f"a spread has 1 or {len(PROBS)} quantiles, got {len(quantiles)}")
        self.quantiles = sorted(float(q) for q in quantiles)  # sorted: a monotone inverse CDF
        self._rng = random.Random(f"spread-{seed}")

    @property
    def median(self) -> float:
        return float(np.interp(0.5, PROBS, self.quantiles)) if len(self.quantiles) > 1 else self.quantiles[0]

    def at(self, u: float) -> float:
        if len(self.quantiles) == 1:
            return self.quantiles[0]
        return float(np.interp(u, PROBS, self.quantiles))

    def draw(self) -> float:
        return self.at(self._rng.random()) if len(self.quantiles) > 1 else self.quantiles[0]
