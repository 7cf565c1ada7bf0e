"""OpenAI's rate-limit response headers (x-ratelimit-*), from a limiter decision."""

from __future__ import annotations

import math

from cluster.admission.limiter import Decision


def duration(seconds: float) -> str:
    """OpenAI's duration format: '20ms', '1s', '6m0s'."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60)
    secs = f"{rest:.3f}".rstrip("0").rstrip(".")
    return f"{int(minutes)}m{secs}s" if minutes else f"{secs}s"


def rate_limit_headers(d: Decision) -> dict[str, str]:
    """Headers of the limits the tenant has (an unlimited dimension has none)."""
    out: dict[str, str] = {}
    if d.requests_limit is not None:
        out["x-ratelimit-limit-requests"] = str(d.requests_limit)
        out["x-ratelimit-remaining-requests"] = str(d.requests_left or 0)
        out["x-ratelimit-reset-requests"] = duration(d.requests_reset_s)
    if d.tokens_limit is not None:
        out["x-ratelimit-limit-tokens"] = str(d.tokens_limit)
        out["x-ratelimit-remaining-tokens"] = str(d.tokens_left or 0)
        out["x-ratelimit-reset-tokens"] = duration(d.tokens_reset_s)
    return out


def retry_after(d: Decision) -> str:
    """Whole seconds, at least 1 (Retry-After takes integers)."""
    return str(max(1, math.ceil(d.retry_after_s)))


__all__ = ["duration", "rate_limit_headers", "retry_after"]
