"""HTTP endpoints of session resources: handler functions a gateway method can return
directly (Ray Serve's class-based ingress), and the same as a FastAPI APIRouter.

    POST   /v1/sessions        {"system_prompt"?: str, "metadata"?: {str: str}} -> 201 session
    GET    /v1/sessions/{id}   -> 200 session with its stored messages (refreshes the TTL)
    DELETE /v1/sessions/{id}   -> 200 {"id", "object": "session.deleted", "deleted": true}

Every endpoint authenticates the tenant first (401), and looks sessions up only in that
tenant's namespace (another tenant's id: 404, same as an unknown id). Errors have the
OpenAI error shape; a Redis outage is 503 with Retry-After.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from cluster.auth import TenantAuthenticator
from cluster.errors import APIError
from cluster.sessions.errors import InvalidSessionRequest
from cluster.sessions.flow import SessionFlow
from cluster.sessions.store import SessionSnapshot

MAX_METADATA_KEYS = 16
MAX_METADATA_VALUE = 512
MAX_SYSTEM_PROMPT_CHARS = 200_000


def _resolve(obj: Any) -> Any:
    return obj() if callable(obj) and not isinstance(obj, SessionFlow | TenantAuthenticator) else obj


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def session_body(snap: SessionSnapshot, *, with_messages: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": snap.session_id,
        "object": "session",
        "created_at": snap.created_at_ms // 1000,
        "updated_at": snap.updated_at_ms // 1000,
        "expires_in_s": max(0, snap.expires_in_ms) // 1000,
        "version": snap.version,
        "turns": len(snap.turns),
        "tokens": snap.tokens,
        "dropped_turns": snap.dropped_turns,
        "metadata": snap.metadata,
    }
    if with_messages:
        body["messages"] = snap.messages()
    return body


def _parse_create(raw: Any) -> tuple[str | None, dict[str, str] | None]:
    if raw is None:
        return None, None
    if not isinstance(raw, dict):
        raise InvalidSessionRequest("request body must be a JSON object")
    unknown = set(raw) - {"system_prompt", "metadata"}
    if unknown:
        raise InvalidSessionRequest(f"unknown field(s): {', '.join(sorted(unknown))}", param=sorted(unknown)[0])
    system = raw.get("system_prompt")
    if system is not None and (not isinstance(system, str) or len(system) > MAX_SYSTEM_PROMPT_CHARS):
        raise InvalidSessionRequest(
            f"system_prompt must be a string of at most {MAX_SYSTEM_PROMPT_CHARS} characters", param="system_prompt"
        )
    metadata = raw.get("metadata")
    if metadata is not None:
        if (
            not isinstance(metadata, dict)
            or len(metadata) > MAX_METADATA_KEYS
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
            or any(len(k) > 64 or len(v) > MAX_METADATA_VALUE for k, v in metadata.items())
        ):
            raise InvalidSessionRequest(
                f"metadata must map at most {MAX_METADATA_KEYS} string keys (<= 64 chars) to strings "
                f"(<= {MAX_METADATA_VALUE} chars)",
                param="metadata",
            )
    return system or None, metadata


def _tenant(auth: TenantAuthenticator, request: Request) -> str:
    return auth.authenticate(request.headers.get("authorization"))


async def create_session(flow: SessionFlow, auth: TenantAuthenticator, request: Request) -> JSONResponse:
    """POST /v1/sessions (usable directly as the body of a gateway method)."""
    try:
        tenant = _tenant(auth, request)
        raw_body = await request.body()
        try:
            raw = json.loads(raw_body) if raw_body.strip() else None
        except ValueError:
            raise InvalidSessionRequest("request body is not valid JSON") from None
        system, metadata = _parse_create(raw)
        snap = await flow.create(tenant, system_prompt=system, metadata=metadata)
    except APIError as exc:
        return error_response(exc)
    return JSONResponse(session_body(snap, with_messages=True), status_code=201)


async def read_session(flow: SessionFlow, auth: TenantAuthenticator, session_id: str, request: Request) -> JSONResponse:
    """GET /v1/sessions/{session_id}."""
    try:
        snap = await flow.read(_tenant(auth, request), session_id)
    except APIError as exc:
        return error_response(exc)
    return JSONResponse(session_body(snap, with_messages=True))


async def delete_session(
    flow: SessionFlow, auth: TenantAuthenticator, session_id: str, request: Request
) -> JSONResponse:
    """DELETE /v1/sessions/{session_id}."""
    try:
        await flow.delete(_tenant(auth, request), session_id)
    except APIError as exc:
        return error_response(exc)
    return JSONResponse({"id": session_id, "object": "session.deleted", "deleted": True})


def build_session_router(
    flow: SessionFlow | Callable[[], SessionFlow],
    authenticator: TenantAuthenticator | Callable[[], TenantAuthenticator],
) -> APIRouter:
    """The three endpoints as an APIRouter. `flow` and `authenticator` may be objects or
    zero-argument providers (for an app built before they exist)."""
    router = APIRouter(tags=["sessions"])

    @router.post("/v1/sessions", status_code=201)
    async def _create(request: Request) -> JSONResponse:
        return await create_session(_resolve(flow), _resolve(authenticator), request)

    @router.get("/v1/sessions/{session_id}")
    async def _read(session_id: str, request: Request) -> JSONResponse:
        return await read_session(_resolve(flow), _resolve(authenticator), session_id, request)

    @router.delete("/v1/sessions/{session_id}")
    async def _delete(session_id: str, request: Request) -> JSONResponse:
        return await delete_session(_resolve(flow), _resolve(authenticator), session_id, request)

    return router


__all__ = [
    "build_session_router",
    "create_session",
    "delete_session",
    "error_response",
    "read_session",
    "session_body",
]
