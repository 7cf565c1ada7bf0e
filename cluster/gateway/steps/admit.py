"""Step: the tenant's request caps (400) and rate limits (429), after tokenize (the
prompt's tokens are known) and before a pool is chosen.

Caps: `n`, `max_tokens` (a default is filled in when the request sets none), prompt
tokens. Limits: requests/min, tokens/min and concurrency in Redis across all gateway
replicas (cluster.admission.limiter): prompt + max_tokens x n is reserved now and
corrected with the real usage when the request ends, when the tenant's usage of the day
is also counted. Every response after this step carries the x-ratelimit-* headers of the
tenant's limits; a refusal is 429 with Retry-After and an OpenAI error body.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from cluster import errors
from cluster.admission.headers import rate_limit_headers, retry_after
from cluster.admission.limiter import Decision, TenantLimiter, Ticket
from cluster.config import PRIORITY_ORDER, AdmissionConfig, PriorityClass, TenantLimits
from cluster.gateway.context import RequestContext
from cluster.gateway.pipeline import Step

log = logging.getLogger(__name__)

PRIORITY_HEADER = "X-Priority"
_TICKET = "admit.ticket"
_USAGE = "admit.usage"
PRIORITY = "admit.priority"  # read by the fair_share step


class RateLimited(errors.APIError):
    def __init__(self, decision: Decision, message: str) -> None:
        kind = "tokens" if decision.reason in ("tokens", "too_large") else "requests"
        headers = {**rate_limit_headers(decision), "Retry-After": retry_after(decision)}
        super().__init__(429, message, type=kind, code="rate_limit_exceeded", headers=headers)


def refusal_message(d: Decision, cost: int, tenant: str) -> str:
    wait = f"Please try again in {retry_after(d)}s."
    if d.reason == "requests":
        return f"Rate limit reached for {tenant} on requests per minute (RPM): Limit {d.requests_limit}. {wait}"
    if d.reason == "tokens":
        return (
            f"Rate limit reached for {tenant} on tokens per minute (TPM): Limit {d.tokens_limit}, "
            f"Remaining {d.tokens_left}, Requested {cost}. {wait}"
        )
    if d.reason == "too_large":
        return (
            f"Request too large for {tenant} on tokens per minute (TPM): Limit {d.tokens_limit}, Requested {cost} "
            "(prompt + max_tokens x n). Lower max_tokens, n or the prompt."
        )
    return f"Too many concurrent requests for {tenant}. {wait}"


def request_priority(ctx: RequestContext, limits: TenantLimits) -> PriorityClass:
    asked = ctx.header(PRIORITY_HEADER)
    if asked is None:
        return limits.priority
    value = asked.strip().lower()
    if value not in PRIORITY_ORDER or value not in limits.allowed_priorities:
        raise errors.bad_request(
            f"{PRIORITY_HEADER} {asked!r} is not allowed for this tenant; "
            f"allowed: {', '.join(limits.allowed_priorities)}",
            param=PRIORITY_HEADER,
            code="invalid_priority",
        )
    return value  # type: ignore[return-value]


def _prompt_count(ctx: RequestContext) -> int:
    if ctx.kind == "chat":
        return 1
    raw: Any = ctx.body.prompt
    return len(raw) if isinstance(raw, list) and raw and not isinstance(raw[0], int) else 1


class Admit(Step):
    name = "admit"

    def __init__(self, cfg: AdmissionConfig, limiter: TenantLimiter, max_context: int) -> None:
        self.cfg = cfg
        self.limiter = limiter
        self.max_context = max_context
        self._background: set[asyncio.Task[Any]] = set()

    async def on_request(self, ctx: RequestContext) -> None:
        if not self.cfg.enabled:
            return
        limits = self.cfg.limits(ctx.tenant)
        body = ctx.body
        ctx.extras[PRIORITY] = request_priority(ctx, limits)
        n = int(getattr(body, "n", None) or 1)
        if n > limits.max_n:
            raise errors.bad_request(f"n is {n}; at most {limits.max_n} choices per request", param="n")
        if ctx.max_tokens is None and limits.max_tokens_default is not None:
            ctx.max_tokens = body.max_tokens = limits.max_tokens_default
        if limits.max_tokens_cap is not None and ctx.max_tokens is not None and ctx.max_tokens > limits.max_tokens_cap:
            param = (
                "max_completion_tokens" if getattr(body, "max_completion_tokens", None) is not None else "max_tokens"
            )
            raise errors.bad_request(
                f"{param} is {ctx.max_tokens}; at most {limits.max_tokens_cap} per request", param=param
            )
        if limits.max_prompt_tokens is not None and ctx.select_tokens > limits.max_prompt_tokens:
            raise errors.bad_request(
                f"the prompt has {ctx.select_tokens} tokens; at most {limits.max_prompt_tokens} per request",
                param="messages" if ctx.kind == "chat" else "prompt",
                code="context_length_exceeded",
            )
        prompts = _prompt_count(ctx)
        # Without max_tokens the reply may fill the largest context: reserve that much.
        reply = ctx.max_tokens if ctx.max_tokens is not None else max(0, self.max_context - ctx.select_tokens)
        prompt_tokens = ctx.select_tokens * prompts
        cost = prompt_tokens + reply * n * prompts
        decision, ticket = await self.limiter.admit(ctx.tenant, limits, cost)
        ctx.response_headers.update(rate_limit_headers(decision))
        if ticket is None:
            raise RateLimited(decision, refusal_message(decision, cost, ctx.tenant))
        ctx.extras[_TICKET] = ticket
        ctx.extras[_USAGE] = {"prompt": prompt_tokens, "completion": 0, "cached": 0, "reported": False}

    def on_chunk(self, ctx: RequestContext, chunk: dict[str, Any]) -> None:
        usage = ctx.extras.get(_USAGE)
        if usage is None:
            return
        reported = chunk.get("usage")
        if isinstance(reported, dict) and reported.get("completion_tokens") is not None:
            usage["prompt"] = int(reported.get("prompt_tokens") or usage["prompt"])
            usage["completion"] = int(reported["completion_tokens"])
            details = reported.get("prompt_tokens_details") or {}
            usage["cached"] = int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0
            usage["reported"] = True
        elif not usage["reported"]:
            # A stream without usage: each chunk with content carries about one token.
            usage["completion"] += sum(
                1 for c in chunk.get("choices") or () if (c.get("delta") or {}).get("content") or c.get("text")
            )

    def on_finish(self, ctx: RequestContext) -> None:
        ticket: Ticket | None = ctx.extras.pop(_TICKET, None)
        if ticket is None:
            return
        usage = ctx.extras.pop(_USAGE)
        if ctx.reply.chunks == 0:  # refused downstream or failed before the engine answered
            usage["prompt"] = usage["completion"] = usage["cached"] = 0
        used = usage["prompt"] + usage["completion"]
        release = self.limiter.release(
            ticket, used=used, prompt=usage["prompt"], completion=usage["completion"], cached=usage["cached"]
        )
        try:
            task = asyncio.get_running_loop().create_task(release)
        except RuntimeError:
            release.close()
            return
        self._background.add(task)
        task.add_done_callback(self._background.discard)


__all__ = ["Admit", "PRIORITY_HEADER", "RateLimited", "request_priority"]
