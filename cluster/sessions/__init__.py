"""Redis-backed conversation state: stateful multi-turn chat, replica affinity, tenant
isolation and no lost turns. Start at flow.py (what the gateway calls); the data model is
in keys.py and store.py, the truncation rule in truncation.py."""

from cluster.sessions.errors import (
    InvalidSessionRequest,
    SessionConflict,
    SessionError,
    SessionNotFound,
    SessionsDisabled,
    SessionStoreUnavailable,
)
from cluster.sessions.flow import SESSION_HEADER, PreparedTurn, SessionFlow, session_id_from_request
from cluster.sessions.reply import ReplyAccumulator, reply_from_completion
from cluster.sessions.store import CommitResult, SessionSnapshot, SessionStore, StoredTurn
from cluster.sessions.truncation import TruncationPolicy

__all__ = [
    "CommitResult",
    "InvalidSessionRequest",
    "PreparedTurn",
    "ReplyAccumulator",
    "SESSION_HEADER",
    "SessionConflict",
    "SessionError",
    "SessionFlow",
    "SessionNotFound",
    "SessionSnapshot",
    "SessionStore",
    "SessionStoreUnavailable",
    "SessionsDisabled",
    "StoredTurn",
    "TruncationPolicy",
    "reply_from_completion",
    "session_id_from_request",
]
