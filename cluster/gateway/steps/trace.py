"""Step 0: one trace per request, from the client through the routing decision into the
engine.

- `Trace` (first step): the request's SERVER span, a child of the client's W3C
  `traceparent` when it sends one, from the first step to the end of the reply's stream
  (a streamed body is sent after the endpoint returns, so the span ends in `on_finish`).
  It is made the current span of the request's task, so the session store's
  prepare/commit spans nest inside it.
- `TraceEngineCall` (just before dispatch): a CLIENT span for the call into the pool's
  engines; its context goes to the engine as a `traceparent` header (ctx.engine_headers,
  which Ray Serve LLM hands vLLM as the raw request's headers), so vLLM's own
  `llm_request` span (exported when the engines have `otlp_traces_endpoint`) is its child.

Attributes say where the request went and what happened: pool (and the pool it spilled
from), the replica the router chose and why, prompt tokens, predicted and engine-reported
cached tokens, engine attempts, status and outcome. With no exporter configured the tracer
is a no-op.
"""

from __future__ import annotations

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, Tracer

from cluster.gateway.context import RequestContext
from cluster.gateway.pipeline import Step
from cluster.gateway.steps.measure import engine_cached_tokens
from cluster.telemetry import tracer

_SPANS = "trace.span"
_ENGINE_SPANS = "trace.engine_span"
_CACHED = "trace.engine_cached_tokens"


class Trace(Step):
    name = "trace"

    def __init__(self, tracer_: Tracer | None = None) -> None:
        self._tracer = tracer_ or tracer("cluster.gateway")

    async def on_request(self, ctx: RequestContext) -> None:
        parent = propagate.extract(dict(ctx.headers))
        span = self._tracer.start_span(f"gateway.{ctx.kind}", context=parent, kind=trace.SpanKind.SERVER)
        span.set_attribute("request.id", ctx.request_id)
        ctx.extras[_SPANS] = span
        # Current for the rest of this request's task (and the tasks it starts, e.g. the
        # streamed body): every request runs in a task of its own, whose context copy
        # ends with it, so there is nothing to detach.
        otel_context.attach(trace.set_span_in_context(span, parent))

    def on_chunk(self, ctx: RequestContext, chunk: dict) -> None:  # type: ignore[type-arg]
        cached = engine_cached_tokens(chunk)
        if cached is not None:
            ctx.extras[_CACHED] = cached

    def on_finish(self, ctx: RequestContext) -> None:
        span: Span | None = ctx.extras.pop(_SPANS, None)
        if span is None:
            return
        attributes: dict[str, str | int] = {
            "tenant": ctx.tenant,
            "prompt_tokens": len(ctx.prompt_ids),
            "attempts": ctx.attempts,
            "outcome": ctx.outcome,
            "http.status_code": ctx.status,
            "completion.chunks": ctx.reply.chunks,
        }
        if ctx.reply.completion_tokens is not None:
            attributes["completion_tokens"] = ctx.reply.completion_tokens
        if ctx.error_code:
            attributes["error.code"] = ctx.error_code
        if ctx.pool:
            attributes["pool"] = ctx.pool
        if ctx.spilled_from:
            attributes["pool.spilled_from"] = ctx.spilled_from
        if ctx.session_id:
            attributes["session.id"] = ctx.session_id
        attributes.update(_routing_attributes(ctx))
        span.set_attributes(attributes)
        if ctx.outcome == "error":
            span.set_status(trace.Status(trace.StatusCode.ERROR))
        span.end()


class TraceEngineCall(Step):
    name = "trace_engine_call"

    def __init__(self, tracer_: Tracer | None = None) -> None:
        self._tracer = tracer_ or tracer("cluster.gateway")

    async def on_request(self, ctx: RequestContext) -> None:
        parent = ctx.extras.get(_SPANS)
        parent_context = trace.set_span_in_context(parent) if parent is not None else None
        span = self._tracer.start_span(f"engine.{ctx.kind}", context=parent_context, kind=trace.SpanKind.CLIENT)
        if ctx.pool:
            span.set_attribute("pool", ctx.pool)
        ctx.extras[_ENGINE_SPANS] = span
        propagate.inject(ctx.engine_headers, context=trace.set_span_in_context(span))

    def on_finish(self, ctx: RequestContext) -> None:
        span: Span | None = ctx.extras.pop(_ENGINE_SPANS, None)
        if span is None:
            return
        span.set_attributes({"attempts": ctx.attempts, "outcome": ctx.outcome, **_routing_attributes(ctx)})
        if ctx.outcome == "error":
            span.set_status(trace.Status(trace.StatusCode.ERROR))
        span.end()


def _routing_attributes(ctx: RequestContext) -> dict[str, str | int]:
    hint = ctx.hint
    if hint is None:
        return {}
    attributes: dict[str, str | int] = {
        "replica": hint.chosen_replica or "",
        "routing.reason": hint.reason,
        "cached_tokens.predicted": hint.matched_blocks * hint.hash_block_size,
    }
    cached = ctx.extras.get(_CACHED)
    if cached is not None:
        attributes["cached_tokens.engine"] = cached
    return attributes
