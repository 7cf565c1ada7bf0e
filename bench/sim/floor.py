"""Per-request TTFT floors: what a request's first token costs at best, under the same
step-time model the simulator runs.

A request's floor is its TTFT alone on an idle replica of the pool the simulator would
place it in (smallest fitting pool among those with replicas, no spill): its prefill
runs in back-to-back chunks of the engine's `max_num_batched_tokens`, each chunk one
engine step of `step_ms([(chunk, context)], 0, 0)`, and the first token comes at the end
of the last chunk. Two floors per request:

* perfect reuse: the longest prefix of its chained block hashes seen earlier in the trace
  (an earlier prompt, or a reply cached under `output_block_ids`) is cached, as in
  `TraceStats.block_hit_ceiling`, with an infinite cache;
* no cache: the whole prompt is prefilled.

The perfect-reuse floor is the line no router can beat; the no-cache floor prices the
request's own size in the SLO (`bench.sim.goodput`). Both are independent of the arrival rate.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from bench.sim.replica_model import StepTime
from bench.sim.simulator import StepTimeFactory, default_step_time
from bench.traces import Trace
from cluster.config import ClusterConfig
from cluster.routing.pool_selector import ContextTooLong, PoolSelector


@dataclass
class TtftFloors:
    """Per request, in trace order; NaN for a request no pool holds."""

    perfect_reuse_s: list[float]
    no_cache_s: list[float]
    cached_tokens: list[int]  # under perfect reuse


def prefill_ttft_s(step_time: StepTime, prompt_tokens: int, cached_tokens: int, batch_tokens: int) -> float:
    """TTFT of a prompt alone on an idle engine with `cached_tokens` already in its cache.

    As the replica model does: at least the last token is computed, and every step
    prefills up to `batch_tokens` of it."""
    done = min(max(0, cached_tokens), prompt_tokens - 1)
    total = 0.0
    while done < prompt_tokens:
        n = min(batch_tokens, prompt_tokens - done)
        total += step_time.step_ms([(n, done)], 0, 0)
        done += n
    return total / 1000.0


def ttft_floors(
    cfg: ClusterConfig,
    trace: Trace,
    replicas: Mapping[str, int],
    step_time_factory: StepTimeFactory = default_step_time,
) -> TtftFloors:
    pools = [p for p in cfg.pools if replicas.get(p.name, 0) > 0]
    selector = PoolSelector(pools)
    models = {p.name: step_time_factory(cfg, p) for p in pools}
    budget = {p.name: p.engine.max_num_batched_tokens for p in pools}
    perfect: list[float] = []
    cold: list[float] = []
    cached_out: list[int] = []
    for r, cached in zip(trace.requests, trace.perfect_reuse_tokens(), strict=True):
        try:
            pool = selector.select(r.prompt_tokens, r.output_tokens).pool
        except ContextTooLong:
            perfect.append(float("nan"))
            cold.append(float("nan"))
            cached_out.append(0)
            continue
        st, bt = models[pool], budget[pool]
        perfect.append(prefill_ttft_s(st, r.prompt_tokens, cached, bt))
        cold.append(prefill_ttft_s(st, r.prompt_tokens, 0, bt))
        cached_out.append(min(cached, r.prompt_tokens - 1))
    return TtftFloors(perfect, cold, cached_out)


__all__ = ["TtftFloors", "prefill_ttft_s", "ttft_floors"]
