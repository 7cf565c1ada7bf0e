"""SessionStore: conversation state in Redis, one atomic Lua script per operation.

Concurrency rule (optimistic): every session has a version, incremented by each stored
turn. A turn reads the session (version v), generates, then commits with "expected
version v"; the commit script appends only if the version is still v, else the turn is
refused with `SessionConflict` (HTTP 409) and nothing of it is stored. So two racing
turns of one session never interleave or lose messages: one wins, the other learns it
lost and may resend. `append_turn(..., expected_version=None)` is the unconditional
atomic append (the script appends whole turns, so concurrent appends never lose or split
a turn either; their order is Redis's arrival order).

Retries are safe: every commit carries a turn id, the session remembers its last
`remembered_turn_ids` ids, and a commit whose id is already stored (a retry after a lost
reply) returns success without appending again.

Durability (Redis replication is asynchronous): with `replicas_to_ack` > 0 every commit
is followed, on the same connection, by `WAIT replicas_to_ack replica_timeout_ms`; the turn
is acknowledged only when that many replicas have it, so a Sentinel failover (which promotes
the replica with the most replicated data) keeps it. Fewer acks in time -> 503: the turn is
on the master but not acknowledged; a retried commit with the same turn id re-waits without
appending again. With 0, a failover loses the turns of the last replication lag.

Every read and commit refreshes the TTL of both keys (sessions expire `ttl_s` after their
last use). Commits apply the truncation rule of cluster.sessions.truncation atomically.
Redis failures become `SessionStoreUnavailable` (HTTP 503 with Retry-After).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from redis import exceptions as rx
from redis.asyncio import Redis

from cluster.config import ClusterConfig, SessionConfig
from cluster.sessions import scripts
from cluster.sessions.connection import build_redis
from cluster.sessions.errors import (
    SessionConflict,
    SessionNotFound,
    SessionStoreUnavailable,
)
from cluster.sessions.keys import SessionKeys, new_session_id
from cluster.sessions.messages import Message, canonical_json
from cluster.sessions.truncation import TruncationPolicy

log = logging.getLogger(__name__)

# Errors meaning "the store cannot serve now" (-> 503), as opposed to bugs.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    rx.ConnectionError,  # includes BusyLoadingError (AOF/RDB loading after a restart), auth errors
    rx.TimeoutError,
    rx.ReadOnlyError,  # a replica after failover
    rx.OutOfMemoryError,
    rx.ClusterDownError,
    rx.TryAgainError,
    OSError,
    asyncio.TimeoutError,
)


@dataclass(frozen=True)
class StoredTurn:
    messages: list[Message]
    tokens: int
    starts_with_user: bool

    def encode(self) -> str:
        return f"{self.tokens}|{'u' if self.starts_with_user else 'x'}|{canonical_json(self.messages)}"

    @classmethod
    def decode(cls, element: str) -> StoredTurn:
        tokens, flag, payload = element.split("|", 2)
        return cls(messages=json.loads(payload), tokens=int(tokens), starts_with_user=flag == "u")

    @classmethod
    def of(cls, messages: Sequence[Message], tokens: int) -> StoredTurn:
        msgs = list(messages)
        return cls(messages=msgs, tokens=max(0, int(tokens)), starts_with_user=bool(msgs) and msgs[0]["role"] == "user")


@dataclass(frozen=True)
class SessionSnapshot:
    tenant: str
    session_id: str
    version: int
    created_at_ms: int
    updated_at_ms: int
    expires_in_ms: int
    system: list[Message]
    system_tokens: int
    turns: list[StoredTurn]
    last_replica: str | None
    dropped_turns: int
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return self.system_tokens + sum(t.tokens for t in self.turns)

    def history(self) -> list[Message]:
        """The stored turns' messages, oldest first (no system prompt)."""
        return [m for t in self.turns for m in t.messages]

    def messages(self) -> list[Message]:
        return self.system + self.history()


@dataclass(frozen=True)
class CommitResult:
    version: int
    dropped_turns: int  # dropped by truncation in this commit
    turns: int
    tokens: int
    duplicate: bool = False  # a retried commit that had already been stored


