"""`TenantLimiter`: per-tenant requests/min, tokens/min and concurrency, enforced across
every gateway replica with shared state in Redis (one atomic Lua script per decision,
cluster.admission.scripts).

Tokens are reserved at admission (prompt + max_tokens x n) and corrected with the real
usage when the request ends (`release`: the unused part goes back into the bucket; the
concurrency slot is freed; the usage is counted per tenant and day for chargeback).

While Redis is unreachable (connection refused, or no answer within `timeout_s`), each
gateway decides alone for `fallback_s` with in-process buckets holding 1/N of every
budget (N: running gateway replicas), then tries Redis again: across N gateways the
cluster-wide limits still hold roughly (exactly with an even spread of traffic), never N
times over, and no request waits on a dead Redis for more than `timeout_s`. Requests
admitted locally are released locally. A release that fails is retried a few times; a
concurrency slot whose release is lost for good expires after `lease_s`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from redis import exceptions as rx
from redis.asyncio import Redis

from cluster.admission import scripts
from cluster.config import ClusterConfig, TenantLimits
from cluster.sessions.connection import build_redis

log = logging.getLogger(__name__)

Source = Literal["redis", "local", "none"]

# Errors meaning "Redis cannot decide now" (-> the local fallback), as opposed to bugs.
UNREACHABLE: tuple[type[BaseException], ...] = (
    rx.ConnectionError,
    rx.TimeoutError,
    rx.ReadOnlyError,
    rx.BusyLoadingError,
    rx.OutOfMemoryError,
    rx.TryAgainError,
    rx.ClusterDownError,
    OSError,
    asyncio.TimeoutError,
)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str  # '' | 'requests' | 'tokens' | 'too_large' | 'concurrency'
    retry_after_s: float
    requests_limit: int | None
    requests_left: int | None
    requests_reset_s: float
    tokens_limit: int | None
    tokens_left: int | None
    tokens_reset_s: float
    source: Source


@dataclass
class Ticket:
    """An admitted request's reservation, handed back to `release`."""

    tenant: str
    limits: TenantLimits
    reserved: int
    lease_id: str
    source: Source


def needs_state(limits: TenantLimits) -> bool:
    return bool(limits.requests_per_minute or limits.tokens_per_minute or limits.max_concurrent)


@dataclass
class _Bucket:
    tokens: float
    at: float


@dataclass
class LocalBudget:
    """The fallback: in-process token buckets and concurrency counts, each limit divided
    by the number of gateway replicas (the same arithmetic as the Lua script)."""

    clock: Callable[[], float] = time.monotonic
    _buckets: dict[tuple[str, str], _Bucket] = field(default_factory=dict)
    _in_flight: dict[str, int] = field(default_factory=dict)

    def _level(self, key: tuple[str, str], limit: float) -> float:
        b = self._buckets.get(key)
        if b is None:
            return limit
        return min(limit, b.tokens + max(0.0, self.clock() - b.at) * limit / 60.0)

    def _set(self, key: tuple[str, str], tokens: float) -> None:
        self._buckets[key] = _Bucket(tokens, self.clock())

    def admit(self, tenant: str, limits: TenantLimits, cost: int, share: int) -> Decision:
        rl = limits.requests_per_minute / share if limits.requests_per_minute else 0.0
        tl = limits.tokens_per_minute / share if limits.tokens_per_minute else 0.0
        cl = math.ceil(limits.max_concurrent / share) if limits.max_concurrent else 0
        r = self._level((tenant, "r"), rl) if rl else 0.0
        tk = self._level((tenant, "t"), tl) if tl else 0.0
        n = self._in_flight.get(tenant, 0)
        reason, retry = "", 0.0
        if cl and n >= cl:
            reason, retry = "concurrency", 1.0
        elif rl and r < 1:
            reason, retry = "requests", (1 - r) * 60.0 / rl
        elif limits.tokens_per_minute and cost > limits.tokens_per_minute:
            reason, retry = "too_large", 60.0
        elif tl and tk < min(cost, tl):  # a request above the local share waits for a full bucket
            reason, retry = "tokens", (min(cost, tl) - tk) * 60.0 / tl
        if not reason:
            if rl:
                r -= 1
                self._set((tenant, "r"), r)
            if tl:
                tk -= cost
                self._set((tenant, "t"), tk)
            if cl:
                self._in_flight[tenant] = n + 1
        return Decision(
            allowed=not reason,
            reason=reason,
            retry_after_s=retry,
            requests_limit=limits.requests_per_minute,
            requests_left=math.floor(max(0.0, r) * share) if rl else None,
            requests_reset_s=(rl - r) * 60.0 / rl if rl else 0.0,
            tokens_limit=limits.tokens_per_minute,
            tokens_left=math.floor(max(0.0, tk) * share) if tl else None,
            tokens_reset_s=max(0.0, tl - tk) * 60.0 / tl if tl else 0.0,
            source="local",
        )

    def release(self, tenant: str, limits: TenantLimits, back: int, share: int) -> None:
        if limits.tokens_per_minute and back:
            tl = limits.tokens_per_minute / share
            self._set((tenant, "t"), min(tl, self._level((tenant, "t"), tl) + back))
        if limits.max_concurrent:
            self._in_flight[tenant] = max(0, self._in_flight.get(tenant, 0) - 1)


