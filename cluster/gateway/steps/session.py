"""Step 3: a chat request with a session id gets its stored history prepended (before
tokenizing, so tokens, pool and prefix hashes cover the whole conversation) and its turn
committed once the reply is complete (streamed: just before `[DONE]`). Requests without a
session id never touch Redis. Sessions are a chat feature: a completion naming one is 400.
"""

from __future__ import annotations

from cluster import errors
from cluster.gateway.context import RequestContext
from cluster.gateway.pipeline import Step
from cluster.sessions import SessionFlow, session_id_from_request


class Session(Step):
    name = "session"

    def __init__(self, flow: SessionFlow) -> None:
        self.flow = flow

    async def on_request(self, ctx: RequestContext) -> None:
        if ctx.kind != "chat":
            if session_id_from_request(ctx.headers, None):
                raise errors.bad_request(
                    "sessions apply to /v1/chat/completions only; drop the X-Session-ID header for /v1/completions",
                    param="session_id",
                )
            return
        ctx.session_id = session_id_from_request(ctx.headers, ctx.body)
        if ctx.session_id is None:
            return
        ctx.session = await self.flow.prepare(ctx.tenant, ctx.session_id, ctx.body.messages)
        ctx.body.messages = ctx.session.messages

    async def on_complete(self, ctx: RequestContext) -> None:
        """Store the turn. A 409 (another turn of this session won) or 503 (Redis down)
        means the reply is not stored, so it is not acknowledged either: a whole reply is
        answered with that error, a stream ends with it as an error event."""
        if ctx.session is None or not ctx.reply.complete:
            return
        await self.flow.commit(
            ctx.session, ctx.reply.message(), replica_id=ctx.replica, reply_tokens=ctx.reply.completion_tokens
        )
