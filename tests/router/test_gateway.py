"""The gateway against scriptable backends: retries before the first byte, the circuit breaker, 429s, a stream
broken midway, 503 when nothing can serve, bad input, API keys. The router is a real `serval route` process;
the backends are scripted because a real engine cannot be made to fail on command (tests/e2e has the rest)."""
import time

import httpx
import pytest

from tests.e2e.router_support import RouterProcess, ScriptedBackend

KEY = "sk-router"
HEADERS = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def setup():
    flaky, good = ScriptedBackend(), ScriptedBackend()
    config = {
        "backends": [{"name": "flaky", "url": flaky.url, "models": ["stub"]},
                     {"name": "good", "url": good.url, "models": ["stub"]}],
        "models": [{"name": "stub", "policy": "round_robin", "aliases": ["gpt-4o-mini"]},
                   {"name": "only-flaky", "backends": ["flaky"], "policy": "round_robin"},
                   {"name": "least", "backends": ["flaky", "good"], "policy": "least_requests"}],
        "health_check": {"interval_s": 0.3, "timeout_s": 1},
        "breaker": {"failure_threshold": 2, "cooldown_s": 3},
        "retries": 2, "api_keys": [KEY]}
    router = RouterProcess(config)
    yield router, flaky, good
    router.close()
    flaky.close()
    good.close()


@pytest.fixture
def client(setup):
    router, flaky, good = setup
    flaky.mode = good.mode = "ok"
    with httpx.Client(base_url=router.url, headers=HEADERS, timeout=30) as client:
        _wait(lambda: router.metric("serval:router_breaker_state", backend="flaky") == 0
              and router.metric("serval:router_backend_healthy", backend="flaky") == 1, timeout=30,
              tick=lambda: client.post("/v1/completions", json={"model": "stub", "prompt": "p"}))
        yield client


