"""Limits and checks at the server's edge, through a real `serval serve` process: the body size limit (413), big
bodies, a long bad_words list and n=128 worked off the event loop (/health keeps answering), the bound on n, the
API key on every endpoint but /health and /version (and /metrics, open by default), the 429's Retry-After, the
documented request bodies in /openapi.json, and the fields errors name (seed, max_completion_tokens). Each error is
OpenAI's body, /health stays 200 and the next ordinary request succeeds."""
import concurrent.futures
import json
import random
import string
import time

import httpx
import pytest

from tests.e2e.server import API_KEY, RemoteServer, tiny_model_dir

MODEL = "tiny"
MAX_BODY = 1_000_000


@pytest.fixture(scope="module")
def server():
    remote = RemoteServer(["--model", tiny_model_dir(), "--max-model-len", "256", "--served-model-name", MODEL,
                           "--max-request-body-bytes", str(MAX_BODY), "--max-num-seqs", "8"], api_key=API_KEY)
    yield remote
    remote.close()


def post(server, path: str, body=None, content: bytes | None = None, headers: dict | None = None,
         timeout: float = 120) -> httpx.Response:
    return httpx.post(server.url + path, json=body if content is None else None, content=content,
                      headers={**server.headers, "Content-Type": "application/json", **(headers or {})},
                      timeout=timeout)


def assert_error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def assert_still_serving(server) -> None:
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200
    response = post(server, "/v1/completions", {"model": MODEL, "prompt": "still here", "max_tokens": 2})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 2


def test_a_body_over_the_limit_is_413(server):
    big = b'{"model": "tiny", "prompt": "' + b"a" * MAX_BODY + b'"}'
    assert_error(post(server, "/v1/completions", content=big), 413, code="request_too_large")

    def chunked():  # no Content-Length: the limit is counted as the bytes arrive
        for start in range(0, len(big), 65536):
            yield big[start:start + 65536]
    assert_error(post(server, "/v1/chat/completions", content=chunked()), 413, code="request_too_large")
    assert_error(post(server, "/tokenize", content=big), 413, code="request_too_large")
    assert_still_serving(server)


def health_during(server, work) -> tuple[httpx.Response, int]:
    """Run `work` in a thread; count the /health answers (all must be 200) that come back while it runs. With the
    tokenizing on the event loop, a poll waits out the whole of it and only the polls around it count (about 30 on
    a 2-core machine for the 1 MB prompt below); off the loop, the polls go on throughout (hundreds)."""
    answered = 0
    with concurrent.futures.ThreadPoolExecutor(1) as pool, httpx.Client(timeout=60) as client:
        future = pool.submit(work)
        while not future.done():
            assert client.get(server.url + "/health").status_code == 200
            answered += 1
        return future.result(), answered


def test_big_bodies_are_worked_off_the_event_loop(server):
    # Just under the limit, and a prompt that takes the tokenizer a while: refused for its length only after that.
    text = "lorem ipsum dolor sit amet " * (MAX_BODY // 28)
    response, answered = health_during(server, lambda: post(server, "/v1/completions",
                                                             {"model": MODEL, "prompt": text, "max_tokens": 1}))
    assert_error(response, 400, param="prompt", code="context_length_exceeded")
    assert answered >= 100
    response, answered = health_during(server, lambda: post(server, "/tokenize", {"prompt": text}))
    assert response.status_code == 200 and response.json()["count"] > 100_000
    assert answered >= 100
    assert_still_serving(server)


def test_a_long_bad_words_list_is_tokenized_off_the_event_loop(server):
    # ~0.9 MB of vLLM's bad_words, under the body limit, random letters (many tokens a word): the two tokenizer
    # passes a word take seconds, which on the event loop would hold one /health poll for all of it.
    rng = random.Random(0)
    words = ["".join(rng.choice(string.ascii_letters + "  ") for _ in range(990)) for _ in range(900)]
    slowest = 0.0
    with concurrent.futures.ThreadPoolExecutor(1) as pool, httpx.Client(timeout=60) as client:
        future = pool.submit(lambda: post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1,
                                                                      "bad_words": words}))
        while not future.done():
            started = time.monotonic()
            assert client.get(server.url + "/health").status_code == 200
            slowest = max(slowest, time.monotonic() - started)
        response = future.result()
    assert response.status_code == 200, response.text
    assert slowest < 1.0, slowest  # 0.3 s on a 2-core machine; 3.9 s with the words tokenized on the event loop
    assert_still_serving(server)


