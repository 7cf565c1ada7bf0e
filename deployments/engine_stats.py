"""The scheduler statistics our routing stats and autoscaling metrics read, through
vLLM's supported stat-logger plugin hook.

pyproject.toml registers `SchedulerStatsTap` in the entry point group
`vllm.stat_logger_plugins`; vLLM's AsyncLLM instantiates every plugin when it starts
(vllm/v1/engine/async_llm.py: custom_stat_loggers.extend(load_stat_logger_plugin_factories())),
next to Ray's Prometheus logger, and hands each one the `SchedulerStats` of every
engine-core step (disable_log_stats=False). The tap keeps the latest stats per engine
core; an engine replica reads them with `latest_tap()`: a dict lookup, never blocking.
Only engine processes construct an AsyncLLM, so elsewhere the tap never exists.

The tap also keeps a bounded timeline of what the engine itself measured per step
(`steps`) and per finished request (`requests`), for `cluster bench replay`'s timing
breakdown: the engine core's inter-token intervals (one synchronous step each on CPU),
the prompt tokens computed in the step, and each request's frontend-arrival -> first
token, queue and prefill times. A few tuples per step, so it is always on.
"""

from __future__ import annotations

import time
import weakref
from collections import deque
from typing import Any

from cluster.upstream import vllm as upstream_vllm

_latest: weakref.ref[Any] | None = None
TIMELINE_STEPS = 20_000  # ~ a few minutes of steps; older ones fall off


class SchedulerStatsTap(upstream_vllm.aggregate_stat_logger_base()):  # type: ignore[misc]
    """Keeps the latest SchedulerStats of each engine core (data-parallel rank)."""

    def __init__(self, vllm_config: Any = None, engine_indexes: list[int] | None = None) -> None:
        self.vllm_config = vllm_config
        self.latest: dict[int, Any] = {}
        self.last_step_at = 0.0  # monotonic time of the latest engine-core step
        # (frontend wall time, prompt tokens computed, decode tokens, mean inter-token s,
        # running, waiting) per step with outputs; see the module docstring.
        self.steps: deque[tuple[float, int, int, float, int, int]] = deque(maxlen=TIMELINE_STEPS)
        # (frontend arrival wall time, first-token latency s, queued s, prefill s,
        # decode s, prompt tokens, generated tokens, cached tokens) per finished request.
        self.requests: deque[tuple[float, float, float, float, float, int, int, int]] = deque(maxlen=TIMELINE_STEPS)
        global _latest
        _latest = weakref.ref(self)

    def record(
        self,
        scheduler_stats: Any,
        iteration_stats: Any,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        if scheduler_stats is not None:
            self.latest[engine_idx] = scheduler_stats
            self.last_step_at = time.monotonic()
        if iteration_stats is not None:
            self._record_timeline(scheduler_stats, iteration_stats)

    def _record_timeline(self, scheduler_stats: Any, it: Any) -> None:
        itl = it.inter_token_latencies_iter
        running = scheduler_stats.num_running_reqs if scheduler_stats is not None else -1
        waiting = scheduler_stats.num_waiting_reqs if scheduler_stats is not None else -1
        prompt = getattr(getattr(it, "prompt_token_stats", None), "computed", 0)
        self.steps.append(
            (it.iteration_timestamp, int(prompt), len(itl), sum(itl) / len(itl) if itl else 0.0, running, waiting)
        )
        for f in it.finished_requests:
            arrival = it.iteration_timestamp - f.e2e_latency
            first = f.e2e_latency - f.decode_time  # arrival -> first token (decode ends the request)
            self.requests.append(
                (
                    arrival,
                    first,
                    f.queued_time,
                    f.prefill_time,
                    f.decode_time,
                    f.num_prompt_tokens,
                    f.num_generation_tokens,
                    getattr(f, "num_cached_tokens", 0),
                )
            )

    def log_engine_initialized(self) -> None:
        pass


def latest_tap() -> SchedulerStatsTap | None:
    """The tap of this process's engine (the newest, should an engine be restarted)."""
    tap = _latest() if _latest is not None else None
    return tap if isinstance(tap, SchedulerStatsTap) else None