class SessionStore:
    def __init__(
        self,
        redis: Redis,
        *,
        ttl_s: float,
        policy: TruncationPolicy,
        prefix: str = "mls",
        retry_after_s: int = 5,
        remembered_turn_ids: int = 32,
        replicas_to_ack: int = 0,
        replica_timeout_ms: int = 1000,
    ) -> None:
        self.redis = redis
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.policy = policy
        self.prefix = prefix
        self.retry_after_s = retry_after_s
        self.remembered_turn_ids = remembered_turn_ids
        self.replicas_to_ack = replicas_to_ack
        self.replica_timeout_ms = replica_timeout_ms
        self._read = redis.register_script(scripts.READ)
        self._create = redis.register_script(scripts.CREATE)
        self._commit = redis.register_script(scripts.COMMIT)
        self._delete = redis.register_script(scripts.DELETE)
        self._available = True

    @classmethod
    def from_config(cls, cfg: ClusterConfig, *, redis: Redis | None = None) -> SessionStore:
        s: SessionConfig = cfg.sessions
        max_tokens = s.max_tokens if s.max_tokens is not None else cfg.max_context // 2
        return cls(
            redis if redis is not None else build_redis(s),
            ttl_s=s.ttl_s,
            policy=TruncationPolicy(s.max_turns, max_tokens, s.truncate_to_fraction),
            prefix=s.key_prefix,
            retry_after_s=s.retry_after_s,
            replicas_to_ack=s.replicas_to_ack,
            replica_timeout_ms=s.commit_replica_timeout_ms,
        )

    # -- operations ------------------------------------------------------------------

    async def create(
        self,
        tenant: str,
        *,
        system: Sequence[Message] = (),
        system_tokens: int = 0,
        metadata: dict[str, str] | None = None,
    ) -> SessionSnapshot:
        now = _now_ms()
        system_json = canonical_json(system) if system else ""
        async with self._guard():
            for _ in range(3):  # a collision of 192-bit ids is not expected; never overwrite anyway
                sid = new_session_id()
                keys = self._keys(tenant, sid)
                created = await self._create(
                    keys=[keys.meta],
                    args=[now, self.ttl_ms, system_json, int(system_tokens), json.dumps(metadata or {})],
                )
                if int(created) == 1:
                    return SessionSnapshot(
                        tenant=tenant,
                        session_id=sid,
                        version=0,
                        created_at_ms=now,
                        updated_at_ms=now,
                        expires_in_ms=self.ttl_ms,
                        system=list(system),
                        system_tokens=int(system_tokens),
                        turns=[],
                        last_replica=None,
                        dropped_turns=0,
                        metadata=dict(metadata or {}),
                    )
        raise RuntimeError("could not allocate a session id")

    async def read(self, tenant: str, session_id: str) -> SessionSnapshot:
        """The session's state; refreshes its TTL. Raises SessionNotFound."""
        keys = self._keys(tenant, session_id)
        async with self._guard():
            raw = await self._read(keys=keys.as_list(), args=[self.ttl_ms])
        if raw is None:
            raise SessionNotFound(session_id)
        flat, elements, pttl = raw
        meta = dict(zip(flat[::2], flat[1::2], strict=True))
        return SessionSnapshot(
            tenant=tenant,
            session_id=session_id,
            version=int(meta["v"]),
            created_at_ms=int(meta["c"]),
            updated_at_ms=int(meta["u"]),
            expires_in_ms=int(pttl),
            system=json.loads(meta["s"]) if meta.get("s") else [],
            system_tokens=int(meta.get("st", 0)),
            turns=[StoredTurn.decode(e) for e in elements],
            last_replica=meta.get("r") or None,
            dropped_turns=int(meta.get("d", 0)),
            metadata=json.loads(meta["md"]) if meta.get("md") else {},
        )

    async def append_turn(
        self,
        tenant: str,
        session_id: str,
        turn: StoredTurn,
        *,
        expected_version: int | None = None,
        turn_id: str | None = None,
        replica: str | None = None,
        system: Sequence[Message] | None = None,
        system_tokens: int = 0,
    ) -> CommitResult:
        """Append one whole turn atomically (and truncate). With `expected_version`, only if
        the session is still at that version (else SessionConflict)."""
        keys = self._keys(tenant, session_id)
        p = self.policy
        args: list[Any] = [
            "" if expected_version is None else int(expected_version),
            turn_id or new_turn_id(),
            turn.encode(),
            turn.tokens,
            "u" if turn.starts_with_user else "x",
            canonical_json(system) if system else "",
            int(system_tokens),
            replica or "",
            _now_ms(),
            self.ttl_ms,
            p.max_turns,
            p.max_tokens,
            p.target_turns,
            p.target_tokens,
            self.remembered_turn_ids,
        ]
        async with self._guard():
            if self.replicas_to_ack:
                (status, version, dropped, turns, tokens), acked = await self._commit_and_wait(keys, args)
            else:
                status, version, dropped, turns, tokens = await self._commit(keys=keys.as_list(), args=args)
                acked = 0
        if status in (1, 2) and acked < self.replicas_to_ack:
            exc = SessionStoreUnavailable(
                f"turn written but confirmed by {acked} of {self.replicas_to_ack} replica(s) within "
                f"{self.replica_timeout_ms} ms; not acknowledged (a retry with the same turn id is safe)",
                retry_after_s=self.retry_after_s,
            )
            self._mark(False, exc)
            raise exc
        if status == -1:
            raise SessionNotFound(session_id)
        if status == -2:
            assert expected_version is not None
            raise SessionConflict(session_id, expected_version, int(version))
        return CommitResult(int(version), int(dropped), int(turns), int(tokens), duplicate=status == 2)

    async def _commit_and_wait(self, keys: SessionKeys, args: list[Any]) -> tuple[list[Any], int]:
        # One pipeline = one connection: WAIT counts the replicas that have this connection's writes.
        async with self.redis.pipeline(transaction=False) as pipe:
            await self._commit(keys=keys.as_list(), args=args, client=pipe)
            pipe.execute_command("WAIT", self.replicas_to_ack, self.replica_timeout_ms)
            result, acked = await pipe.execute()
        return list(result), int(acked)

    async def delete(self, tenant: str, session_id: str) -> None:
        keys = self._keys(tenant, session_id)
        async with self._guard():
            removed = await self._delete(keys=keys.as_list())
        if int(removed) == 0:
            raise SessionNotFound(session_id)

    async def ping(self) -> bool:
        try:
            async with self._guard():
                return bool(await self.redis.ping())
        except SessionStoreUnavailable:
            return False

    async def aclose(self) -> None:
        await self.redis.aclose()

    # -- helpers ----------------------------------------------------------------------

    def _keys(self, tenant: str, session_id: str) -> SessionKeys:
        return SessionKeys.of(self.prefix, tenant, session_id)

    @asynccontextmanager
    async def _guard(self) -> AsyncIterator[None]:
        try:
            yield
        except _UNAVAILABLE as exc:
            self._mark(False, exc)
            raise SessionStoreUnavailable(_reason(exc), retry_after_s=self.retry_after_s) from exc
        except rx.ResponseError as exc:
            if str(exc).startswith(("MISCONF", "LOADING", "MASTERDOWN", "NOREPLICAS")):
                self._mark(False, exc)
                raise SessionStoreUnavailable(_reason(exc), retry_after_s=self.retry_after_s) from exc
            raise
        self._mark(True, None)

    def _mark(self, available: bool, exc: BaseException | None) -> None:
        # Log state changes only: an outage must not flood the log with one line per request.
        if available and not self._available:
            log.warning("session store reachable again")
        elif not available and self._available:
            log.warning("session store unavailable: %s", _reason(exc) if exc else "?")
        self._available = available


def new_turn_id() -> str:
    return secrets.token_urlsafe(12)


def _now_ms() -> int:
    return math.floor(time.time() * 1000)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or "no detail"
    return f"{type(exc).__name__}: {text[:200]}"


__all__ = ["CommitResult", "SessionSnapshot", "SessionStore", "StoredTurn", "new_turn_id"]
