"""OpenTelemetry tracing: one span per gateway request (cluster.gateway.steps.trace) with
the session store's prepare/commit spans inside it. With no collector endpoint
configured the tracer is a no-op, so the hot path pays nothing in local runs and tests."""

from __future__ import annotations

import logging
import os
from threading import Lock

from opentelemetry import trace
from opentelemetry.trace import Tracer

from cluster.config import TelemetryConfig

log = logging.getLogger(__name__)
_lock = Lock()
_configured = False


def configure_tracing(cfg: TelemetryConfig) -> None:
    """Install a batch OTLP exporter once per process when an endpoint is set (config or
    the standard OTEL_EXPORTER_OTLP_ENDPOINT, which the Helm chart sets)."""
    global _configured
    endpoint = cfg.otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    with _lock:
        if _configured or not endpoint:
            return
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider(resource=Resource.create({"service.name": cfg.service_name}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True)))
        trace.set_tracer_provider(provider)
        _configured = True
        log.info("OpenTelemetry traces export to %s", endpoint)


def tracer(name: str) -> Tracer:
    return trace.get_tracer(name)
