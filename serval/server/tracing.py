"""OpenTelemetry tracing: one SERVER span per request with GenAI semantic-convention attributes, exported
over OTLP/HTTP (protobuf), a child of the caller's `traceparent` when one is sent.

The tracer provider is the server's own, not the global one, so that importing serval never changes a host
application's tracing.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from urllib.parse import urlsplit

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

logger = logging.getLogger(__name__)

_PROPAGATOR = TraceContextTextMapPropagator()


def traces_url(endpoint: str) -> str:
    """OTLP/HTTP's convention: a bare collector address gets the /v1/traces path."""
    if urlsplit(endpoint).path in ("", "/"):
        return endpoint.rstrip("/") + "/v1/traces"
    return endpoint


class RequestTracer:
    def __init__(self, endpoint: str, service_name: str = "serval") -> None:
        self.endpoint = traces_url(endpoint)
        self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=self.endpoint)))
        self.tracer = self.provider.get_tracer("serval.server")
        logger.info("tracing enabled", extra={"otlp_traces_endpoint": self.endpoint})

    def start_request_span(self, operation: str, model: str, headers: Mapping[str, str],
                           attributes: dict) -> Span:
        """operation is GenAI's gen_ai.operation.name: 'chat' or 'text_completion'."""
        parent = _PROPAGATOR.extract(carrier=dict(headers))
        span = self.tracer.start_span(f"{operation} {model}", context=parent, kind=SpanKind.SERVER)
        span.set_attributes({"gen_ai.operation.name": operation, "gen_ai.provider.name": "serval",
                             "gen_ai.system": "serval", "gen_ai.request.model": model})
        span.set_attributes({key: value for key, value in attributes.items() if value is not None})
        return span

    @staticmethod
    def end_request_span(span: Span, attributes: dict, error: str | None = None) -> None:
        span.set_attributes({key: value for key, value in attributes.items() if value is not None})
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end()

    def shutdown(self) -> None:
        self.provider.shutdown()  # flushes what the batch processor holds
