"""The gateway's Prometheus metrics: one registry per gateway (not the process default),
served on /metrics of the API port (cluster.gateway.app) and, where configured, on a
port of its own (deployments.gateway).

Every metric is defined here, including those other steps increment (retries,
migrations, rate-limit refusals, shed requests): a step gets the gateway's
`GatewayMetrics` in its constructor (cluster.gateway.build_gateway) and calls the
method named after what happened, e.g. `metrics.retry(ctx)`.

Label values stay bounded: pools and tenants come from the config (an unknown tenant
counts as "other", a request refused before a pool was chosen as pool "none"), reasons
and outcomes are fixed strings in the code, never ids or user input.

Engine-side signals (vLLM's TTFT, queue, KV cache, prefix-cache hits per replica) stay
in Ray's metrics (`ray_vllm_*`); these are the client's view and the gateway's choices.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from cluster.config import ClusterConfig
from cluster.gateway.context import RequestContext

PREFIX = "mls_gateway"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
NO_POOL = "none"
OTHER_TENANT = "other"

# Client-side latency: from 10 ms (a cached short prompt on an idle replica) to minutes
# (a 128k prefill behind a queue). Inter-token: 1 ms to 2 s.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.0)
QUEUE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
SESSION_OUTCOMES = ("stored", "conflict", "store_down", "not_found", "not_stored")


class GatewayMetrics:
    def __init__(self, tenants: Iterable[str], pools: Iterable[str]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.tenants = frozenset(tenants)
        self.pools = frozenset(pools)
        r = self.registry
        pt = ["pool", "tenant"]
        self.requests = Counter(
            f"{PREFIX}_requests",
            "Requests answered, by the HTTP status the client got and how the request ended (ok, error, cancelled)",
            ["pool", "tenant", "kind", "status_code", "outcome"],
            registry=r,
        )
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "Time from the request's arrival at the gateway to its first reply chunk, as the client sees it",
            pt,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            f"{PREFIX}_inter_token_latency_seconds",
            "Time between consecutive streamed reply chunks, as the client sees it",
            pt,
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Time from arrival to the reply's end (or the refusal)",
            pt,
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.queue = Histogram(
            f"{PREFIX}_queue_time_seconds",
            "Time a request spent in the gateway before the pool's router assigned it a replica "
            "(auth, session read, tokenizing, hashing, waiting for a replica with room)",
            pt,
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens (the gateway's count)", pt, registry=r)
        self.completion_tokens = Counter(
            f"{PREFIX}_completion_tokens",
            "Completion tokens (the engine's usage where reported, else one per streamed chunk)",
            pt,
            registry=r,
        )
        self.cached_tokens = Counter(
            f"{PREFIX}_cached_tokens",
            "Prompt tokens found in the engine's prefix cache: as the router predicted (source=predicted) and as "
            "the engine reported (source=engine), both over the requests the engine reported them for",
            ["pool", "tenant", "source"],
            registry=r,
        )
        self.routing = Counter(
            f"{PREFIX}_routing_decisions",
            "Replica choices of the pool's router by the policy's reason (cache-aware: cache, affinity, "
            "min-ttft; fallback: the policy failed or chose an unknown replica)",
            ["pool", "reason"],
            registry=r,
        )
        self.spills = Counter(
            f"{PREFIX}_spills",
            "Requests sent to a larger pool because the smallest fitting pool was saturated",
            ["from_pool", "to_pool"],
            registry=r,
        )
        self.sessions = Counter(
            f"{PREFIX}_session_outcomes",
            "Session turns by outcome: stored, conflict (409), store_down (503), not_found (404), not_stored",
            ["tenant", "outcome"],
            registry=r,
        )
        # Incremented by the resilience and tenancy steps (their reasons go into the span).
        self.retries = Counter(f"{PREFIX}_retries", "Engine calls retried on another replica", ["pool"], registry=r)
        self.migrations = Counter(
            f"{PREFIX}_migrations", "Streams moved to another replica after one failed mid-reply", ["pool"], registry=r
        )
        self.rate_limited = Counter(
            f"{PREFIX}_rate_limited", "Requests refused with 429 by a tenant's limit", ["tenant"], registry=r
        )
        self.shed = Counter(f"{PREFIX}_shed", "Requests shed under overload (503)", ["pool", "tenant"], registry=r)
        # Which replica a scrape reached: the counters above restart from 0 with a new one.
        self.start_time = Gauge(
            f"{PREFIX}_start_time_seconds", "When this gateway replica started (Unix time)", registry=r
        )
        self.start_time.set_to_current_time()
        self._start_at_zero()

    def _start_at_zero(self) -> None:
        """Every series whose labels the config bounds exists from the start at 0, so rate()
        and the alerts see a rise from zero and a dashboard panel is never "no data"."""
        tenants = sorted(self.tenants | {OTHER_TENANT})
        pools = sorted(self.pools)
        for pool in pools:
            self.retries.labels(pool)
            self.migrations.labels(pool)
            for other in pools:
                if other != pool:
                    self.spills.labels(pool, other)
            for tenant in tenants:
                for metric in (self.ttft, self.itl, self.duration, self.queue, self.prompt_tokens):
                    metric.labels(pool, tenant)
                self.completion_tokens.labels(pool, tenant)
                self.shed.labels(pool, tenant)
                for source in ("predicted", "engine"):
                    self.cached_tokens.labels(pool, tenant, source)
        for tenant in tenants:
            self.rate_limited.labels(tenant)
            for outcome in SESSION_OUTCOMES:
                self.sessions.labels(tenant, outcome)

    @classmethod
    def from_config(cls, cfg: ClusterConfig) -> GatewayMetrics:
        tenants = set(cfg.auth.tenants) | {cfg.auth.default_tenant}
        return cls(tenants=tenants, pools=[p.name for p in cfg.pools])

    # --- label values --------------------------------------------------------------

    def tenant(self, ctx: RequestContext) -> str:
        """A configured tenant's name; "other" for one known only from $CLUSTER_API_KEY_HASHES
        (or none yet: refused before authentication), so ids never become label values."""
        return ctx.tenant if ctx.tenant in self.tenants else OTHER_TENANT

    def pool(self, ctx: RequestContext) -> str:
        return ctx.pool if ctx.pool in self.pools else NO_POOL

    # --- for other steps -----------------------------------------------------------

    def retry(self, ctx: RequestContext) -> None:
        self.retries.labels(self.pool(ctx)).inc()

    def migration(self, ctx: RequestContext) -> None:
        self.migrations.labels(self.pool(ctx)).inc()

    def rate_limit_refusal(self, ctx: RequestContext) -> None:
        self.rate_limited.labels(self.tenant(ctx)).inc()

    def shed_request(self, ctx: RequestContext) -> None:
        self.shed.labels(self.pool(ctx), self.tenant(ctx)).inc()

    # --- exposition ----------------------------------------------------------------

    def add_gauges(self, collector: Collector) -> None:
        self.registry.register(collector)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def serve_on_port(self, port: int, addr: str = "0.0.0.0") -> bool:
        """Serve this registry on a port of its own (a thread); False when the port is
        taken (e.g. a second gateway replica on the node)."""
        try:
            start_http_server(port, addr=addr, registry=self.registry)
        except OSError:
            return False
        return True


class InFlightCollector(Collector):
    """This gateway's requests in flight per pool (the spill signal), read at scrape time."""

    def __init__(self, in_flight: dict[str, int]) -> None:
        self._in_flight = in_flight

    def collect(self) -> Iterable[Any]:
        family = GaugeMetricFamily(
            f"{PREFIX}_in_flight_requests", "Requests this gateway has in flight per pool", labels=["pool"]
        )
        for pool, n in sorted(self._in_flight.items()):
            family.add_metric([pool], n)
        yield family


__all__ = [
    "CONTENT_TYPE",
    "GatewayMetrics",
    "InFlightCollector",
    "NO_POOL",
    "OTHER_TENANT",
    "PREFIX",
    "SESSION_OUTCOMES",
]
