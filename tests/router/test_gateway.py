"""The gateway against scriptable backends: retries before the first byte (at most one after a failure), the
circuit breaker, answers the request caused (never retried nor held against a backend), 429s, a stream broken
midway, a stream closed after [DONE], 503 when nothing can serve, bad input, API keys. The router is a real
`serval route` process; the backends are scripted because a real engine cannot be made to fail on command
(tests/e2e has the rest)."""
import time

import httpx
import pytest

from tests.e2e.router_support import RouterProcess, ScriptedBackend

KEY = "sk-router"
HEADERS = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def third():
    """A third backend, in the "trio" group only (it serves another model name)."""
    backend = ScriptedBackend(model="other")
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def setup(third):
    flaky, good = ScriptedBackend(), ScriptedBackend()
    config = {
        "backends": [{"name": "flaky", "url": flaky.url, "models": ["stub"]},
                     {"name": "good", "url": good.url, "models": ["stub"]},
                     {"name": "third", "url": third.url, "models": ["other"]}],
        "models": [{"name": "stub", "policy": "round_robin", "aliases": ["gpt-4o-mini"]},
                   {"name": "only-flaky", "backends": ["flaky"], "policy": "round_robin"},
                   {"name": "least", "backends": ["flaky", "good"], "policy": "least_requests"},
                   {"name": "trio", "backends": ["flaky", "good", "third"], "policy": "round_robin"}],
        "health_check": {"interval_s": 0.3, "timeout_s": 1},
        "breaker": {"failure_threshold": 2, "cooldown_s": 3},
        "retries": 2, "api_keys": [KEY], "max_body_bytes": 1_000_000}
    router = RouterProcess(config)
    yield router, flaky, good
    router.close()
    flaky.close()
    good.close()


@pytest.fixture
def client(setup, third):
    router, flaky, good = setup
    for backend in (flaky, good, third):
        backend.mode, backend.error_type, backend.retry_after = "ok", "x", None
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


def _breakers_closed(router) -> bool:
    return all(router.metric("serval:router_breaker_state", backend=name) == 0 for name in ("flaky", "good", "third"))


@pytest.mark.parametrize("status", [500, 400, 422])
def test_requests_that_break_backends_are_neither_retried_nor_held_against_them(setup, client, third, status):
    """A bad request must not take the fleet down: what the request caused (any 4xx, or a 5xx whose body says
    invalid_request_error) is answered at once from the one backend it reached, and no breaker moves."""
    router, flaky, good = setup
    for backend in (flaky, good, third):
        backend.mode, backend.error_type = f"status:{status}", "invalid_request_error"
    seen_before = len(flaky.requests) + len(good.requests) + len(third.requests)
    retries_before = router.metric("serval:router_retries_total", model="trio")
    bad = 6  # three times the breaker's threshold on every backend, were they counted
    for index in range(bad):
        response = client.post("/v1/completions", json={"model": "trio", "prompt": f"bad {index}"})
        assert response.status_code == status
        assert response.json()["error"] == {"message": f"scripted {status}", "type": "invalid_request_error",
                                             "param": None, "code": None}
    assert len(flaky.requests) + len(good.requests) + len(third.requests) - seen_before == bad  # one try each
    assert router.metric("serval:router_retries_total", model="trio") == retries_before
    assert _breakers_closed(router)
    for backend in (flaky, good, third):
        backend.mode = "ok"
    for index in range(3):  # every backend serves the next good requests
        response = client.post("/v1/completions", json={"model": "trio", "prompt": f"good {index}"})
        assert response.status_code == 200 and response.json()["choices"][0]["text"] == " tok tok tok"
    assert _breakers_closed(router)