def test_n_is_bounded_and_128_choices_do_not_stall_the_server(server):
    assert_error(post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1, "n": 129}), 400,
                 param="n")
    assert_error(post(server, "/v1/chat/completions", {"model": MODEL, "max_tokens": 1, "n": 5000,
                                                       "messages": [{"role": "user", "content": "x"}]}), 400, param="n")
    response, answered = health_during(server, lambda: post(server, "/v1/completions", {
        "model": MODEL, "prompt": "many", "max_tokens": 4, "n": 128, "stream": True}))
    assert response.status_code == 200
    # A random-weight model may sample its end-of-text token inside 4 tokens: a choice then ends with "stop".
    chunks = [json.loads(line[len("data: "):]) for line in response.text.splitlines()
              if line.startswith("data: {")]
    finished = sorted(choice["index"] for chunk in chunks for choice in chunk["choices"]
                      if choice["finish_reason"] is not None)
    assert finished == list(range(128)) and response.text.rstrip().endswith("data: [DONE]")
    assert {choice["finish_reason"] for chunk in chunks for choice in chunk["choices"]} <= {None, "length", "stop"}
    assert answered >= 1
    assert_still_serving(server)


@pytest.mark.parametrize("path, body", [
    ("/tokenize", {"prompt": "hello"}), ("/detokenize", {"tokens": [1, 2]}),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1})])
def test_every_endpoint_but_health_version_and_metrics_needs_the_key(server, path, body):
    response = httpx.post(server.url + path, json=body, timeout=60)
    assert_error(response, 401, code="invalid_api_key")
    assert httpx.get(server.url + "/openapi.json", timeout=30).status_code == 401
    assert httpx.get(server.url + "/v1/models", timeout=30).status_code == 401
    assert post(server, path, body).status_code == 200
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200
    assert httpx.get(server.url + "/version", timeout=30).status_code == 200
    assert httpx.get(server.url + "/metrics", timeout=30).status_code == 200


def test_openapi_documents_the_request_bodies(server):
    document = httpx.get(server.url + "/openapi.json", headers=server.headers, timeout=30).json()
    schemas = document["components"]["schemas"]
    for path, model, field in [("/v1/completions", "CompletionRequest", "prompt"),
                               ("/v1/chat/completions", "ChatCompletionRequest", "messages"),
                               ("/tokenize", "TokenizeRequest", "prompt"),
                               ("/detokenize", "DetokenizeRequest", "tokens")]:
        body = document["paths"][path]["post"]["requestBody"]
        assert body["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{model}"}
        assert field in schemas[model]["properties"]
    assert "ChatMessage" in schemas and "ErrorResponse" in schemas
    refs = {value for value in _walk(document) if isinstance(value, str) and value.startswith("#/components/")}
    assert all(ref.rsplit("/", 1)[1] in schemas for ref in refs), refs  # no dangling reference


def _walk(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from _walk(item)
    elif isinstance(value, list):
        for item in value:
            yield from _walk(item)
    else:
        yield value


def test_errors_name_the_field_the_client_sent(server):
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    assert_error(post(server, "/v1/chat/completions", {**chat, "max_completion_tokens": 10_000}), 400,
                 param="max_completion_tokens", code="context_length_exceeded")
    assert_error(post(server, "/v1/chat/completions", {**chat, "max_completion_tokens": 0}), 400,
                 param="max_completion_tokens")
    assert_error(post(server, "/v1/chat/completions", {**chat, "max_tokens": 10_000}), 400, param="max_tokens",
                 code="context_length_exceeded")
    for seed in (2**64, -(2**63) - 1):
        error = assert_error(post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1,
                                                              "seed": seed}), 400, param="seed")
        assert "internal" not in error["message"]
    assert post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1,
                                            "seed": 2**63 - 1}).status_code == 200
    assert_still_serving(server)
