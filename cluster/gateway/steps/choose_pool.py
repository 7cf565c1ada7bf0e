"""Step 5: the smallest pool whose context holds prompt + max_tokens, spilling to a larger
pool when it is saturated (cluster.routing.pool_selector); 400 beyond the largest pool.
Also keeps this gateway's in-flight count per pool, which is the saturation signal."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from cluster import errors
from cluster.gateway.context import RequestContext
from cluster.gateway.pipeline import Step
from cluster.routing.pool_selector import ContextTooLong, PoolLoad, PoolSelector

_COUNTED = "choose_pool.counted"


class ChoosePool(Step):
    name = "choose_pool"

    def __init__(self, selector: PoolSelector, fleet: Callable[[], tuple[Mapping[str, int], int]]) -> None:
        """`fleet()` gives (running replicas per pool, running gateway replicas)."""
        self.selector = selector
        self.fleet = fleet
        self.in_flight: dict[str, int] = {name: 0 for name in selector.pool_names}

    def loads(self) -> dict[str, PoolLoad]:
        replicas, gateways = self.fleet()
        # Each gateway replica sees about 1/N of the traffic: scale its own count.
        return {
            name: PoolLoad(in_flight=n * max(1, gateways), replicas=replicas.get(name, 0))
            for name, n in self.in_flight.items()
        }

    async def on_request(self, ctx: RequestContext) -> None:
        try:
            choice = self.selector.select(ctx.select_tokens, ctx.max_tokens, self.loads())
        except ContextTooLong as exc:
            raise errors.context_length_exceeded(exc) from None
        ctx.spilled_from = choice.spilled_from
        ctx.response_headers["X-Prompt-Tokens"] = str(len(ctx.prompt_ids))
        self.move(ctx, choice.pool)

    def move(self, ctx: RequestContext, pool: str) -> None:
        """Serve the request from `pool` (here, or a retry's spill): the in-flight count
        follows it."""
        counted = ctx.extras.pop(_COUNTED, None)
        if counted is not None:
            self.in_flight[counted] = max(0, self.in_flight[counted] - 1)
        self.in_flight[pool] += 1
        ctx.extras[_COUNTED] = pool
        ctx.pool = pool
        ctx.response_headers["X-Pool"] = pool

    def spill_pools(self, ctx: RequestContext) -> list[str]:
        """Larger pools that accept spill and hold this request, smallest first."""
        return self.selector.spill_candidates(ctx.pool or "", ctx.select_tokens, ctx.max_tokens)

    def on_finish(self, ctx: RequestContext) -> None:
        counted = ctx.extras.pop(_COUNTED, None)
        if counted is not None:
            self.in_flight[counted] = max(0, self.in_flight[counted] - 1)
