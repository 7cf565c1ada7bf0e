"""Step 0b: the gateway's metrics of each request (cluster.gateway.metrics), as the client
sees it: status, time to first token and between tokens (streamed replies), time in the
gateway until a replica was assigned, tokens, the router's reason and its predicted
cached prefix against the engine's reported one, spills, the session's outcome.

Runs second (after trace) so that its `on_finish` sees every request, refused ones too.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cluster.gateway.context import RequestContext
from cluster.gateway.metrics import GatewayMetrics
from cluster.gateway.pipeline import Step

_STATE = "measure"

# Error codes of the session step's refusals (cluster.sessions.errors) -> outcome label.
_SESSION_CODES = {
    "session_conflict": "conflict",
    "session_store_unavailable": "store_down",
    "session_not_found": "not_found",
}


@dataclass
class _Timing:
    first_token_at: float | None = None
    last_token_at: float | None = None
    token_chunks: int = 0
    engine_cached_tokens: int | None = None


def _has_tokens(chunk: Mapping[str, Any]) -> bool:
    for choice in chunk.get("choices") or []:
        if choice.get("text"):
            return True
        delta = choice.get("delta") or {}
        if delta.get("content") or delta.get("tool_calls") or delta.get("reasoning_content"):
            return True
    return False


def engine_cached_tokens(chunk: Mapping[str, Any]) -> int | None:
    """`usage.prompt_tokens_details.cached_tokens` where the engine reports it (vLLM with
    enable_prompt_tokens_details; streamed replies only with stream_options.include_usage)."""
    usage = chunk.get("usage")
    if not isinstance(usage, Mapping):
        return None
    details = usage.get("prompt_tokens_details")
    if not isinstance(details, Mapping) or details.get("cached_tokens") is None:
        return None
    return int(details["cached_tokens"])


class Measure(Step):
    name = "measure"

    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics

    async def on_request(self, ctx: RequestContext) -> None:
        ctx.extras[_STATE] = _Timing()

    def on_chunk(self, ctx: RequestContext, chunk: dict[str, Any]) -> None:
        timing: _Timing = ctx.extras[_STATE]
        cached = engine_cached_tokens(chunk)
        if cached is not None:
            timing.engine_cached_tokens = cached
        if not ctx.stream or not _has_tokens(chunk):
            return
        now = time.monotonic()
        pool, tenant = self.metrics.pool(ctx), self.metrics.tenant(ctx)
        if timing.last_token_at is None:
            timing.first_token_at = now
            self.metrics.ttft.labels(pool, tenant).observe(now - ctx.started_at)
        else:
            self.metrics.itl.labels(pool, tenant).observe(now - timing.last_token_at)
        timing.last_token_at = now
        timing.token_chunks += 1

    def on_finish(self, ctx: RequestContext) -> None:
        m = self.metrics
        timing: _Timing = ctx.extras.pop(_STATE, None) or _Timing()
        pool, tenant = m.pool(ctx), m.tenant(ctx)
        status = ctx.status or (499 if ctx.outcome == "cancelled" else 500)
        m.requests.labels(pool, tenant, ctx.kind, str(status), ctx.outcome).inc()
        m.duration.labels(pool, tenant).observe(time.monotonic() - ctx.started_at)
        if ctx.spilled_from and ctx.pool:
            m.spills.labels(ctx.spilled_from, pool).inc()
        if ctx.error_code == RATE_LIMITED:
            m.rate_limit_refusal(ctx)
        elif ctx.error_code in SHED:
            m.shed_request(ctx)
        hint = ctx.hint
        if hint is not None and hint.chosen_replica is not None:
            if hint.reason:
                m.routing.labels(pool, hint.reason).inc()
            if hint.routed_at is not None:
                m.queue.labels(pool, tenant).observe(max(0.0, hint.routed_at - ctx.started_at))
            if timing.engine_cached_tokens is not None:
                predicted = hint.matched_blocks * hint.hash_block_size
                m.cached_tokens.labels(pool, tenant, "predicted").inc(predicted)
                m.cached_tokens.labels(pool, tenant, "engine").inc(timing.engine_cached_tokens)
        if ctx.reply.chunks:  # the engine processed it
            m.prompt_tokens.labels(pool, tenant).inc(len(ctx.prompt_ids))
            completion = ctx.reply.completion_tokens
            m.completion_tokens.labels(pool, tenant).inc(completion if completion is not None else timing.token_chunks)
        if ctx.session_id is not None:
            m.sessions.labels(tenant, session_outcome(ctx)).inc()


# Refusal codes of the admit and fair_share steps.
RATE_LIMITED = "rate_limit_exceeded"
SHED = ("overloaded", "queue_timeout")


def session_outcome(ctx: RequestContext) -> str:
    outcome = _SESSION_CODES.get(ctx.error_code or "")
    if outcome is not None:
        return outcome
    stored = ctx.session is not None and ctx.outcome == "ok" and ctx.reply.complete
    return "stored" if stored else "not_stored"
