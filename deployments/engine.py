"""One engine replica: ray.serve.llm's LLMServer (one vLLM engine, TP over one node's GPUs)
plus the routing stats our request router reads.

`record_routing_stats` is polled by Ray Serve every `request_routing_stats_period_s`
and must be cheap and never block the replica's event loop: it reads the latest
scheduler statistics from vLLM's stat-logger hook (deployments.engine_stats) and the
requests this replica is serving, which it counts itself.

Wedged engine: with requests in flight and no engine-core step for `wedged_after_s`
(LLMConfig.experimental_configs, from the typed config's resilience section), the
routing stats say `wedged` (every router skips the replica within a stats period) and
the health check fails, so Serve replaces the replica; its requests fail over to others
(cluster.gateway.steps.dispatch retries or migrates them).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any

from ray.serve.llm.deployment import LLMServer
from ray.serve.llm.openai_api_models import ChatCompletionRequest

from autoscaling.engine_metrics import QueueWaitMeter
from cluster.upstream import ray_serve as upstream_ray
from cluster.upstream import vllm as upstream_vllm
from deployments.engine_stats import latest_tap

logger = logging.getLogger("ray.serve")  # lands in the replica's Serve log

# LLMConfig.experimental_configs keys deployments.app sets: resilience.wedged_after_s;
# router.kv_events on (this replica offsets its events ports by its node-local rank and
# reports them); under Ray's KVAwareRouter, the deployment that hears lifecycle events.
WEDGED_AFTER_KEY = "mls_wedged_after_s"
KV_EVENTS_KEY = "mls_kv_events"
KV_LIFECYCLE_TO_KEY = "mls_kv_lifecycle_to"


class PoolEngine(LLMServer):
    """LLMServer that reports num_waiting, num_running, kv_usage, kv_capacity_blocks,
    max_num_seqs and block_size to the request router."""

    _unfinished = 0
    _busy_since = 0.0  # when the replica last went from idle to busy

    @property
    def wedged_after_s(self) -> float:
        return float(self._llm_config.experimental_configs.get(WEDGED_AFTER_KEY, 15.0))

    def wedged_for_s(self) -> float:
        """How long the engine has had work but made no step (0 when it is fine)."""
        if self._unfinished <= 0:
            return 0.0
        tap = latest_tap()
        last = max(self._busy_since, tap.last_step_at if tap is not None else 0.0)
        stalled = time.monotonic() - last
        return stalled if stalled > self.wedged_after_s else 0.0

    async def check_health(self) -> None:
        await super().check_health()
        stalled = self.wedged_for_s()
        if stalled:
            raise RuntimeError(
                f"engine wedged: {self._unfinished} request(s) in flight and no engine step for {stalled:.0f} s"
            )

    _meter: QueueWaitMeter | None = None

    def _queue_meter(self) -> QueueWaitMeter:
        if self._meter is None:
            self._meter = QueueWaitMeter(time.monotonic())
        return self._meter

    def queue_figures(self) -> dict[str, float]:
        """queue_wait_s and arrival_rate (autoscaling/engine_metrics.py) from vLLM's
        per-request timestamps: queued_ts / scheduled_ts are the engine core's
        time.monotonic(), one clock per host, so comparable with ours."""
        requests = upstream_vllm.request_timestamps(upstream_ray.async_llm_of(self))
        return self._queue_meter().report(requests, time.monotonic())

    _kv_endpoints: dict[str, str] | None = None

    async def start(self) -> None:
        lifecycle_to = self._llm_config.experimental_configs.get(KV_LIFECYCLE_TO_KEY)
        if lifecycle_to:
            upstream_ray.send_kv_lifecycle_events_to(str(lifecycle_to))
        if self._llm_config.experimental_configs.get(KV_EVENTS_KEY):
            self._bind_kv_events_per_replica()
        await super().start()
        if latest_tap() is None:
            logger.warning("vLLM stats are off (disable_log_stats=True?): routing stats report request counts only")
        await self._warm_up()

    async def _warm_up(self) -> None:
        """One tiny chat completion through the same path user requests take, before the
        replica reports ready: the first request on a fresh engine otherwise pays a few
        seconds of one-time setup."""
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

    def _bind_kv_events_per_replica(self) -> None:
        """The pool's kv_events_config names the ports of node-local rank 0; replicas sharing
        a node take the next ones (vLLM's convention for data-parallel ranks), and report
        where they publish (`kv_events_endpoint`, `kv_events_replay_endpoint`)."""
        import ray

        config = dict(self._llm_config.engine_kwargs.get("kv_events_config") or {})
        if not config:
            return
        rank = upstream_ray.replica_local_rank()
        host = ray.util.get_node_ip_address()
        self._kv_endpoints = {}
        for key, stat in (("endpoint", "kv_events_endpoint"), ("replay_endpoint", "kv_events_replay_endpoint")):
            if config.get(key):
                bind, port = str(config[key]).rsplit(":", 1)
                config[key] = f"{bind}:{int(port) + rank}"
                self._kv_endpoints[stat] = f"tcp://{host}:{int(port) + rank}"
        self._llm_config.update_engine_kwargs(kv_events_config=config)
        logger.info("KV cache events: %s", self._kv_endpoints)

    # ---- requests in flight: counted here, so "idle" never depends on a stale step ----

    # `request_token_ids`: the prompt's token ids, which the gateway passes for Ray's
    # KVAwareRouter to score with (it reads the handle call's keyword arguments); the
    # engine renders the prompt itself.
    async def chat(
        self, request: Any, raw_request_info: Any = None, request_token_ids: Any = None
    ) -> AsyncGenerator[Any, None]:
        return self._counted(await super().chat(request, raw_request_info))

    async def completions(
        self, request: Any, raw_request_info: Any = None, request_token_ids: Any = None
    ) -> AsyncGenerator[Any, None]:
        return self._counted(await super().completions(request, raw_request_info))

    async def _counted(self, stream: AsyncGenerator[Any, None]) -> AsyncGenerator[Any, None]:
        self._queue_meter().on_request()
        if self._unfinished == 0:
            self._busy_since = time.monotonic()
        self._unfinished += 1
        try:
            async for item in stream:
                yield item
        finally:
            self._unfinished -= 1

    def engine_stats(self) -> dict[str, Any]:
        """The six routing-stat keys of the common interface, plus `wedged`."""
        stats = self._load_stats()
        stats["wedged"] = bool(self.wedged_for_s())
        if self._kv_endpoints:
            stats.update(self._kv_endpoints)
        return stats

    def _load_stats(self) -> dict[str, Any]:
        tap = latest_tap()
        if tap is None or tap.vllm_config is None:
            return {"num_waiting": 0, "num_running": self._unfinished}
        vllm_config = tap.vllm_config
        cache = vllm_config.cache_config
        stats: dict[str, Any] = {
            "num_waiting": 0,
            "num_running": 0,
            "kv_usage": 0.0,
            "kv_capacity_blocks": int(cache.num_gpu_blocks or 0),
            "max_num_seqs": int(vllm_config.scheduler_config.max_num_seqs),
            "block_size": int(cache.block_size),
        }
        latest = list(tap.latest.values())
        if latest and self._unfinished > 0:
            stats["num_waiting"] = sum(s.num_waiting_reqs + s.num_skipped_waiting_reqs for s in latest)
            stats["num_running"] = sum(s.num_running_reqs for s in latest)
            stats["kv_usage"] = float(sum(s.kv_cache_usage for s in latest) / len(latest))
        elif self._unfinished > 0:
            stats["num_running"] = self._unfinished
        # With no request in flight the last step's stats may be one step stale; our own
        # count is authoritative for "idle".
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
