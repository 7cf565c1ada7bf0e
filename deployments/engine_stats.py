"""The scheduler statistics our routing stats and autoscaling metrics read, through
vLLM's supported stat-logger plugin hook.

pyproject.toml registers `SchedulerStatsTap` in the entry point group
`vllm.stat_logger_plugins`; vLLM's AsyncLLM instantiates every plugin when it starts
(vllm/v1/engine/async_llm.py: custom_stat_loggers.extend(load_stat_logger_plugin_factories())),
next to Ray's Prometheus logger, and hands each one the `SchedulerStats` of every
engine-core step (disable_log_stats=False). The tap keeps the latest stats per engine
core; an engine replica reads them with `latest_tap()`: a dict lookup, never blocking.
Only engine processes construct an AsyncLLM, so elsewhere the tap never exists.
"""

from __future__ import annotations

import time
import weakref
from typing import Any

from cluster.upstream import vllm as upstream_vllm

_latest: weakref.ref[Any] | None = None


class SchedulerStatsTap(upstream_vllm.aggregate_stat_logger_base()):  # type: ignore[misc]
    """Keeps the latest SchedulerStats of each engine core (data-parallel rank)."""

    def __init__(self, vllm_config: Any = None, engine_indexes: list[int] | None = None) -> None:
        self.vllm_config = vllm_config
        self.latest: dict[int, Any] = {}
        self.last_step_at = 0.0  # monotonic time of the latest engine-core step
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

    def log_engine_initialized(self) -> None:
        pass


def latest_tap() -> SchedulerStatsTap | None:
    """The tap of this process's engine (the newest, should an engine be restarted)."""
    tap = _latest() if _latest is not None else None
    return tap if isinstance(tap, SchedulerStatsTap) else None