def _keys(prefix: str, tenant: str) -> tuple[str, str, str]:
    base = f"{prefix}:adm:{{{tenant}}}"
    return f"{base}:rpm", f"{base}:tpm", f"{base}:conc"


def usage_key(prefix: str, tenant: str, day: str) -> str:
    return f"{prefix}:adm:{{{tenant}}}:usage:{day}"


def utc_day(at: float | None = None) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(time.time() if at is None else at))


class TenantLimiter:
    def __init__(
        self,
        redis: Redis | None,
        *,
        gateways: Callable[[], int] = lambda: 1,
        key_prefix: str = "mls",
        timeout_s: float = 0.25,
        fallback_s: float = 2.0,
        lease_s: int = 900,
        usage_ttl_days: int = 62,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = redis
        self.gateways = gateways
        self.key_prefix = key_prefix
        self.timeout_s = timeout_s
        self.fallback_s = fallback_s
        self.lease_s = lease_s
        self.usage_ttl_s = usage_ttl_days * 86400
        self.clock = clock
        self.local = LocalBudget(clock=clock)
        self._fallback_until = 0.0
        self._admit = redis.register_script(scripts.ADMIT) if redis is not None else None
        self._release = redis.register_script(scripts.RELEASE) if redis is not None else None

    @classmethod
    def from_config(cls, cfg: ClusterConfig, *, gateways: Callable[[], int] = lambda: 1) -> TenantLimiter:
        """On the sessions' Redis, with the admission's short timeout and no retries (the
        local fallback answers instead); connects lazily, on the first limited request."""
        adm = cfg.admission
        conn = cfg.sessions.model_copy(
            update={"socket_timeout_s": adm.redis_timeout_s, "connect_timeout_s": adm.redis_timeout_s, "retries": 0}
        )
        return cls(
            build_redis(conn),
            gateways=gateways,
            key_prefix=cfg.sessions.key_prefix,
            timeout_s=adm.redis_timeout_s,
            fallback_s=adm.fallback_s,
            lease_s=adm.lease_s,
            usage_ttl_days=adm.usage_ttl_days,
        )

    @property
    def degraded(self) -> bool:
        """True while decisions are local (Redis unreachable recently)."""
        return self.redis is None or self.clock() < self._fallback_until

    def _unreachable(self, exc: BaseException) -> None:
        if not self.degraded:
            log.warning(
                "admission: Redis unreachable (%s); each gateway enforces 1/%d of every limit for %.1f s",
                type(exc).__name__, max(1, self.gateways()), self.fallback_s,
            )  # fmt: skip
        self._fallback_until = self.clock() + self.fallback_s

    async def admit(self, tenant: str, limits: TenantLimits, cost: int) -> tuple[Decision, Ticket | None]:
        """Admit one request reserving `cost` tokens, or say why not and when to retry."""
        lease = secrets.token_hex(8)
        if not needs_state(limits):
            none = Decision(True, "", 0.0, None, None, 0.0, None, None, 0.0, "none")
            return none, Ticket(tenant, limits, cost, lease, "none")
        decision: Decision | None = None
        if not self.degraded and self._admit is not None:
            try:
                decision = await self._redis_admit(tenant, limits, cost, lease)
            except UNREACHABLE as exc:
                self._unreachable(exc)
        if decision is None:
            decision = self.local.admit(tenant, limits, cost, max(1, self.gateways()))
        ticket = Ticket(tenant, limits, cost, lease, decision.source) if decision.allowed else None
        return decision, ticket

    async def _redis_admit(self, tenant: str, limits: TenantLimits, cost: int, lease: str) -> Decision:
        assert self._admit is not None
        args: list[str | int] = [
            limits.requests_per_minute or 0,
            limits.tokens_per_minute or 0,
            limits.max_concurrent or 0,
            cost,
            lease,
            self.lease_s * 1000,
        ]
        raw: Any = await asyncio.wait_for(
            self._admit(keys=list(_keys(self.key_prefix, tenant)), args=args), self.timeout_s
        )
        allowed, reason, retry_ms, r_left, r_reset, t_left, t_reset, _ = raw
        return Decision(
            allowed=bool(int(allowed)),
            reason=str(reason),
            retry_after_s=int(retry_ms) / 1000,
            requests_limit=limits.requests_per_minute,
            requests_left=int(r_left) if limits.requests_per_minute else None,
            requests_reset_s=int(r_reset) / 1000,
            tokens_limit=limits.tokens_per_minute,
            tokens_left=int(t_left) if limits.tokens_per_minute else None,
            tokens_reset_s=int(t_reset) / 1000,
            source="redis",
        )

    async def release(self, ticket: Ticket, *, used: int, prompt: int, completion: int, cached: int = 0) -> None:
        """The request ended: give back `reserved - used` tokens, free its slot, count usage."""
        back = ticket.reserved - used
        if ticket.source == "local":
            self.local.release(ticket.tenant, ticket.limits, back, max(1, self.gateways()))
        if self._release is None:
            return
        _, tpm, conc = _keys(self.key_prefix, ticket.tenant)
        redis_state = ticket.source == "redis"
        args: list[str | int] = [
            (ticket.limits.tokens_per_minute or 0) if redis_state else 0,
            back if redis_state else 0,
            ticket.lease_id if redis_state and ticket.limits.max_concurrent else "",
            prompt,
            completion,
            cached,
            self.usage_ttl_s,
        ]
        keys = [tpm, conc, usage_key(self.key_prefix, ticket.tenant, utc_day())]
        for attempt in range(3):
            try:
                await asyncio.wait_for(self._release(keys=keys, args=args), max(1.0, self.timeout_s * 4))
                return
            except UNREACHABLE as exc:
                if attempt == 2:
                    log.warning("admission: releasing a request of %s failed (%s)", ticket.tenant, type(exc).__name__)
                    return
                await asyncio.sleep(self.fallback_s * (attempt + 1))

    async def usage(self, tenant: str, day: str | None = None) -> dict[str, int]:
        """The tenant's counted usage of one UTC day (YYYY-MM-DD; today by default)."""
        if self.redis is None:
            return {}
        raw = await self.redis.hgetall(usage_key(self.key_prefix, tenant, day or utc_day()))  # type: ignore[misc]
        return {str(k): int(v) for k, v in raw.items()}

    async def aclose(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()


__all__ = ["Decision", "LocalBudget", "TenantLimiter", "Ticket", "UNREACHABLE", "needs_state", "usage_key", "utc_day"]
