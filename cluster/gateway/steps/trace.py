"""Step 0: one span per request, from the first step to the end of the reply's stream
(a streamed body is sent after the endpoint returns, so the span ends in `on_finish`).

A client's W3C `traceparent` makes the span a child of the caller's trace. Attributes say
where the request went and what happened: pool (and the pool it spilled from), the
replica the router chose, prompt tokens, the router's predicted cached tokens, engine
attempts, outcome. With no exporter configured the tracer is a no-op.
"""

from __future__ import annotations

from opentelemetry import propagate, trace

from cluster.gateway.context import RequestContext
from cluster.gateway.pipeline import Step
from cluster.telemetry import tracer

_SPANS = "trace.span"


class Trace(Step):
    name = "trace"

    def __init__(self) -> None:
        self._tracer = tracer("cluster.gateway")

    async def on_request(self, ctx: RequestContext) -> None:
        parent = propagate.extract(dict(ctx.headers))
        span = self._tracer.start_span(f"gateway.{ctx.kind}", context=parent, kind=trace.SpanKind.SERVER)
        span.set_attribute("request.id", ctx.request_id)
        ctx.extras[_SPANS] = span

    def on_finish(self, ctx: RequestContext) -> None:
        span = ctx.extras.pop(_SPANS, None)
        if span is None:
            return
        hint = ctx.hint
        attributes: dict[str, str | int] = {
            "tenant": ctx.tenant,
            "prompt_tokens": len(ctx.prompt_ids),
            "attempts": ctx.attempts,
            "outcome": ctx.outcome,
            "completion.chunks": ctx.reply.chunks,
        }
        if ctx.pool:
            attributes["pool"] = ctx.pool
        if ctx.spilled_from:
            attributes["pool.spilled_from"] = ctx.spilled_from
        if ctx.session_id:
            attributes["session.id"] = ctx.session_id
        if hint is not None:
            attributes["replica"] = hint.chosen_replica or ""
            attributes["cached_tokens.predicted"] = hint.matched_blocks * hint.hash_block_size
        span.set_attributes(attributes)
        if ctx.outcome == "error":
            span.set_status(trace.Status(trace.StatusCode.ERROR))
        span.end()
