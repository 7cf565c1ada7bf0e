"""What the gateway knows about one request, as it flows through the pipeline's steps.

Each step reads what earlier steps wrote and adds its own part; nothing else carries
per-request state. Fields are filled in pipeline order (see `cluster.gateway.pipeline`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from cluster.routing.hints import RoutingHint
from cluster.sessions.flow import PreparedTurn
from cluster.sessions.reply import ReplyAccumulator

RequestKind = Literal["chat", "completions"]


@dataclass(frozen=True)
class EngineChunk:
    """One item of an engine's reply: a stream chunk, or (`whole`) a non-streamed response."""

    data: dict[str, Any]
    whole: bool = False


@dataclass
class RequestContext:
    kind: RequestKind
    body: Any  # the OpenAI request model (vLLM's ChatCompletionRequest / CompletionRequest)
    headers: Mapping[str, str]
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started_at: float = field(default_factory=time.monotonic)
    # authenticate
    tenant: str = ""
    # session
    session_id: str | None = None
    session: PreparedTurn | None = None
    # tokenize: the prompt the router hashes (choice 0's), and what the pool must hold
    prompt_ids: list[int] = field(default_factory=list)
    select_tokens: int = 0
    max_tokens: int | None = None
    # choose pool
    pool: str | None = None
    spilled_from: str | None = None
    # route: the hint the pool's router reads, posted under `engine_request_id` (the id the
    # engine sees; a retry or migration posts a new hint under a new id)
    hint: RoutingHint | None = None
    engine_request_id: str = ""
    # dispatch
    # dispatch: `engine_headers` travel to the engine with the request (the trace step's
    # traceparent, which vLLM's request span continues)
    engine_headers: dict[str, str] = field(default_factory=dict)
    attempts: int = 0
    migrations: int = 0
    upstream: AsyncIterator[EngineChunk] | None = None
    whole: dict[str, Any] | None = None  # the non-streamed response
    # stream back / commit
    reply: ReplyAccumulator = field(default_factory=ReplyAccumulator)
    response_headers: dict[str, str] = field(default_factory=dict)
    # finish: "ok" (reply complete), "error" (refused or failed), "cancelled" (client left);
    # `status` is the HTTP status the client got (a stream that failed midway still got
    # 200) and `error_code` the OpenAI error code of a refusal or in-band error, if any.
    outcome: str = "pending"
    status: int = 0
    error_code: str | None = None
    # A step's private per-request state, under a key the step owns (e.g. its span).
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def stream(self) -> bool:
        return bool(getattr(self.body, "stream", False))

    @property
    def replica(self) -> str | None:
        """The engine replica the router chose (known once the engine answered)."""
        return self.hint.chosen_replica if self.hint is not None else None

    def header(self, name: str) -> str | None:
        value = self.headers.get(name)
        if value is None:
            lname = name.lower()
            value = next((v for k, v in self.headers.items() if k.lower() == lname), None)
        return value


__all__ = ["EngineChunk", "RequestContext", "RequestKind"]
