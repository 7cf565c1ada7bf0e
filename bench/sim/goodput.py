"""Per-request SLOs and SLO goodput: the load a fleet carries within its SLO.

A request attains the SLO when it completes with

    TTFT <= max(ttft_min_s, ttft_floor_factor x its own no-cache TTFT floor)
    mean TPOT = (finish - first token) / (output tokens - 1) <= tpot_mean_ms

(defaults 2 s, 1.5x, 100 ms): a long prompt is allowed its own prefill time, a short one
a fixed budget. Rejected and unfinished requests miss it. SLO goodput of a policy is the
largest arrival-rate scale at which the attainment is >= `target` (90%), found by
bisection, assuming attainment falls with load.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class SloSpec:
    ttft_min_s: float = 2.0
    ttft_floor_factor: float = 1.5
    tpot_mean_ms: float = 100.0
    target: float = 0.90

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def slo_met(
    spec: SloSpec,
    arrival: Sequence[float],
    first_token: Sequence[float],
    finish: Sequence[float],
    output_tokens: Sequence[int],
    no_cache_floor_s: Sequence[float],
) -> list[bool]:
    """Per request: whether it attained the SLO (see the module docstring)."""
    out = []
    tpot_s = spec.tpot_mean_ms / 1000.0
    for a, f, d, o, floor in zip(arrival, first_token, finish, output_tokens, no_cache_floor_s, strict=True):
        if f < 0 or d < 0 or math.isnan(floor):
            out.append(False)
            continue
        ok = f - a <= max(spec.ttft_min_s, spec.ttft_floor_factor * floor)
        if ok and o > 1:
            ok = (d - f) / (o - 1) <= tpot_s
        out.append(ok)
    return out


def attainment(met: Sequence[bool]) -> float:
    return sum(met) / len(met) if met else math.nan


@dataclass
class Goodput:
    rate_scale: float  # largest scale found with attainment >= target (0 if none)
    bounded: bool  # False: attainment still met the target at `hi`, the search ceiling
    probes: dict[float, float]  # rate scale -> attainment, every run the search used


class GoodputSearch:
    """Bisection for the largest scale in [lo, hi] whose attainment is >= target, to
    within `tol` (relative), one probe at a time so that the searches of several
    policies can run their probes side by side. `known` holds attainments already
    measured (a sweep's); they narrow the bracket before any new run."""

    def __init__(
        self,
        *,
        target: float = 0.90,
        lo: float = 0.25,
        hi: float = 8.0,
        tol: float = 0.05,
        known: dict[float, float] | None = None,
    ) -> None:
        if not 0 < lo < hi:
            raise ValueError(f"goodput search needs 0 < lo < hi, got {lo}, {hi}")
        self.target, self.lo, self.hi, self.tol = target, lo, hi, tol
        self.probes: dict[float, float] = dict(known or {})

    def _bracket(self) -> tuple[float | None, float | None]:
        inside = {s: a for s, a in self.probes.items() if self.lo <= s <= self.hi}
        bad = min((s for s, a in inside.items() if a < self.target), default=None)
        good = max((s for s, a in inside.items() if a >= self.target and (bad is None or s < bad)), default=None)
        return good, bad

    def next_probe(self) -> float | None:
        """The next rate scale to run, or None when the search is done."""
        good, bad = self._bracket()
        if bad is None:
            return None if self.hi in self.probes else self.hi
        if good is None:
            return None if self.lo in self.probes else self.lo
        if bad - good <= self.tol * good:
            return None
        return round((good + bad) / 2, 4)

    def record(self, scale: float, value: float) -> None:
        self.probes[scale] = value

    def result(self) -> Goodput:
        good, bad = self._bracket()
        return Goodput(good or 0.0, bad is not None, dict(self.probes))


def bisect_goodput(attainment_at: Callable[[float], float], **search: Any) -> Goodput:
    """GoodputSearch run to the end with one callable (see GoodputSearch)."""
    gs = GoodputSearch(**search)
    while (s := gs.next_probe()) is not None:
        gs.record(s, attainment_at(s))
    return gs.result()


__all__ = ["Goodput", "GoodputSearch", "SloSpec", "attainment", "bisect_goodput", "slo_met"]
