"""One stateful chat turn: prepare (history + new messages) -> generate -> commit.

The gateway's session step (cluster.gateway.steps.session) is the caller:

    sid = session_id_from_request(headers, body)         # None: a stateless request
    prepared = await flow.prepare(tenant, sid, body.messages)
    body.messages = prepared.messages                     # stored history + new turn
    ... generate on the pool the router picks ...
    await flow.commit(prepared, reply_message, replica_id=chosen_replica, reply_tokens=n)

What a turn stores: the request's new messages (user message, tool results; a leading
system message replaces the stored system prompt when it differs) plus the assistant
reply (content and tool calls), as ONE element appended atomically with a version check.
A streamed reply is committed when, and only when, the stream reached its end with a
complete reply (a finish reason, no error event), just before `[DONE]`; a client that
disconnects earlier, or an engine error mid-stream, stores nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from cluster.config import ClusterConfig
from cluster.sessions.errors import InvalidSessionRequest, SessionsDisabled
from cluster.sessions.keys import check_session_id
from cluster.sessions.messages import (
    Message,
    TokenCounter,
    approx_tokens,
    normalize_message,
    normalize_messages,
    split_leading_system,
)
from cluster.sessions.store import CommitResult, SessionSnapshot, SessionStore, StoredTurn, new_turn_id
from cluster.telemetry import tracer

log = logging.getLogger(__name__)
_tracer = tracer("cluster.sessions")

SESSION_HEADER = "X-Session-ID"
SESSION_BODY_FIELD = "session_id"


def session_id_from_request(headers: Mapping[str, str], body: Any) -> str | None:
    """The session id of a request: header `X-Session-ID` or body field `session_id`
    (popped from a dict body). `body` may also be a pydantic request: vLLM 0.29's
    ChatCompletionRequest declares `session_id` itself (a stable conversation identity it
    passes to the engine, harmless to keep), other models keep it in `model_extra`.
    None: a stateless request."""
    header = _header(headers, SESSION_HEADER)
    field: Any = None
    if isinstance(body, dict):
        field = body.pop(SESSION_BODY_FIELD, None)
    elif body is not None:
        extra = getattr(body, "model_extra", None)
        if isinstance(extra, dict) and SESSION_BODY_FIELD in extra:
            field = extra.pop(SESSION_BODY_FIELD)
        else:
            field = getattr(body, SESSION_BODY_FIELD, None)
    if field is not None and not isinstance(field, str):
        raise InvalidSessionRequest("session_id must be a string", param=SESSION_BODY_FIELD)
    header = header.strip() if header else None
    field = field.strip() if field else None
    if header and field and header != field:
        raise InvalidSessionRequest(
            f"the {SESSION_HEADER} header and the body's session_id name different sessions", param="session_id"
        )
    sid = header or field
    return check_session_id(sid) if sid else None


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        value = headers.get(name.lower())
    if value is None:  # a plain dict with other casing
        lname = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == lname), None)
    return value


@dataclass(frozen=True)
class PreparedTurn:
    tenant: str
    session_id: str
    version: int  # the session version this turn was built on
    turn_id: str  # makes the commit idempotent under retries
    messages: list[Message]  # send these to the engine: system + stored history + new messages
    new_messages: list[Message]  # stored with the reply at commit
    system_update: list[Message] | None  # a new system prompt, stored at commit
    affinity_replica: str | None  # replica that served the previous turn (router hint)
    history_messages: int
    history_tokens: int


class SessionFlow:
    """prepare -> generate -> commit for one turn. `store=None` means sessions are off:
    every session request is refused with 400, stateless requests never touch this."""

    def __init__(self, store: SessionStore | None, *, token_counter: TokenCounter = approx_tokens) -> None:
        self.store = store
        self.count_tokens = token_counter

    @classmethod
    def from_config(
        cls, cfg: ClusterConfig, *, redis: Redis | None = None, token_counter: TokenCounter = approx_tokens
    ) -> SessionFlow:
        if not cfg.sessions.enabled:
            return cls(None, token_counter=token_counter)
        return cls(SessionStore.from_config(cfg, redis=redis), token_counter=token_counter)

    @property
    def enabled(self) -> bool:
        return self.store is not None

    def _store(self) -> SessionStore:
        if self.store is None:
            raise SessionsDisabled()
        return self.store

    # -- the turn --------------------------------------------------------------------

    async def prepare(self, tenant: str, session_id: str, new_messages: Sequence[Any]) -> PreparedTurn:
        """Load the session (refreshing its TTL) and build the prompt: stored system prompt
        (or the request's new one), stored history, then the request's new messages."""
        with _tracer.start_as_current_span("session.prepare") as span:
            prepared = await self._prepare(tenant, session_id, new_messages)
            span.set_attribute("session.version", prepared.version)
            span.set_attribute("session.history_messages", prepared.history_messages)
            span.set_attribute("session.history_tokens", prepared.history_tokens)
            return prepared

    async def _prepare(self, tenant: str, session_id: str, new_messages: Sequence[Any]) -> PreparedTurn:
        store = self._store()
        incoming = normalize_messages(new_messages)
        system_new, rest = split_leading_system(incoming)
        if not rest:
            raise InvalidSessionRequest(
                "a session turn needs at least one new message besides the system prompt (send only the new "
                "user message or tool results; the stored history is prepended)",
                param="messages",
            )
        snap = await store.read(tenant, session_id)
        system_update = system_new if system_new and system_new != snap.system else None
        system = system_update if system_update is not None else snap.system
        history = _drop_orphan_tool_results(snap.history())
        return PreparedTurn(
            tenant=tenant,
            session_id=session_id,
            version=snap.version,
            turn_id=new_turn_id(),
            messages=system + history + rest,
            new_messages=rest,
            system_update=system_update,
            affinity_replica=snap.last_replica,
            history_messages=len(history),
            history_tokens=snap.tokens,
        )

    async def commit(
        self,
        prepared: PreparedTurn,
        reply: Any,
        *,
        replica_id: str | None = None,
        reply_tokens: int | None = None,
    ) -> CommitResult:
        """Store the turn (new messages + assistant reply) iff the session is still at the
        prepared version: SessionConflict (409) otherwise, SessionStoreUnavailable (503)
        when Redis is down. Safe to call again with the same `prepared` after a 503."""
        with _tracer.start_as_current_span("session.commit") as span:
            span.set_attribute("session.version", prepared.version)
            result = await self._commit(prepared, reply, replica_id=replica_id, reply_tokens=reply_tokens)
            span.set_attribute("session.dropped_turns", result.dropped_turns)
            return result

    async def _commit(
        self, prepared: PreparedTurn, reply: Any, *, replica_id: str | None, reply_tokens: int | None
    ) -> CommitResult:
        store = self._store()
        replies = reply if isinstance(reply, list) else [reply]
        reply_msgs = [normalize_message(r, where="reply") for r in replies]
        if reply_tokens is None:
            tokens = self.count_tokens(prepared.new_messages + reply_msgs)
        else:
            tokens = self.count_tokens(prepared.new_messages) + int(reply_tokens)
        system_tokens = self.count_tokens(prepared.system_update) if prepared.system_update else 0
        return await store.append_turn(
            prepared.tenant,
            prepared.session_id,
            StoredTurn.of(prepared.new_messages + reply_msgs, tokens),
            expected_version=prepared.version,
            turn_id=prepared.turn_id,
            replica=replica_id,
            system=prepared.system_update,
            system_tokens=system_tokens,
        )

    # -- session resources (the /v1/sessions endpoints) --------------------------------

    async def create(
        self, tenant: str, *, system_prompt: str | None = None, metadata: dict[str, str] | None = None
    ) -> SessionSnapshot:
        system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        return await self._store().create(
            tenant, system=system, system_tokens=self.count_tokens(system) if system else 0, metadata=metadata
        )

    async def read(self, tenant: str, session_id: str) -> SessionSnapshot:
        return await self._store().read(tenant, session_id)

    async def delete(self, tenant: str, session_id: str) -> None:
        await self._store().delete(tenant, session_id)

    async def aclose(self) -> None:
        if self.store is not None:
            await self.store.aclose()


def _drop_orphan_tool_results(history: list[Message]) -> list[Message]:
    """Truncation cuts at user turns when it can; if it could not, leading tool results
    whose call was dropped are not sent (the template rejects them)."""
    i = 0
    while i < len(history) and history[i]["role"] == "tool":
        i += 1
    return history[i:]


__all__ = ["PreparedTurn", "SESSION_BODY_FIELD", "SESSION_HEADER", "SessionFlow", "session_id_from_request"]
