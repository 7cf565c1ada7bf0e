"""The Redis client of the session store, built from `SessionConfig`.

- URL: `redis://[user:password@]host:port/db` or `rediss://...` (TLS; CA from
  `tls_ca_file` or the URL's `?ssl_ca_certs=`), taken from the env var named by
  `redis_url_env` when set (a Kubernetes Secret), else `redis_url`.
- Sentinel: with `sentinel_master` set, the URL's host list names the Sentinels
  (`redis://:masterpw@sentinel-0:26379,sentinel-1:26379/0`); the password in the URL is the
  master's, `sentinel_password_env` names the Sentinels' own password if they have one.
- Pool: at most `pool_size` connections per gateway replica; a request waits (up to
  `socket_timeout_s`) for a free one instead of failing.
- Timeouts and retries: short connect/read timeouts and `retries` quick reconnect
  attempts, so an unreachable Redis turns into a 503 within a few seconds. Commands are
  safe to retry: commits carry a turn id and a retried commit is recognised.
- Recovery: connections that broke are dropped and reopened on the next command, so the
  service resumes by itself when Redis is back; no restart.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff

from cluster.config import SessionConfig


class BlockingSentinelConnectionPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel-discovered master with the waiting behaviour of BlockingConnectionPool."""


def resolve_redis_url(cfg: SessionConfig, environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    if cfg.redis_url_env and env.get(cfg.redis_url_env):
        return env[cfg.redis_url_env]
    return cfg.redis_url


def redacted(url: str) -> str:
    """The URL without its password, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return parts._replace(netloc=f"{user}:***@{netloc}").geturl()


def _common_kwargs(cfg: SessionConfig) -> dict[str, Any]:
    return {
        "socket_timeout": cfg.socket_timeout_s,
        "socket_connect_timeout": cfg.connect_timeout_s,
        "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), cfg.retries),
        "health_check_interval": cfg.health_check_interval_s,
        "decode_responses": True,
        "client_name": "mls-sessions",
    }


def build_redis(cfg: SessionConfig, *, url: str | None = None, environ: Mapping[str, str] | None = None) -> Redis:
    """A redis.asyncio client; it connects lazily, in the event loop that first uses it."""
    url = url or resolve_redis_url(cfg, environ)
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"sessions.redis_url must start with redis://, rediss:// or unix://, got {redacted(url)!r}")
    kwargs = _common_kwargs(cfg)
    tls = parts.scheme == "rediss"
    if tls and cfg.tls_ca_file:
        kwargs["ssl_ca_certs"] = cfg.tls_ca_file
    if cfg.sentinel_master:
        return _build_sentinel(cfg, url, kwargs, tls, environ)
    pool = BlockingConnectionPool.from_url(url, max_connections=cfg.pool_size, timeout=cfg.socket_timeout_s, **kwargs)
    return Redis.from_pool(pool)


def _build_sentinel(
    cfg: SessionConfig, url: str, kwargs: dict[str, Any], tls: bool, environ: Mapping[str, str] | None
) -> Redis:
    parts = urlsplit(url)
    hostlist = parts.netloc.rsplit("@", 1)[-1]
    sentinels: list[tuple[str, int]] = []
    for item in hostlist.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host:
            host, port = port, "26379"
        sentinels.append((host, int(port)))
    db = int(parts.path.strip("/") or 0)
    # SentinelConnectionPool picks its SSL connection class from `ssl`.
    master_kwargs: dict[str, Any] = dict(kwargs, db=db, ssl=tls)
    if parts.username:
        master_kwargs["username"] = unquote(parts.username)
    if parts.password:
        master_kwargs["password"] = unquote(parts.password)
    env = os.environ if environ is None else environ
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": cfg.socket_timeout_s,
        "socket_connect_timeout": cfg.connect_timeout_s,
        "decode_responses": True,
    }
    if tls:
        sentinel_kwargs["ssl"] = True
        if cfg.tls_ca_file:
            sentinel_kwargs["ssl_ca_certs"] = cfg.tls_ca_file
    if cfg.sentinel_password_env and env.get(cfg.sentinel_password_env):
        sentinel_kwargs["password"] = env[cfg.sentinel_password_env]
    sentinel = Sentinel(sentinels, sentinel_kwargs=sentinel_kwargs)
    assert cfg.sentinel_master is not None
    client: Redis = sentinel.master_for(
        cfg.sentinel_master,
        connection_pool_class=BlockingSentinelConnectionPool,
        max_connections=cfg.pool_size,
        timeout=cfg.socket_timeout_s,
        **master_kwargs,
    )
    return client


__all__ = ["BlockingSentinelConnectionPool", "build_redis", "redacted", "resolve_redis_url"]
