"""The gateway's request path: an ordered list of small steps (an Envoy-style filter chain).

Each step is one module in `cluster.gateway.steps` and may implement four hooks:

- `on_request(ctx)`  in order, before any byte is sent; raising `APIError` refuses the
  request with that status (later steps do not run, earlier ones still get `on_finish`).
- `on_chunk(ctx, chunk)`  every reply chunk as it goes to the client (observers only).
- `on_complete(ctx)`  once the whole reply has gone by, before `[DONE]` (streamed) or the
  response (whole): e.g. the session commit. An `APIError` here becomes an error event
  before `[DONE]` (the status line is already sent) or the response's status.
- `on_finish(ctx)`  exactly once per request, whatever happened (sync: it must not block;
  schedule background work instead), in reverse order.

`Pipeline.run(ctx)` runs them and writes the HTTP response itself: the OpenAI SSE stream
or the JSON body, with the headers steps put in `ctx.response_headers`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

from starlette.responses import JSONResponse, Response, StreamingResponse

from cluster import errors
from cluster.gateway import sse
from cluster.gateway.context import EngineChunk, RequestContext

log = logging.getLogger(__name__)


class Step:
    """A pipeline step; every hook is optional (these defaults do nothing)."""

    name = "step"

    async def on_request(self, ctx: RequestContext) -> None:
        return None

    def on_chunk(self, ctx: RequestContext, chunk: dict[str, Any]) -> None:
        return None

    async def on_complete(self, ctx: RequestContext) -> None:
        return None

    def on_finish(self, ctx: RequestContext) -> None:
        return None


class Pipeline:
    def __init__(self, steps: Sequence[Step]) -> None:
        self.steps = list(steps)
        self._background: set[asyncio.Task[Any]] = set()

    @property
    def step_names(self) -> list[str]:
        return [s.name for s in self.steps]

    async def run(self, ctx: RequestContext) -> Response:
        started: list[Step] = []
        try:
            for step in self.steps:
                started.append(step)
                await step.on_request(ctx)
            if ctx.upstream is None and ctx.whole is None:
                raise errors.APIError(500, "no step produced a reply", type="server_error")
        except BaseException as exc:
            ctx.outcome = "error"
            _record_refusal(ctx, exc)
            self._finish(ctx, started)
            raise
        if ctx.whole is not None:
            return await self._whole(ctx)
        return StreamingResponse(self._stream(ctx), media_type="text/event-stream", headers=ctx.response_headers)

    async def _whole(self, ctx: RequestContext) -> Response:
        assert ctx.whole is not None
        try:
            ctx.reply.add_whole(ctx.whole)
            for step in self.steps:
                step.on_chunk(ctx, ctx.whole)
            for step in self.steps:
                await step.on_complete(ctx)
            ctx.outcome, ctx.status = "ok", 200
        except BaseException as exc:
            ctx.outcome = "error"
            _record_refusal(ctx, exc)
            raise
        finally:
            self._finish(ctx, self.steps)
        return JSONResponse(ctx.whole, headers=ctx.response_headers)

    async def _stream(self, ctx: RequestContext) -> AsyncIterator[str]:
        assert ctx.upstream is not None
        upstream = ctx.upstream
        ctx.status = 200  # the status line goes out with the first chunk
        try:
            async for item in upstream:
                chunk = item.data
                ctx.reply.add(chunk)
                for step in self.steps:
                    step.on_chunk(ctx, chunk)
                yield sse.encode(chunk)
            if ctx.reply.error is None:
                try:
                    for step in self.steps:
                        await step.on_complete(ctx)
                except errors.APIError as exc:
                    ctx.reply.error = exc.body()["error"]
                    yield sse.encode(exc.body())
            ctx.outcome = "ok" if ctx.reply.error is None else "error"
            if isinstance(ctx.reply.error, dict):
                ctx.error_code = ctx.reply.error.get("code")
            yield sse.DONE
        except errors.APIError as exc:  # the engine failed mid-stream: say so, never cut silently
            ctx.outcome, ctx.error_code = "error", exc.code
            yield sse.encode(exc.body())
            yield sse.DONE
        except (GeneratorExit, asyncio.CancelledError):
            ctx.outcome = "cancelled"  # the client went away
            raise
        finally:
            if ctx.outcome == "pending":
                ctx.outcome = "error"
            self._close_later(upstream)
            self._finish(ctx, self.steps)

    def _close_later(self, upstream: AsyncIterator[EngineChunk]) -> None:
        """Close the engine stream (cancels the engine request) in a task of its own: this
        may run inside a cancelled scope, where an await would be cancelled again."""
        close = getattr(upstream, "aclose", None)
        if close is None:
            return
        try:
            task = asyncio.get_running_loop().create_task(close())
        except RuntimeError:
            return
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _finish(self, ctx: RequestContext, steps: Sequence[Step]) -> None:
        for step in reversed(steps):
            try:
                step.on_finish(ctx)
            except Exception:  # bookkeeping must never fail a request
                log.exception("step %s: on_finish failed for request %s", step.name, ctx.request_id)


def _record_refusal(ctx: RequestContext, exc: BaseException) -> None:
    """The status a refusal is answered with (cluster.gateway.app: an `APIError` as-is,
    anything else 500); 499 (nginx's "client closed request") for a cancelled request."""
    if isinstance(exc, errors.APIError):
        ctx.status, ctx.error_code = exc.status, exc.code
    elif isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        ctx.outcome, ctx.status = "cancelled", 499
    else:
        ctx.status, ctx.error_code = 500, "internal"


__all__ = ["Pipeline", "Step"]
