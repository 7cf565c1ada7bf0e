"""vLLM's prefix-cache counters (tokens queried, tokens hit) as a running Ray cluster
exports them on each node's Prometheus endpoint, for benchmarks that measure real hit rates.

The counters are cumulative and Ray exports them every few seconds, so a measurement is
a difference of two settled reads: `settle` waits until they stop moving (or have grown
by what was sent).
"""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Sequence

_METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
POLL_S = 3.0


def prometheus_sum(text: str, metric: str) -> float | None:
    """Sum of every sample of `metric` (e.g. "vllm:prefix_cache_hits") in Prometheus text,
    whatever prefix or suffix the exporter added ("ray_vllm_prefix_cache_hits_total")."""
    base = re.escape(metric).replace(":", "[:_]")
    name_re = re.compile(rf"^(?:.*[_:])?{base}(?:_total)?$")
    total, found = 0.0, False
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _METRIC_LINE.match(line)
        if not m or not name_re.match(m.group(1)):  # also skips vllm:external_prefix_cache_*
            continue
        try:
            total += float(m.group(3))
            found = True
        except ValueError:
            continue
    return total if found else None


def metrics_urls() -> list[str]:
    """Ray's Prometheus endpoint of every live node of the cluster this process joined."""
    import ray

    return [
        f"http://{n.get('NodeManagerAddress', '127.0.0.1')}:{n['MetricsExportPort']}/metrics"
        for n in ray.nodes()
        if n.get("Alive") and n.get("MetricsExportPort")
    ]


def read(urls: Sequence[str]) -> tuple[float, float] | None:
    """(queries, hits) summed over the engines behind `urls`; None when none exports them."""
    queries = hits = 0.0
    found = False
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                text = r.read().decode()
        except OSError:
            continue
        q, h = prometheus_sum(text, "vllm:prefix_cache_queries"), prometheus_sum(text, "vllm:prefix_cache_hits")
        # Ray exports a counter only once it moved: no hits yet means 0 hits.
        if q is not None:
            queries, hits, found = queries + q, hits + (h or 0.0), True
    return (queries, hits) if found else None


def settle(
    urls: Sequence[str],
    *,
    baseline: tuple[float, float] | None = None,
    expect_queries: float | None = None,
    stable_reads: int = 3,
    timeout_s: float = 60.0,
) -> tuple[float, float] | None:
    """The counters once settled: grown past `baseline` by `expect_queries`, or unchanged
    for `stable_reads` reads in a row (and past `baseline`, when given)."""
    deadline = time.monotonic() + timeout_s
    last: tuple[float, float] | None = None
    stable = 0
    while time.monotonic() < deadline:
        now = read(urls)
        if now is not None:
            grown = baseline is None or now[0] > baseline[0]
            if baseline is not None and expect_queries is not None and now[0] - baseline[0] >= expect_queries:
                return now
            stable = stable + 1 if now == last and grown else 0
            if stable >= stable_reads:
                return now
        last = now
        time.sleep(POLL_S)
    return last


__all__ = ["metrics_urls", "prometheus_sum", "read", "settle"]
