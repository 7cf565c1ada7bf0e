"""TenantAuthenticator: bearer keys checked against configured SHA-256 hashes."""

from __future__ import annotations

import hashlib
import json
import logging

import pytest
from pydantic import ValidationError

from cluster.auth import AuthError, TenantAuthenticator, hash_api_key, main, new_api_key
from cluster.config import AuthConfig

ACME_KEY = "mls-acme-key-1"
ACME_KEY2 = "mls-acme-key-2"
GLOBEX_KEY = "mls-globex-key"


def authenticator(**kw: object) -> TenantAuthenticator:
    cfg = AuthConfig(
        enabled=True,
        tenants={"acme": [hash_api_key(ACME_KEY), hash_api_key(ACME_KEY2)], "globex": [hash_api_key(GLOBEX_KEY)]},
        api_keys_env=None,
        **kw,  # type: ignore[arg-type]
    )
    return TenantAuthenticator.from_config(cfg, environ={})


def test_hash_is_sha256_hex() -> None:
    assert hash_api_key("abc") == hashlib.sha256(b"abc").hexdigest()
    k1, k2 = new_api_key(), new_api_key()
    assert k1 != k2 and len(k1) > 40


def test_known_keys_map_to_their_tenant() -> None:
    auth = authenticator()
    assert auth.authenticate(f"Bearer {ACME_KEY}") == "acme"
    assert auth.authenticate(f"bearer   {ACME_KEY2}  ") == "acme"
    assert auth.authenticate(f"Bearer {GLOBEX_KEY}") == "globex"
    assert auth.authenticate_headers({"authorization": f"Bearer {GLOBEX_KEY}"}) == "globex"
    assert auth.tenant_count == 2


@pytest.mark.parametrize(
    "header, fragment",
    [
        (None, "missing API key"),
        ("", "missing API key"),
        ("Bearer", "malformed"),
        (f"Basic {ACME_KEY}", "malformed"),
        ("Bearer not-a-key", "invalid API key"),
        (f"Bearer {hash_api_key(ACME_KEY)}", "invalid API key"),  # the hash itself is not a key
    ],
)
def test_bad_credentials_are_401(header: str | None, fragment: str) -> None:
    with pytest.raises(AuthError) as exc:
        authenticator().authenticate(header)
    err = exc.value
    assert err.status == 401 and fragment in err.body()["error"]["message"]
    assert err.body()["error"]["code"] == "invalid_api_key"
    assert err.headers["WWW-Authenticate"].startswith("Bearer")
    assert ACME_KEY not in json.dumps(err.body())


def test_auth_off_means_default_tenant() -> None:
    auth = TenantAuthenticator.from_config(AuthConfig(enabled=False, default_tenant="local"), environ={})
    assert auth.authenticate(None) == "local"
    assert auth.authenticate("Bearer anything") == "local"


def test_env_json_adds_hashes_and_is_validated() -> None:
    cfg = AuthConfig(enabled=True, api_keys_env="KEYS")
    env = {"KEYS": json.dumps({"initech": [hash_api_key("k-initech")]})}
    auth = TenantAuthenticator.from_config(cfg, environ=env)
    assert auth.authenticate("Bearer k-initech") == "initech"
    with pytest.raises(ValueError, match="not valid JSON"):
        TenantAuthenticator.from_config(cfg, environ={"KEYS": "{oops"})
    with pytest.raises(ValidationError):  # a plain key where a hash belongs
        TenantAuthenticator.from_config(cfg, environ={"KEYS": json.dumps({"initech": ["k-initech"]})})
    with pytest.raises(ValidationError):  # a tenant name that would break the Redis key layout
        TenantAuthenticator.from_config(cfg, environ={"KEYS": json.dumps({"a:b": [hash_api_key("x")]})})


def test_config_rejects_plain_keys_and_bad_tenant_names() -> None:
    with pytest.raises(ValidationError, match="SHA-256"):
        AuthConfig(enabled=True, tenants={"acme": ["not-a-hash"]})
    with pytest.raises(ValidationError):
        AuthConfig(enabled=True, tenants={"{acme}": [hash_api_key("x")]})
    with pytest.raises(ValidationError):
        AuthConfig(default_tenant="bad tenant")


def test_enabled_without_keys_rejects_everything_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="cluster.auth"):
        auth = TenantAuthenticator.from_config(AuthConfig(enabled=True, api_keys_env=None), environ={})
    assert "no API key hashes" in caplog.text
    with pytest.raises(AuthError):
        auth.authenticate(f"Bearer {ACME_KEY}")


def test_keys_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    auth = authenticator()
    with caplog.at_level(logging.DEBUG):
        auth.authenticate(f"Bearer {ACME_KEY}")
        with pytest.raises(AuthError):
            auth.authenticate("Bearer wrong-key-123")
    assert ACME_KEY not in caplog.text and "wrong-key-123" not in caplog.text


def test_cli_hash_and_generate(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hash", "abc"]) == 0
    assert capsys.readouterr().out.strip() == hashlib.sha256(b"abc").hexdigest()
    assert main(["generate"]) == 0
    out = capsys.readouterr().out.split()
    key, digest = out[1], out[3]
    assert hash_api_key(key) == digest
    assert main([]) == 2
