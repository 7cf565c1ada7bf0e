"""Step 7: call the chosen pool's engines and wait for their first answer.

Errors before the first chunk become the response's status (the engine's own 4xx, or 503
with Retry-After when no replica could serve it), never a 500. Afterwards the pipeline
streams the rest (`ctx.upstream`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from cluster.gateway.context import EngineChunk, RequestContext
from cluster.gateway.engine import EngineClient, EngineUnavailable
from cluster.gateway.pipeline import Step


class Dispatch(Step):
    name = "dispatch"

    def __init__(self, engine: EngineClient, served_name: str) -> None:
        self.engine = engine
        self.served_name = served_name

    async def on_request(self, ctx: RequestContext) -> None:
        assert ctx.pool is not None, "dispatch runs after choose_pool"
        body = ctx.body
        body.request_id = ctx.request_id  # the key the router finds the hint under
        body.model = self.served_name
        ctx.attempts += 1
        stream = self.engine.generate(
            ctx.pool, ctx.kind, body, session_id=ctx.session_id, headers=ctx.engine_headers or None
        )
        try:
            first = await anext(stream)
        except StopAsyncIteration:
            raise EngineUnavailable("the engine returned an empty reply") from None
        if ctx.replica:
            ctx.response_headers["X-Served-By"] = ctx.replica
        if first.whole:
            ctx.whole = first.data
            await _aclose(stream)
        else:
            ctx.upstream = _prepend(first, stream)


async def _prepend(first: EngineChunk, rest: AsyncIterator[EngineChunk]) -> AsyncIterator[EngineChunk]:
    try:
        yield first
        async for item in rest:
            yield item
    finally:
        await _aclose(rest)


async def _aclose(stream: AsyncIterator[EngineChunk]) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()
