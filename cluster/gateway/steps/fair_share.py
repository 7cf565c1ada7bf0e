"""Step: wait for the chosen pool in this gateway's fair queue when the pool is saturated
(cluster.admission.fair_queue): weighted fair across tenants, interactive before batch,
bounded, with a deadline. A request that waited too long or found the queue full is 503
with Retry-After (the pool is overloaded; the tenant did nothing wrong).

Saturation: a pool holds `in_flight_per_replica` (default: the engine's max_num_seqs, what
it batches at once) per running replica, this gateway 1/N of that with N gateways.

Priority also reaches vLLM where the pool's engines run `scheduling_policy: priority`
(EngineArgs.extra): interactive 0, batch 1, so the engine schedules interactive first
too. With vLLM's default policy (fcfs) the engine refuses a non-zero priority, so it is
left unset there and only the gateway's queue orders by class.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from cluster import errors
from cluster.admission.fair_queue import FairQueue, QueueFull, QueueTimeout
from cluster.config import PRIORITY_ORDER, ClusterConfig
from cluster.gateway.context import RequestContext
from cluster.gateway.pipeline import Step
from cluster.gateway.steps.admit import PRIORITY

_HELD = "fair_share.pool"


class FairShare(Step):
    name = "fair_share"

    def __init__(self, cfg: ClusterConfig, fleet: Callable[[], tuple[Mapping[str, int], int]]) -> None:
        self.cfg = cfg
        self.fleet = fleet
        qc = cfg.admission.queue
        self.queues = {p.name: FairQueue(self._capacity(p.name), qc.max_queued_per_pool) for p in cfg.pools}
        self.engine_priority = {p.name: p.engine.extra.get("scheduling_policy") == "priority" for p in cfg.pools}

    def _capacity(self, pool: str) -> Callable[[], int]:
        per_replica = self.cfg.admission.queue.in_flight_per_replica or self.cfg.pool(pool).engine.max_num_seqs

        def capacity() -> int:
            replicas, gateways = self.fleet()
            return max(1, math.ceil(replicas.get(pool, 0) * per_replica / max(1, gateways)))

        return capacity

    async def on_request(self, ctx: RequestContext) -> None:
        assert ctx.pool is not None, "fair_share runs after choose_pool"
        adm = self.cfg.admission
        limits = adm.limits(ctx.tenant)
        priority = ctx.extras.get(PRIORITY, limits.priority)
        if self.engine_priority[ctx.pool]:
            ctx.body.priority = PRIORITY_ORDER.index(priority)
        if not adm.enabled or not adm.queue.enabled:
            return
        retry = {"Retry-After": str(adm.queue.retry_after_s)}
        try:
            await self.queues[ctx.pool].acquire(
                ctx.tenant, weight=limits.weight, priority=priority, deadline_s=adm.queue.deadline_s
            )
        except QueueFull as exc:
            raise errors.APIError(
                503, f"pool {ctx.pool} is overloaded ({exc}); retry later", code="overloaded", headers=retry
            ) from None
        except QueueTimeout as exc:
            raise errors.APIError(
                503, f"pool {ctx.pool} is saturated: the request {exc} in the queue; retry later",
                code="queue_timeout", headers=retry,
            ) from None  # fmt: skip
        ctx.extras[_HELD] = ctx.pool

    def on_finish(self, ctx: RequestContext) -> None:
        pool = ctx.extras.pop(_HELD, None)
        if pool is not None:
            self.queues[pool].release()


__all__ = ["FairShare"]
