"""Step 7: call the engines, with retry before the first token and stream migration after.

Before the first chunk: a failed attempt (the replica died, was unreachable, or its engine
failed with a 5xx) marks the replica failed, so every router of this gateway skips it at
once, and the request is routed again, to another replica of its pool and, for the last
attempt, to a larger pool that holds it; within `resilience.max_attempts` and
`retry_deadline_s`. Only then is the answer 503 with Retry-After. The engine's own 4xx
(e.g. an invalid parameter) is answered as is. A non-streamed request is retried from the
start the same way (its single chunk is its first).

After the first chunk: a stream cut by a replica failure continues on another replica
(cluster.gateway.migration); when that is impossible the pipeline ends the stream with an
error event and `[DONE]`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence

from cluster.config import ResilienceConfig
from cluster.gateway.context import EngineChunk, RequestContext
from cluster.gateway.engine import EngineClient, EngineUnavailable
from cluster.gateway.metrics import GatewayMetrics
from cluster.gateway.migration import SentTokens, StreamMigrator
from cluster.gateway.pipeline import Step
from cluster.gateway.steps.choose_pool import ChoosePool
from cluster.gateway.steps.route import Route
from cluster.routing.replica_health import ReplicaHealth

# How often a wait for the engine's next chunk checks whether its replica was marked failed.
WATCH_S = 0.5
# How long a read cancelled on a failed replica may take to unwind before its stream is
# closed anyway (a cancelled await on a dead or wedged replica's call returns at once).
UNWIND_S = 2.0


class Dispatch(Step):
    name = "dispatch"

    def __init__(
        self,
        engine: EngineClient,
        served_name: str,
        *,
        route: Route,
        pools: ChoosePool,
        health: ReplicaHealth,
        resilience: ResilienceConfig,
        completion_model: type,
        metrics: GatewayMetrics,
    ) -> None:
        self.engine = engine
        self.served_name = served_name
        self.route = route
        self.pools = pools
        self.health = health
        self.cfg = resilience
        self.metrics = metrics
        self.migrator = StreamMigrator(completion_model, resilience.max_migrations)

    async def on_request(self, ctx: RequestContext) -> None:
        assert ctx.pool is not None, "dispatch runs after choose_pool"
        body = ctx.body
        body.model = self.served_name
        sent = SentTokens(client_wants_ids=bool(getattr(body, "return_token_ids", False)))
        if ctx.stream and self.cfg.max_migrations > 0:
            body.return_token_ids = True  # the token ids a migration continues from
        first, stream = await self._first_chunk(ctx)
        if ctx.replica:
            ctx.response_headers["X-Served-By"] = ctx.replica
            if ctx.hint is not None:
                # What the router expected that replica to have cached (compare with
                # usage.prompt_tokens_details.cached_tokens: the engine's count).
                predicted = ctx.hint.matched_blocks * ctx.hint.hash_block_size
                ctx.response_headers["X-Predicted-Cached-Tokens"] = str(predicted)
        ctx.response_headers["X-Attempts"] = str(ctx.attempts)
        if first.whole:
            ctx.whole = first.data
            await _aclose(stream)
        else:
            ctx.upstream = self._resilient(ctx, sent, first, stream)

    # -- before the first chunk: retry ------------------------------------------------

    async def _first_chunk(self, ctx: RequestContext) -> tuple[EngineChunk, AsyncIterator[EngineChunk]]:
        deadline = ctx.started_at + self.cfg.retry_deadline_s
        failure: EngineUnavailable | None = None
        while ctx.attempts < self.cfg.max_attempts and time.monotonic() < deadline:
            if ctx.attempts > 0:
                await self._reroute(ctx, last=ctx.attempts == self.cfg.max_attempts - 1)
                self.metrics.retry(ctx)
            ctx.attempts += 1
            ctx.body.request_id = ctx.engine_request_id or ctx.request_id  # where the router finds the hint
            stream = self.engine.generate(
                ctx.pool or "", ctx.kind, ctx.body, session_id=ctx.session_id, headers=ctx.engine_headers or None
            )
            try:
                return await self._next(ctx, stream, self._next_attempt_pools(ctx)), stream
            except StopAsyncIteration:
                failure = EngineUnavailable("the engine returned an empty reply")
            except EngineUnavailable as exc:
                failure = exc
            self._failed(ctx)
        reason = failure.message if failure is not None else "no attempt left"
        raise EngineUnavailable(
            f"{reason} (after {ctx.attempts} attempt(s) in {time.monotonic() - ctx.started_at:.1f} s)",
            retry_after_s=self.cfg.retry_after_s,
        )

    def _next_attempt_pools(self, ctx: RequestContext) -> list[str]:
        """Where the next attempt would go (see `_reroute`): none after the last one."""
        if ctx.attempts >= self.cfg.max_attempts:
            return []
        if ctx.attempts + 1 == self.cfg.max_attempts:
            spill = self.pools.spill_pools(ctx)
            if spill:
                return spill[:1]
        return [ctx.pool or ""]

    async def _next(self, ctx: RequestContext, stream: AsyncIterator[EngineChunk], pools: Sequence[str]) -> EngineChunk:
        """The stream's next chunk; EngineUnavailable as soon as its replica is marked failed
        (e.g. it reported a wedged engine) while we wait, instead of when Serve kills it,
        if a replica of `pools` (where the request would go next) could take it. With
        nowhere to go it waits: for the replica, or for Serve to replace it (the call then
        fails)."""
        step = asyncio.ensure_future(anext(stream))
        try:
            while True:
                done, _ = await asyncio.wait({step}, timeout=WATCH_S)
                if done:
                    return _result(step)
                replica = ctx.replica
                if replica is not None and self.health.is_excluded(replica):
                    # Given up only where another replica could take it (replica_health).
                    excluded = ctx.hint.excluded_replicas if ctx.hint is not None else ()
                    if pools and self.health.has_alternative(replica, pools, excluded):
                        raise EngineUnavailable(f"replica {replica} stopped making progress")
        finally:
            if not step.done():
                step.cancel()
                # Let the cancelled read unwind before anyone closes the stream: an async
                # generator being read cannot be closed (RuntimeError, and the client's
                # connection dropped without an error event).
                await asyncio.wait({step}, timeout=UNWIND_S)
                if step.done() and not step.cancelled():
                    step.exception()  # retrieved: the failure is already being handled

    def _failed(self, ctx: RequestContext) -> None:
        replica = ctx.replica
        if replica is not None and ctx.hint is not None:
            self.health.mark_failed(replica, self.cfg.exclude_failed_s)
            ctx.hint.excluded_replicas.add(replica)
            ctx.hint.chosen_replica = None

    async def _reroute(self, ctx: RequestContext, *, last: bool) -> None:
        """Another replica of the pool; on the last attempt a larger pool that holds the
        request, if there is one."""
        pool = ctx.pool or ""
        if last:
            spill = self.pools.spill_pools(ctx)
            if spill:
                self.pools.move(ctx, spill[0])
                pool = spill[0]
        await self.route.post(ctx, pool, f"{ctx.request_id}-{ctx.attempts}", ctx.prompt_ids)

    # -- after the first chunk: migration ---------------------------------------------

    async def _resilient(
        self, ctx: RequestContext, sent: SentTokens, first: EngineChunk, stream: AsyncIterator[EngineChunk]
    ) -> AsyncIterator[EngineChunk]:
        current = stream
        try:
            yield EngineChunk(sent.observe(first.data))
            while True:
                try:
                    while True:
                        try:
                            # A migration stays in the pool; a stream that cannot move waits.
                            pools = [ctx.pool or ""] if self.migrator.why_not(ctx, sent) is None else []
                            item = await self._next(ctx, current, pools)
                        except StopAsyncIteration:
                            return
                        yield EngineChunk(sent.observe(item.data))
                except EngineUnavailable as cut:
                    self._failed(ctx)
                    reason = self.migrator.why_not(ctx, sent)
                    if reason is not None:
                        raise EngineUnavailable(f"{cut.message}; {reason}") from cut
                    await _aclose(current)
                    current = await self._migrate(ctx, sent)
        finally:
            await _aclose(current)

    async def _migrate(self, ctx: RequestContext, sent: SentTokens) -> AsyncIterator[EngineChunk]:
        ctx.migrations += 1
        self.metrics.migration(ctx)
        request_id = f"{ctx.request_id}-m{ctx.migrations}"
        await self.route.post(ctx, ctx.pool or "", request_id, [*ctx.prompt_ids, *sent.ids])
        body = self.migrator.continuation(ctx, sent, self.served_name, request_id)
        stream = self.engine.generate(
            ctx.pool or "", "completions", body, session_id=ctx.session_id, headers=ctx.engine_headers or None
        )
        return self.migrator.reshape(ctx, sent, stream, len(sent.ids))


def _result(step: asyncio.Future[EngineChunk]) -> EngineChunk:
    """The chunk; a cancellation that is not ours (Serve cancelled the call on a replica it
    is stopping) is a replica failure, not a client that left."""
    try:
        return step.result()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        raise EngineUnavailable("the engine call was cancelled on the replica") from None


async def _aclose(stream: AsyncIterator[EngineChunk]) -> None:
    close = getattr(stream, "aclose", None)
    if close is None:
        return
    try:
        await close()
    except RuntimeError as exc:
        # A read of it is still unwinding after UNWIND_S: nothing more is read from it,
        # and its call ends with its replica; the reply goes on (migrated) or ends cleanly.
        if "already running" not in str(exc):
            raise
