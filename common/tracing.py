"""OpenTelemetry tracing from the standard OTEL_* environment: OTLP when configured, off otherwise.

When no OTLP endpoint is set there is no provider at all: callers get None and
skip span work entirely, so tracing off costs nothing on the hot path.
"""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_PROPAGATOR = TraceContextTextMapPropagator()


def tracer_provider_from_env(service_name: str, env: Mapping[str, str]) -> TracerProvider | None:
    """A provider exporting OTLP/gRPC if OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT is set, else None."""
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if not endpoint or env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    # Imported only when tracing is on: the exporter pulls in a gRPC client stack.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # noqa: PLC0415
        OTLPSpanExporter,
    )

    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME", service_name)})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def inject(span: Span) -> tuple[str, str]:
    """The W3C (traceparent, tracestate) of a span, ("", "") if it is not recording."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent", ""), carrier.get("tracestate", "")


def extract(traceparent: str, tracestate: str = "") -> Context | None:
    """The parent context carried by a message, or None when there is none."""
    if not traceparent:
        return None
    carrier = {"traceparent": traceparent}
    if tracestate:
        carrier["tracestate"] = tracestate
    return _PROPAGATOR.extract(carrier)
