"""Tenant authentication: `Authorization: Bearer <key>` -> tenant name.

Only SHA-256 hex digests of keys are configured (`auth.tenants` in the cluster config,
merged with the JSON in the env var named by `auth.api_keys_env`, e.g. from a Kubernetes
Secret: `{"acme": ["<sha256 hex>", ...]}`). A presented key is hashed and compared with
every configured digest in constant time; keys are never logged or echoed.

Missing, malformed or unknown key: 401 with an OpenAI-style body. With `auth.enabled`
false (the local default) every request belongs to `auth.default_tenant` and the header
is ignored; do not expose such a deployment beyond a trusted network.

Runbook helpers (read the key from stdin so it stays out of shell history):
    python -m cluster.auth generate            # a new key and its hash
    printf %s "$KEY" | python -m cluster.auth hash
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import sys
from collections.abc import Mapping, Sequence

from cluster.config import AuthConfig
from cluster.errors import APIError

log = logging.getLogger(__name__)


class AuthError(APIError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"

    def __init__(self, message: str) -> None:
        super().__init__(message=message)

    @property
    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="mistral-large-serve"'}


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_api_key() -> str:
    return "mls-" + secrets.token_urlsafe(32)


class TenantAuthenticator:
    def __init__(self, tenants: Mapping[str, Sequence[str]], *, enabled: bool, default_tenant: str = "default") -> None:
        self.enabled = enabled
        self.default_tenant = default_tenant
        # (digest bytes, tenant) pairs; compared one by one without early exit.
        self._entries: list[tuple[bytes, str]] = [
            (bytes.fromhex(digest.lower()), tenant) for tenant, digests in tenants.items() for digest in digests
        ]
        if enabled and not self._entries:
            log.warning("auth is enabled but no API key hashes are configured: every request will get 401")

    @classmethod
    def from_config(cls, cfg: AuthConfig, environ: Mapping[str, str] | None = None) -> TenantAuthenticator:
        env = os.environ if environ is None else environ
        tenants: dict[str, list[str]] = {t: list(h) for t, h in cfg.tenants.items()}
        if cfg.api_keys_env and env.get(cfg.api_keys_env):
            try:
                extra = json.loads(env[cfg.api_keys_env])
            except ValueError:
                raise ValueError(
                    f"env {cfg.api_keys_env} is not valid JSON (expected {{tenant: [sha256 hex]}})"
                ) from None
            if not isinstance(extra, dict):
                raise ValueError(f"env {cfg.api_keys_env} must be a JSON object {{tenant: [sha256 hex]}}")
            # Validate through the config model (tenant names, digest format) without echoing values.
            checked = AuthConfig(enabled=cfg.enabled, tenants=extra, api_keys_env=None)
            for tenant, digests in checked.tenants.items():
                tenants.setdefault(tenant, []).extend(digests)
        return cls(tenants, enabled=cfg.enabled, default_tenant=cfg.default_tenant)

    @property
    def tenant_count(self) -> int:
        return len({t for _, t in self._entries})

    def authenticate(self, authorization: str | None) -> str:
        """The tenant of a request's Authorization header value; AuthError (401) otherwise."""
        if not self.enabled:
            return self.default_tenant
        if not authorization or not authorization.strip():
            raise AuthError("missing API key: send the header 'Authorization: Bearer <key>'")
        scheme, _, key = authorization.strip().partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise AuthError("malformed Authorization header: expected 'Bearer <key>'")
        digest = hashlib.sha256(key.encode("utf-8")).digest()
        found: str | None = None
        for expected, tenant in self._entries:
            if hmac.compare_digest(digest, expected) and found is None:
                found = tenant
        if found is None:
            raise AuthError("invalid API key")
        return found

    def authenticate_headers(self, headers: Mapping[str, str]) -> str:
        value = headers.get("authorization")
        if value is None:
            value = headers.get("Authorization")
        return self.authenticate(value)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["generate"]:
        key = new_api_key()
        print(f"key:    {key}\nsha256: {hash_api_key(key)}")
        print("Give the key to the tenant; configure only the sha256 (auth.tenants or the env JSON).", file=sys.stderr)
        return 0
    if args[:1] == ["hash"]:
        key = sys.stdin.read().strip() if len(args) == 1 else args[1]
        if not key:
            print("no key on stdin", file=sys.stderr)
            return 2
        print(hash_api_key(key))
        return 0
    print("usage: python -m cluster.auth generate | hash [KEY]  (hash reads the key from stdin)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["AuthError", "TenantAuthenticator", "hash_api_key", "new_api_key"]
