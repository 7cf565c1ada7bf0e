"""OpenTelemetry tracing: one span per gateway request (cluster.gateway.steps.trace) with
the session store's prepare/commit spans and the engine call inside it; vLLM's own
request span continues the trace in the engine (the gateway sends it a W3C traceparent).
With no collector endpoint configured the tracer is a no-op, so the hot path pays
nothing in local runs and tests."""

from __future__ import annotations

import logging
import os
from threading import Lock
from typing import TYPE_CHECKING

from opentelemetry import trace
from opentelemetry.trace import Tracer

from cluster.config import TelemetryConfig

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger(__name__)
_lock = Lock()
_configured = False


def otlp_endpoint(cfg: TelemetryConfig) -> str | None:
    """The collector endpoint: the config's, else the standard OTEL_EXPORTER_OTLP_ENDPOINT
    (which the Helm chart sets)."""
    return cfg.otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None


def span_exporter(cfg: TelemetryConfig, endpoint: str) -> SpanExporter:
    """The SDK's OTLP exporter for the configured protocol. For http/protobuf the endpoint
    is the full URL (.../v1/traces), as vLLM's `otlp_traces_endpoint` takes it too."""
    if cfg.otlp_protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        return HttpExporter(endpoint=endpoint)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

    return GrpcExporter(endpoint=endpoint, insecure=True)


def tracer_provider(cfg: TelemetryConfig, endpoint: str) -> TracerProvider:
    """A provider that batches spans to `endpoint` (not installed process-wide)."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": cfg.service_name}))
    provider.add_span_processor(BatchSpanProcessor(span_exporter(cfg, endpoint)))
    return provider


def configure_tracing(cfg: TelemetryConfig) -> None:
    """Install the batch OTLP exporter once per process when an endpoint is set."""
    global _configured
    endpoint = otlp_endpoint(cfg)
    with _lock:
        if _configured or not endpoint:
            return
        trace.set_tracer_provider(tracer_provider(cfg, endpoint))
        _configured = True
        log.info("OpenTelemetry traces export to %s (%s)", endpoint, cfg.otlp_protocol)


def tracer(name: str) -> Tracer:
    return trace.get_tracer(name)
