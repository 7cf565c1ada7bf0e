"""The prefix-cache salt of a tenant: vLLM keys cached KV blocks by the request's
`cache_salt` (it enters the hash of block 0, hence of every block), so requests with
different salts never share a block, and a tenant can neither hit nor time another
tenant's cached prompts. Tenants that name the same `cache_group` share one salt (e.g.
one organisation's common system prompt). Only the gateway sets it: the public API
refuses a client's `cache_salt` (cluster.gateway.public_api)."""

from __future__ import annotations

import hashlib

from cluster.config import AdmissionConfig


def cache_salt(tenant: str, group: str | None = None) -> str:
    # Distinct namespaces: a group named like a tenant never shares that tenant's salt.
    scope = f"group:{group}" if group else f"tenant:{tenant}"
    return hashlib.sha256(f"mistral-large-serve/cache/{scope}".encode()).hexdigest()[:32]


def salt_for(cfg: AdmissionConfig, tenant: str) -> str | None:
    """The salt of the tenant's requests; None with isolation off (one shared cache)."""
    if not cfg.isolate_cache:
        return None
    return cache_salt(tenant, cfg.limits(tenant).cache_group)


__all__ = ["cache_salt", "salt_for"]
