"""Tracing end to end: a real server exports over OTLP/HTTP (protobuf) to a tiny local receiver."""
import http.server
import threading
import time

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                      ExportTraceServiceResponse)

from e2e.server import RemoteServer, tiny_model_dir
from serval.server.tracing import traces_url

MODEL = "tiny"
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_SPAN_ID = "b7ad6b7169203331"


class OTLPReceiver:
    """Accepts POST /v1/traces and keeps the spans, their attributes decoded to Python values."""

    def __init__(self) -> None:
        self.spans: list[dict] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                request = ExportTraceServiceRequest.FromString(self.rfile.read(int(self.headers["Content-Length"])))
                for resource_spans in request.resource_spans:
                    for scope_spans in resource_spans.scope_spans:
                        receiver.spans.extend(_decode(span) for span in scope_spans.spans)
                body = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if self.path == "/v1/traces" else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def wait_for(self, predicate, timeout: float = 15.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for span in list(self.spans):
                if predicate(span):
                    return span
            time.sleep(0.05)
        raise AssertionError(f"no matching span among {self.spans}")

    def close(self) -> None:
        self.http.shutdown()


def _value(any_value):
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [_value(item) for item in any_value.array_value.values]
    return getattr(any_value, kind)


def _decode(span) -> dict:
    return {"name": span.name, "trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
            "parent_span_id": span.parent_span_id.hex(), "kind": span.kind, "status": span.status.code,
            "attributes": {attribute.key: _value(attribute.value) for attribute in span.attributes}}


@pytest.fixture(scope="module")
def receiver():
    otlp = OTLPReceiver()
    yield otlp
    otlp.close()


@pytest.fixture(scope="module")
def server(receiver):
    remote = RemoteServer(["--model", tiny_model_dir(), "--max-model-len", "512", "--served-model-name", MODEL,
                           "--otlp-traces-endpoint", receiver.url], env={"OTEL_BSP_SCHEDULE_DELAY": "100"})
    yield remote
    remote.close()


def test_traces_url_appends_the_otlp_path():
    assert traces_url("http://collector:4318") == "http://collector:4318/v1/traces"
    assert traces_url("http://collector:4318/") == "http://collector:4318/v1/traces"
    assert traces_url("http://collector:4318/custom/path") == "http://collector:4318/custom/path"


def test_chat_span_has_genai_attributes_and_the_callers_parent(server, receiver):
    client = server.client(default_headers={"traceparent": f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"})
    response = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "trace me"}],
                                              max_tokens=4, temperature=0.0)
    span = receiver.wait_for(lambda s: s["attributes"].get("gen_ai.response.id") == response.id)
    assert span["trace_id"] == TRACE_ID and span["parent_span_id"] == PARENT_SPAN_ID
    assert span["name"] == f"chat {MODEL}" and span["kind"] == 2  # SPAN_KIND_SERVER
    attributes = span["attributes"]
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.request.model"] == MODEL
    assert attributes["gen_ai.request.max_tokens"] == 4
    assert attributes["gen_ai.request.temperature"] == 0.0
    assert attributes["gen_ai.usage.input_tokens"] == response.usage.prompt_tokens
    assert attributes["gen_ai.usage.output_tokens"] == 4
    assert attributes["gen_ai.response.finish_reasons"] == ["length"]
    assert attributes["gen_ai.latency.time_in_queue"] >= 0
    assert attributes["gen_ai.latency.e2e"] >= attributes["gen_ai.latency.time_to_first_token"] > 0


def test_completion_span_without_parent_starts_a_trace(server, receiver):
    response = server.client().completions.create(model=MODEL, prompt="hello", max_tokens=2, stream=True)
    chunks = list(response)
    span = receiver.wait_for(lambda s: s["attributes"].get("gen_ai.response.id") == chunks[0].id)
    assert span["parent_span_id"] == "" and span["trace_id"] != TRACE_ID
    assert span["attributes"]["gen_ai.operation.name"] == "text_completion"
    assert span["attributes"]["gen_ai.usage.output_tokens"] == 2


def test_failed_request_span_has_error_status(server, receiver):
    import httpx
    response = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "top_p": 7})
    assert response.status_code == 400
    span = receiver.wait_for(lambda s: s["attributes"].get("http.response.status_code") == 400)
    assert span["status"] == 2  # STATUS_CODE_ERROR
