"""The per-request SLO of the routing and autoscaling benchmarks.

A request meets it when TTFT <= max(2 s, 1.5 x its own no-cache floor) and TPOT <= 100 ms.
The floor is the time the pool's engine needs to prefill the whole prompt alone on an
idle replica, chunk by chunk at `max_num_batched_tokens` (the step-time model, no
cache hit): a 100k-token prompt cannot have a 2 s TTFT on any fleet, so its bound
scales with its own work, while short prompts keep the 2 s bound users notice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bench.sim.replica_model import StepTime

TTFT_FLOOR_S = 2.0
TTFT_FLOOR_FACTOR = 1.5
TPOT_LIMIT_S = 0.100


@dataclass(frozen=True)
class RequestSLO:
    ttft_floor_s: float = TTFT_FLOOR_S
    ttft_factor: float = TTFT_FLOOR_FACTOR
    tpot_limit_s: float = TPOT_LIMIT_S

    def ttft_bound_s(self, no_cache_floor_s: float) -> float:
        return max(self.ttft_floor_s, self.ttft_factor * no_cache_floor_s)


def prefill_floor_s(step_time: StepTime, prompt_tokens: int, max_num_batched_tokens: int) -> float:
    """Idle-replica prefill of the whole prompt, one chunk per step."""
    done = 0
    ms = 0.0
    while done < prompt_tokens:
        n = min(max_num_batched_tokens, prompt_tokens - done)
        ms += step_time.step_ms([(n, done)], 0, 0)
        done += n
    return ms / 1000.0


class FloorTable:
    """Prefill floors per pool, memoised by prompt length (traces repeat lengths)."""

    def __init__(self, step_times: dict[str, StepTime], max_batched: dict[str, int]) -> None:
        self.step_times = step_times
        self.max_batched = max_batched
        self._memo: dict[tuple[str, int], float] = {}

    def floor_s(self, pool: str, prompt_tokens: int) -> float:
        key = (pool, prompt_tokens)
        v = self._memo.get(key)
        if v is None:
            v = prefill_floor_s(self.step_times[pool], prompt_tokens, self.max_batched[pool])
            self._memo[key] = v
        return v


def meets_slo(
    slo: RequestSLO, arrival: float, first_token: float, finish: float, output_tokens: int, floor_s: float
) -> bool:
    if first_token < 0 or finish < 0:
        return False
    if first_token - arrival > slo.ttft_bound_s(floor_s):
        return False
    return not (output_tokens > 1 and (finish - first_token) / (output_tokens - 1) > slo.tpot_limit_s)


def attainment(flags: Sequence[bool]) -> float:
    return sum(flags) / len(flags) if flags else float("nan")
