"""Typed session errors: `cluster.errors.APIError`s with their status, type and code
declared per class, so the gateway answers them like every other refusal, with an
OpenAI-shaped body (`{"error": {"message", "type", "param", "code"}}`)."""

from __future__ import annotations

from cluster.errors import APIError


class SessionError(APIError):
    """Base of everything cluster.sessions raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message=message)


class InvalidSessionRequest(SessionError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_session_request"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class SessionsDisabled(SessionError):
    status = 400
    type = "invalid_request_error"
    code = "sessions_disabled"

    def __init__(self) -> None:
        super().__init__(
            "this deployment runs without session state (sessions.enabled is false); send the full history"
        )


class SessionNotFound(SessionError):
    """Unknown, expired, deleted, or another tenant's session: one answer for all four, so
    the response never tells a tenant whether someone else's id exists."""

    status = 404
    type = "invalid_request_error"
    code = "session_not_found"
    param = "session_id"

    def __init__(self, session_id: str) -> None:
        super().__init__(
            f"session {session_id!r} not found: it never existed, expired after its TTL, or was deleted; "
            "create a new one with POST /v1/sessions"
        )
        self.session_id = session_id


class SessionConflict(SessionError):
    """Optimistic concurrency: another turn of the same session was committed between this
    turn's read and its commit. This turn was not stored; the client may resend it."""

    status = 409
    type = "invalid_request_error"
    code = "session_conflict"
    param = "session_id"

    def __init__(self, session_id: str, expected_version: int, current_version: int) -> None:
        super().__init__(
            f"session {session_id!r} changed while this turn was generated (read version {expected_version}, "
            f"now {current_version}): another request of the same session finished first. This turn was "
            "NOT stored; send it again (one turn at a time per session)"
        )
        self.session_id = session_id
        self.expected_version = expected_version
        self.current_version = current_version


class SessionStoreUnavailable(SessionError):
    """Redis cannot be reached (or is loading, read-only, out of memory). Stateless requests
    are unaffected; session requests should be retried after `retry_after_s`."""

    status = 503
    type = "server_error"
    code = "session_store_unavailable"

    def __init__(self, reason: str, *, retry_after_s: int) -> None:
        super().__init__(
            f"session store (Redis) unavailable: {reason}. Requests without a session id are still served; "
            f"retry this one in {retry_after_s} s"
        )
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


__all__ = [
    "InvalidSessionRequest",
    "SessionConflict",
    "SessionError",
    "SessionNotFound",
    "SessionStoreUnavailable",
    "SessionsDisabled",
]
