"""Redis key layout of sessions, namespaced per tenant.

A session is two keys that share one Redis Cluster hash tag, so every Lua script touches
a single slot while different sessions spread over the cluster:

    {prefix}:{{tenant}:{session_id}}:meta    hash: version, timestamps, system prompt,
                                              token total, last replica, recent turn ids
    {prefix}:{{tenant}:{session_id}}:turns   list: one element per turn, oldest first

The tenant is part of every key, and the tenant comes from the authenticated API key,
never from the request: tenant A asking for B's session id reads A's (empty) namespace
and gets 404, exactly like an unknown id. Tenant names and ids are validated so neither
can smuggle ':' or '{}' into a key.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from cluster.config import TENANT_PATTERN
from cluster.sessions.errors import InvalidSessionRequest

SESSION_ID_PREFIX = "sess_"
# Server-generated ids: "sess_" + 32 url-safe characters (192 random bits).
SESSION_ID_PATTERN = r"^[A-Za-z0-9_-]{8,128}$"
_SESSION_ID_RE = re.compile(SESSION_ID_PATTERN)
_TENANT_RE = re.compile(TENANT_PATTERN)


def new_session_id() -> str:
    """An unguessable id (secrets.token_urlsafe: 192 bits from the OS CSPRNG)."""
    return SESSION_ID_PREFIX + secrets.token_urlsafe(24)


def is_valid_session_id(session_id: str) -> bool:
    return bool(_SESSION_ID_RE.fullmatch(session_id))


def check_session_id(session_id: str) -> str:
    """The id, or InvalidSessionRequest (400) naming the rule."""
    if not is_valid_session_id(session_id):
        raise InvalidSessionRequest(
            "session id must be 8-128 characters of A-Z a-z 0-9 _ - (as returned by POST /v1/sessions)",
            param="session_id",
        )
    return session_id


def is_valid_tenant(tenant: str) -> bool:
    return bool(_TENANT_RE.fullmatch(tenant))


@dataclass(frozen=True)
class SessionKeys:
    meta: str
    turns: str

    @classmethod
    def of(cls, prefix: str, tenant: str, session_id: str) -> SessionKeys:
        if not is_valid_tenant(tenant):
            raise ValueError(f"invalid tenant name {tenant!r}")
        check_session_id(session_id)
        tag = "{" + tenant + ":" + session_id + "}"
        return cls(meta=f"{prefix}:{tag}:meta", turns=f"{prefix}:{tag}:turns")

    def as_list(self) -> list[str]:
        return [self.meta, self.turns]


__all__ = ["SESSION_ID_PATTERN", "SessionKeys", "is_valid_session_id", "is_valid_tenant", "new_session_id"]
