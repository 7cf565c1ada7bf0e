"""What the gateway needs from the engine pools: one call that streams a reply.

`deployments.engine_client.ServeEngineClient` implements it on Ray Serve deployment
handles; unit tests use fakes. Ray-free, so the steps stay testable alone.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

from cluster.errors import APIError
from cluster.gateway.context import EngineChunk, RequestKind


class EngineClient(Protocol):
    def generate(
        self,
        pool: str,
        kind: RequestKind,
        body: Any,
        *,
        session_id: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> AsyncIterator[EngineChunk]:
        """The reply of `pool`'s engines to `body`: stream chunks, or one `whole` chunk for a
        non-streamed request. `headers` reach the engine as the request's HTTP headers
        (vLLM reads the W3C `traceparent` there). Raises `EngineError` for an error the engine answered and
        `EngineUnavailable` when no replica could be reached or one failed mid-request."""
        ...


class EngineError(APIError):
    """An error answered by the engine (vLLM's own validation, e.g. a bad parameter)."""

    def __init__(self, status: int, message: str, *, type: str | None = None) -> None:
        kind = type or ("invalid_request_error" if status < 500 else "server_error")
        super().__init__(status, message, type=kind, code="engine_error")


class EngineUnavailable(APIError):
    """The engine replica failed, died or could not be reached: never a 500."""

    def __init__(self, message: str, *, retry_after_s: int = 2) -> None:
        super().__init__(
            503,
            f"the engine could not serve this request: {message}; retry it",
            type="server_error",
            code="engine_unavailable",
            headers={"Retry-After": str(retry_after_s)},
        )


__all__ = ["EngineClient", "EngineError", "EngineUnavailable"]