def test_a_backend_failure_is_retried_once_then_answered_with_that_backends_error(setup, client, third):
    router, flaky, good = setup
    for backend in (flaky, good, third):
        backend.mode = "status:500"  # a server_error-like body: the backend's fault
    seen_before = len(flaky.requests) + len(good.requests) + len(third.requests)
    response = client.post("/v1/completions", json={"model": "trio", "prompt": "p"})
    assert len(flaky.requests) + len(good.requests) + len(third.requests) - seen_before == 2
    assert response.status_code == 500 and response.json()["error"]["message"] == "scripted 500"
    assert response.headers["x-serval-backend"] in ("flaky", "good", "third")
    for backend in (flaky, good, third):
        backend.mode = "ok"
    assert client.post("/v1/completions", json={"model": "trio", "prompt": "p"}).status_code == 200


def test_when_every_backend_is_overloaded_the_429_carries_retry_after(setup, client):
    router, flaky, good = setup
    flaky.mode = good.mode = "status:429"
    response = client.post("/v1/completions", json={"model": "stub", "prompt": "p"})
    assert response.status_code == 429 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["message"] == "scripted 429"
    flaky.retry_after = good.retry_after = "7"  # the backend's own Retry-After is relayed
    response = client.post("/v1/completions", json={"model": "stub", "prompt": "p"})
    assert response.status_code == 429 and response.headers["retry-after"] == "7"
    assert router.metric("serval:router_breaker_state", backend="flaky") == 0
    assert router.metric("serval:router_breaker_state", backend="good") == 0


def test_a_client_that_closes_right_after_done_is_a_finished_stream_not_a_disconnect(setup, client):
    router, flaky, _ = setup
    success_before = router.metric("serval:router_requests_total", backend="flaky", outcome="success")
    gone_before = router.metric("serval:router_requests_total", backend="flaky", outcome="client_disconnect")
    flaky.hold("linger")  # the backend keeps its response open after [DONE]
    try:
        with client.stream("POST", "/v1/completions", json={"model": "only-flaky", "prompt": "p",
                                                            "stream": True}) as response:
            received = b""
            for chunk in response.iter_raw():
                received += chunk
                if received.endswith(b"data: [DONE]\n\n"):
                    break  # leaving the block closes the connection before the response has ended
        _wait(lambda: router.metric("serval:router_requests_total", backend="flaky", outcome="success")
              > success_before, timeout=10)
        assert router.metric("serval:router_requests_total", backend="flaky",
                             outcome="client_disconnect") == gone_before
        assert router.metric("serval:router_backend_in_flight", backend="flaky") == 0
    finally:
        flaky.release_held()


@pytest.mark.parametrize("body, param", [
    (b'{"model": "stub\\ud800", "prompt": "p"}', "model"),
    (b'{"model": "stub", "prompt": "a \\udfff b"}', "prompt"),
    (b'{"model": "stub", "messages": [{"role": "user", "content": "\\ud83d"}]}', "messages[0].content"),
    (b'{"model": "stub", "prompt": "p", "temperature": NaN}', None),
    (b'{"model": "stub", "prompt": "p", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None),
    (b"\xff\xfe{}", None),
], ids=["surrogate-in-model", "surrogate-in-prompt", "surrogate-in-message", "nan", "deep-nesting", "not-utf8"])
def test_unencodable_or_pathological_bodies_get_a_400_json_error(setup, client, body, param):
    router, flaky, good = setup
    seen_before = len(flaky.requests) + len(good.requests)
    response = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
    assert len(flaky.requests) + len(good.requests) == seen_before  # refused before any backend saw it
    assert httpx.get(router.url + "/health").status_code == 200
    assert client.post("/v1/completions", json={"model": "stub", "prompt": "p"}).status_code == 200


def test_a_body_over_the_limit_gets_413_before_any_backend_sees_it(setup, client):
    router, flaky, good = setup
    seen_before = len(flaky.requests) + len(good.requests)
    response = client.post("/v1/completions", json={"model": "stub", "prompt": "p" * 1_000_001})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    assert len(flaky.requests) + len(good.requests) == seen_before
    assert client.post("/v1/completions", json={"model": "stub", "prompt": "p"}).status_code == 200
