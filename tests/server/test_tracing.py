"""Tracing end to end: a real server exports over OTLP/HTTP (protobuf) to a tiny local receiver."""
import pytest

from tests.e2e.server import RemoteServer, tiny_model_dir
from serval.server.tracing import traces_url

MODEL = "tiny"
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_SPAN_ID = "b7ad6b7169203331"


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