def _wait(condition, timeout: float, tick=None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        if tick is not None:
            tick()
        time.sleep(0.1)


def _stream(client, body) -> tuple[int, str]:
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        return response.status_code, response.read().decode()


def test_streams_are_relayed_chunk_by_chunk_and_least_requests_avoids_the_busy_backend(setup, client):
    router, flaky, good = setup
    flaky.hold()
    good.hold()  # streams stop after their first chunk until released
    try:
        with client.stream("POST", "/v1/completions", json={"model": "least", "prompt": "p", "stream": True}) as held:
            busy = held.headers["x-serval-backend"]
            chunks = held.iter_raw()  # kept: a dropped iterator would close the stream
            first = next(chunks)  # arrives while the backend still holds the rest: nothing buffered
            assert first.startswith(b"data: ") and b" tok0" in first
            assert router.metric("serval:router_backend_in_flight", backend=busy) == 1
            others = {client.post("/v1/completions", json={"model": "least", "prompt": "q"}).headers[
                "x-serval-backend"] for _ in range(3)}
            assert others == {"flaky", "good"} - {busy}
            flaky.release_held()
            good.release_held()
            rest = b"".join(chunks).decode()
        assert " tok2" in rest and rest.endswith("data: [DONE]\n\n")
    finally:
        flaky.release_held()
        good.release_held()


def test_failures_before_the_first_byte_are_retried_on_another_backend(setup, client):
    router, flaky, good = setup
    flaky.mode = "status:500"
    before = router.metric("serval:router_retries_total", model="stub")
    for index in range(4):
        body = {"model": "stub", "prompt": f"hello {index}"}
        response = client.post("/v1/completions", json=body)
        assert response.status_code == 200 and response.headers["x-serval-backend"] == "good"
        status, text = _stream(client, body)
        assert status == 200 and text.endswith("data: [DONE]\n\n") and "error" not in text
    assert router.metric("serval:router_retries_total", model="stub") > before
    assert router.metric("serval:router_requests_total", backend="flaky", outcome="backend_error") >= 1


def test_breaker_opens_after_failures_and_closes_after_a_good_probe(setup, client):
    router, flaky, _ = setup
    opened_before = router.metric("serval:router_breaker_opened_total", backend="flaky")
    flaky.mode = "status:503"
    _wait(lambda: router.metric("serval:router_breaker_state", backend="flaky") == 1, timeout=10,
          tick=lambda: client.post("/v1/completions", json={"model": "stub", "prompt": "p"}))
    # While open, a group with only that backend answers 503 at once, saying why.
    response = client.post("/v1/completions", json={"model": "only-flaky", "prompt": "p"})
    assert response.status_code == 503
    assert "circuit breaker open" in response.json()["error"]["message"]
    assert response.json()["error"]["code"] == "no_backend_available"
    flaky.mode = "ok"  # recovered: after the cooldown one probe goes through and closes the breaker
    _wait(lambda: router.metric("serval:router_breaker_state", backend="flaky") == 0, timeout=30,
          tick=lambda: client.post("/v1/completions", json={"model": "stub", "prompt": "p"}))
    assert router.metric("serval:router_breaker_opened_total", backend="flaky") == opened_before + 1
    assert client.post("/v1/completions", json={"model": "only-flaky", "prompt": "p"}).status_code == 200


def test_overloaded_backend_is_skipped_without_opening_its_breaker(setup, client):
    router, flaky, _ = setup
    flaky.mode = "status:429"
    for index in range(6):
        response = client.post("/v1/completions", json={"model": "stub", "prompt": f"p{index}"})
        assert response.status_code == 200 and response.headers["x-serval-backend"] == "good"
    assert router.metric("serval:router_breaker_state", backend="flaky") == 0
    assert router.metric("serval:router_requests_total", backend="flaky", outcome="overloaded") >= 3


def test_client_errors_are_relayed_not_retried(setup, client):
    router, flaky, good = setup
    flaky.mode = "status:400"
    statuses = [client.post("/v1/completions", json={"model": "only-flaky", "prompt": "p"}).status_code
                for _ in range(3)]
    assert statuses == [400] * 3
    assert router.metric("serval:router_breaker_state", backend="flaky") == 0


def test_a_stream_broken_after_its_first_chunk_reports_the_error_in_the_stream(setup, client):
    router, flaky, _ = setup
    flaky.mode = "break"
    status, text = _stream(client, {"model": "only-flaky", "prompt": "p"})
    assert status == 200
    assert text.startswith("data: ") and " tok0" in text
    assert '"code": "backend_failed"' in text and text.endswith("data: [DONE]\n\n")
    assert router.metric("serval:router_requests_total", backend="flaky", outcome="stream_error") >= 1


def test_unhealthy_backend_is_taken_out_and_503_names_the_reason(setup, client):
    router, flaky, good = setup
    flaky.mode = "down"
    _wait(lambda: router.metric("serval:router_backend_healthy", backend="flaky") == 0, timeout=10)
    response = client.post("/v1/completions", json={"model": "only-flaky", "prompt": "p"})
    assert response.status_code == 503 and "unhealthy" in response.json()["error"]["message"]
    served_before = len(flaky.requests)
    for index in range(4):
        assert client.post("/v1/completions", json={"model": "stub", "prompt": f"q{index}"}).status_code == 200
    assert len(flaky.requests) == served_before  # no request was sent to it
    assert httpx.get(router.url + "/health").status_code == 200  # the router still has a backend


def test_aliases_are_rewritten_to_the_backends_model(setup, client):
    _, flaky, good = setup
    response = client.post("/v1/chat/completions", json={
        "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == " tok tok tok"
    backend = flaky if response.headers["x-serval-backend"] == "flaky" else good
    assert backend.requests[-1]["model"] == "stub"


@pytest.mark.parametrize("body, status, param, words", [
    (b"{not json", 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "JSON object"),
    (b'{"model": 5, "prompt": "p"}', 400, "model", "must be a string"),
    (b'{"model": "nope", "prompt": "p"}', 404, "model", "gpt-4o-mini"),
    (b'{"model": "stub", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', 400, "messages",
     "image"),
])
def test_bad_input_gets_openai_errors_and_the_router_stays_up(setup, client, body, status, param, words):
    router, _, _ = setup
    path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
    response = client.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"] and error["type"]
    assert client.post("/v1/completions", json={"model": "stub", "prompt": "p"}).status_code == 200


def test_unknown_routes_methods_and_missing_keys(setup, client):
    router, _, _ = setup
    assert client.post("/v1/embeddings", json={}).json()["error"]["type"] == "not_found_error"
    assert client.get("/v1/completions").status_code == 405
    response = httpx.post(router.url + "/v1/completions", json={"model": "stub", "prompt": "p"})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(router.url + "/v1/models", headers=HEADERS).status_code == 200
