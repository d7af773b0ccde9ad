"""Issue 13 on the wire: hostile and careless requests against real `serval serve` processes.

One test (or a few) per defect class that lives in the HTTP path. Each asserts the status and OpenAI's error body,
and that the server is unharmed afterwards: /health answers 200, the next ordinary request succeeds and the idle
gauges (`serval:num_requests_running`, `serval:num_requests_waiting`) return to 0.

`HOSTILE` is the catalogue of malformed requests with the status each must get; benchmarks/probe.py sends it too.
"""
from __future__ import annotations

import json
import signal
import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest

from tests.e2e.server import API_KEY, RemoteServer, tiny_model_dir

MODEL = "tiny"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
JSON = {"content-type": "application/json"}
CHAT = [{"role": "user", "content": "Say something."}]
BODY_LIMIT = 2_000_000


def vocab_size() -> int:
    with open(f"{tiny_model_dir()}/config.json") as f:
        return json.load(f)["vocab_size"]


@dataclass
class Probe:
    """One hostile request and the status it must get. `body` is raw bytes: the point is often that it is not
    what a JSON library would write."""
    name: str
    path: str
    body: bytes
    status: int
    param: str | None = None  # the error's param, when the issue requires one
    headers: dict = field(default_factory=dict)


def _json(value) -> bytes:
    return json.dumps(value).encode()


def hostile_catalogue(vocab: int) -> list[Probe]:
    """The malformed and hostile requests of issue 13 that get a 4xx: OpenAI's error body, never a 5xx."""
    completion = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    chat = {"model": MODEL, "messages": CHAT, "max_tokens": 2}
    deep = b"[" * 100_000 + b"]" * 100_000
    return [
        # 1: token ids past the vocabulary, wherever a request can carry one
        Probe("stop id = vocab, min_tokens 1", "/v1/completions",
              _json({**completion, "stop_token_ids": [vocab], "min_tokens": 1}), 400, "stop_token_ids"),
        Probe("stop id far past vocab, chat", "/v1/chat/completions",
              _json({**chat, "stop_token_ids": [vocab + 10**6], "min_tokens": 1}), 400, "stop_token_ids"),
        Probe("logit_bias id past vocab", "/v1/completions", _json({**completion, "logit_bias": {str(vocab): 5}}),
              400, "logit_bias"),
        Probe("allowed_token_ids past vocab", "/v1/completions",
              _json({**completion, "allowed_token_ids": [vocab + 1]}), 400, "allowed_token_ids"),
        Probe("prompt id past vocab", "/v1/completions", _json({**completion, "prompt": [1, vocab]}), 400, "prompt"),
        Probe("prompt ids past vocab, batch", "/v1/completions",
              _json({**completion, "prompt": [[1, 2], [vocab + 5]]}), 400, "prompt"),
        Probe("detokenize id past vocab", "/detokenize", _json({"model": MODEL, "tokens": [vocab]}), 400, "tokens"),
        # 5: input that used to be a 500
        Probe("deep nesting", "/v1/completions", b'{"model": "tiny", "prompt": ' + deep + b"}", 400),
        Probe("deep nesting, objects", "/v1/chat/completions", b'{"a":' * 50_000 + b"1" + b"}" * 50_000, 400),
        Probe("lone surrogate in content", "/v1/chat/completions",
              b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800b"}]}', 400),
        Probe("lone surrogate in model", "/v1/completions", b'{"model": "\\udfff", "prompt": "hi"}', 400, "model"),
        Probe("lone surrogate in tokenize", "/tokenize", b'{"model": "tiny", "prompt": "\\ud83d"}', 400),
        Probe("negative prompt ids", "/v1/completions", _json({**completion, "prompt": [5, -1]}), 400, "prompt"),
        Probe("negative detokenize ids", "/detokenize", _json({"tokens": [-7]}), 400, "tokens"),
        Probe("invalid JSON", "/v1/completions", b'{"prompt": "hi",', 400),
        Probe("not UTF-8", "/v1/completions", b'{"prompt": "\xff\xfe"}', 400),
        Probe("body not an object", "/v1/chat/completions", b"[1, 2, 3]", 400),
        Probe("integer too long", "/v1/completions", b'{"prompt": "hi", "seed": ' + b"9" * 5000 + b"}", 400),
        # 10: n
        Probe("n = 50000", "/v1/completions", _json({**completion, "n": 50_000}), 400, "n"),
        Probe("n = 129", "/v1/chat/completions", _json({**chat, "n": 129}), 400, "n"),
        Probe("n = 0", "/v1/completions", _json({**completion, "n": 0}), 400, "n"),
        # 12: lax types, non-finite numbers, seed, the chat token limit's name
        Probe("max_tokens true", "/v1/completions", _json({**completion, "max_tokens": True}), 400, "max_tokens"),
        Probe("stream 'yes'", "/v1/completions", _json({**completion, "stream": "yes"}), 400, "stream"),
        Probe("temperature '0.5'", "/v1/chat/completions", _json({**chat, "temperature": "0.5"}), 400,
              "temperature"),
        Probe("temperature Infinity", "/v1/completions", b'{"prompt": "hi", "temperature": Infinity}', 400),
        Probe("top_p NaN", "/v1/chat/completions",
              b'{"messages": [{"role": "user", "content": "x"}], "top_p": NaN}', 400),
        Probe("temperature 1e999", "/v1/completions", b'{"prompt": "hi", "temperature": 1e999}', 400),
        Probe("seed 2**64", "/v1/completions", _json({**completion, "seed": 2**64}), 400, "seed"),
        Probe("seed -2**63-1", "/v1/chat/completions", _json({**chat, "seed": -2**63 - 1}), 400, "seed"),
        Probe("max_completion_tokens true", "/v1/chat/completions",
              _json({"messages": CHAT, "max_completion_tokens": True}), 400, "max_completion_tokens"),
        Probe("max_completion_tokens past the context", "/v1/chat/completions",
              _json({"messages": CHAT, "max_completion_tokens": 100_000}), 400, "max_completion_tokens"),
        Probe("max_completion_tokens 0", "/v1/chat/completions",
              _json({"messages": CHAT, "max_completion_tokens": 0}), 400, "max_completion_tokens"),
        # 4: the body limit and the key
        Probe("body over the limit", "/v1/completions", b'{"prompt": "' + b"a" * (BODY_LIMIT + 10) + b'"}', 413),
        Probe("tokenize without key", "/tokenize", _json({"prompt": "hi"}), 401, headers={"Authorization": ""}),
        Probe("detokenize without key", "/detokenize", _json({"tokens": [1]}), 401, headers={"Authorization": ""}),
        Probe("wrong key", "/v1/completions", _json(completion), 401, headers={"Authorization": "Bearer nope"}),
    ]


def send(url: str, probe: Probe, timeout: float = 60) -> httpx.Response:
    headers = {**JSON, **AUTH, **probe.headers}
    headers = {k: v for k, v in headers.items() if v}
    return httpx.post(url + probe.path, content=probe.body, headers=headers, timeout=timeout)


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, (response.status_code, response.text[:500])
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    if param is not None:
        assert (error["param"] or "").split(".")[0].split("[")[0] == param, error
    return error


def assert_unharmed(server: RemoteServer) -> None:
    """/health 200, an ordinary request succeeds, and nothing is left running or waiting."""
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200
    response = httpx.post(server.url + "/v1/completions", headers=AUTH, timeout=60,
                          json={"model": MODEL, "prompt": "hello", "max_tokens": 3, "ignore_eos": True})
    assert response.status_code == 200, response.text[:500]
    assert response.json()["usage"]["completion_tokens"] == 3
    assert server.wait_idle(), "requests still running or waiting"


class HealthWatch:
    """Polls /health on a thread while something else runs; every answer must be 200."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self.url, self.timeout = url, timeout
        self.statuses: list[int | str] = []
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._first_answer = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=self.timeout) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    self.statuses.append(client.get(self.url + "/health").status_code)
                except httpx.HTTPError as error:
                    self.statuses.append(type(error).__name__)
                self.latencies.append(time.monotonic() - started)
                self._first_answer.set()
                self._stop.wait(0.05)

    def __enter__(self) -> "HealthWatch":
        # Polling before the watched work starts: a fast refusal (413 on Content-Length) could otherwise end
        # before the thread's first request, leaving nothing to check.
        self._thread.start()
        self._first_answer.wait(self.timeout)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def server():
    remote = RemoteServer(["--model", tiny_model_dir(), "--max-model-len", "512", "--served-model-name", MODEL,
                           "--max-request-body-bytes", str(BODY_LIMIT), "--max-num-seqs", "8"], api_key=API_KEY)
    yield remote
    remote.close()


# Names only (the vocabulary is read when a test runs, so collecting this file builds no model).
CATALOGUE_NAMES = [probe.name for probe in hostile_catalogue(vocab=0)]


@pytest.mark.parametrize("name", CATALOGUE_NAMES)
def test_hostile_request_gets_openais_error(server, name):
    probe = next(p for p in hostile_catalogue(vocab_size()) if p.name == name)
    assert_openai_error(send(server.url, probe), probe.status, probe.param)


def test_server_is_unharmed_after_the_catalogue(server):
    for probe in hostile_catalogue(vocab_size()):
        send(server.url, probe)
    assert_unharmed(server)


# ---------------------------------------------------------------- 1: token ids the engine could not index
def test_stop_id_past_vocab_with_min_tokens_does_not_kill_the_engine(server):
    vocab = vocab_size()
    for stop_id in (vocab, vocab + 1, 2**31, 2**63):
        response = httpx.post(server.url + "/v1/completions", headers=AUTH, timeout=60, json={
            "model": MODEL, "prompt": "hi", "max_tokens": 4, "min_tokens": 1, "stop_token_ids": [stop_id]})
        assert_openai_error(response, 400, "stop_token_ids")
    # The largest id the vocabulary holds is fine.
    response = httpx.post(server.url + "/v1/completions", headers=AUTH, timeout=60, json={
        "model": MODEL, "prompt": "hi", "max_tokens": 4, "min_tokens": 1, "stop_token_ids": [vocab - 1],
        "logit_bias": {str(vocab - 1): -1}})
    assert response.status_code == 200, response.text[:500]
    assert_unharmed(server)


def test_streamed_request_with_bad_ids_is_refused_before_the_stream(server):
    response = httpx.post(server.url + "/v1/chat/completions", headers=AUTH, timeout=60, json={
        "model": MODEL, "messages": CHAT, "max_tokens": 4, "min_tokens": 2, "stream": True,
        "stop_token_ids": [vocab_size() + 3]})
    assert_openai_error(response, 400, "stop_token_ids")
    assert_unharmed(server)


# ---------------------------------------------------------------- 4: big bodies, the key on every endpoint
def test_ten_megabyte_body_is_413_while_health_answers(server):
    body = b'{"model": "tiny", "prompt": "' + b"x " * 5_000_000 + b'"}'
    with HealthWatch(server.url) as watch:
        response = httpx.post(server.url + "/v1/completions", content=body, headers={**JSON, **AUTH}, timeout=60)
    assert_openai_error(response, 413)
    assert watch.statuses and set(watch.statuses) == {200}, watch.statuses
    assert_unharmed(server)


def test_chunked_body_over_the_limit_is_413(server):
    def chunks():  # no Content-Length: only counting the bytes as they come can stop it
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(100):
            yield b"y" * 100_000
        yield b'"}'
    try:
        response = httpx.post(server.url + "/v1/completions", content=chunks(), headers={**JSON, **AUTH}, timeout=60)
    except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
        response = None  # the server answered and closed before the upload ended: the limit held
    if response is not None:
        assert_openai_error(response, 413)
    assert_unharmed(server)


def test_a_large_body_under_the_limit_does_not_block_health(server):
    # 1.9 MB of text: parsed and tokenized off the event loop, then refused for the context length.
    prompt = "lorem ipsum dolor sit amet " * 70_000
    with HealthWatch(server.url) as watch:
        response = httpx.post(server.url + "/v1/completions", headers=AUTH, timeout=120,
                              json={"model": MODEL, "prompt": prompt, "max_tokens": 1})
    assert_openai_error(response, 400, "prompt")
    assert watch.statuses and set(watch.statuses) == {200}, watch.statuses
    assert_unharmed(server)


@pytest.mark.parametrize("method, path, body", [
    ("POST", "/tokenize", {"model": MODEL, "prompt": "hi"}), ("POST", "/detokenize", {"model": MODEL, "tokens": [1]}),
    ("GET", "/v1/models", None), ("POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 1}),
    ("POST", "/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 1})])
def test_every_endpoint_but_health_needs_the_key(server, method, path, body):
    error = assert_openai_error(httpx.request(method, server.url + path, json=body, timeout=60), 401)
    assert error["code"] == "invalid_api_key"
    assert httpx.request(method, server.url + path, json=body, headers=AUTH, timeout=60).status_code == 200
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200


# ---------------------------------------------------------------- 5: HTTP 500 for user input
def test_lone_surrogates_are_400_naming_the_field(server):
    model = send(server.url, Probe("", "/v1/chat/completions",
                                   b'{"model": "\\ud800", "messages": [{"role": "user", "content": "x"}]}', 400))
    assert_openai_error(model, 400, "model")
    content = send(server.url, Probe("", "/v1/chat/completions",
                                     b'{"messages": [{"role": "user", "content": "x\\udc00"}]}', 400))
    assert "messages" in (assert_openai_error(content, 400)["param"] or "")
    # A surrogate pair is text, not an error.
    pair = send(server.url, Probe("", "/v1/chat/completions",
                                  b'{"messages": [{"role": "user", "content": "\\ud83d\\ude00"}], "max_tokens": 1}',
                                  200))
    assert pair.status_code == 200, pair.text[:500]
    assert_unharmed(server)


# ---------------------------------------------------------------- 6: structured output past the grammar's limits
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("constraint", [
    {"choice": [f"option number {i}" for i in range(10_000)]}, {"regex": "a{1000}{1000}"}],
    ids=["choice-10000", "regex-a1000-1000"])
def test_constraint_past_the_grammar_limits_never_ends_in_stop(server, constraint, stream):
    body = {"model": MODEL, "prompt": "Pick:", "max_tokens": 8, "structured_outputs": constraint, "stream": stream}
    response = httpx.post(server.url + "/v1/completions", headers=AUTH, json=body, timeout=120)
    if response.status_code != 200:
        error = assert_openai_error(response, 400)
        assert error["param"] is None or error["param"].startswith("structured_outputs")
    else:
        # Found after the stream began: an error event, and never finish_reason "stop" with text that doesn't match.
        assert stream, response.text[:500]
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        payloads = [json.loads(event) for event in events[:-1]]
        assert any("error" in payload for payload in payloads), payloads[-3:]
        assert all(choice.get("finish_reason") != "stop" for payload in payloads
                   for choice in payload.get("choices", []))
    assert max(len(line) for line in server.log_text().splitlines()) < 20_000, "a log line holds the grammar"
    assert_unharmed(server)


def test_a_small_choice_still_matches(server):
    choices = ["red", "green", "blue"]
    response = httpx.post(server.url + "/v1/completions", headers=AUTH, timeout=120, json={
        "model": MODEL, "prompt": "Pick:", "max_tokens": 8, "structured_outputs": {"choice": choices}})
    assert response.status_code == 200, response.text[:500]
    assert response.json()["choices"][0]["text"] in choices


# ---------------------------------------------------------------- 10: n
def test_n_past_the_bound_is_400_and_n_128_is_served_without_stalling_health(server):
    assert_openai_error(httpx.post(server.url + "/v1/completions", headers=AUTH, timeout=60, json={
        "model": MODEL, "prompt": "hi", "max_tokens": 1, "n": 50_000}), 400, "n")
    with HealthWatch(server.url) as watch:
        response = httpx.post(server.url + "/v1/completions", headers=AUTH, timeout=300, json={
            "model": MODEL, "prompt": "hi", "max_tokens": 2, "n": 128, "ignore_eos": True})
    assert response.status_code == 200, response.text[:500]
    choices = response.json()["choices"]
    assert sorted(choice["index"] for choice in choices) == list(range(128))
    assert watch.statuses and set(watch.statuses) == {200}, watch.statuses
    assert_unharmed(server)


# ---------------------------------------------------------------- 12: the smaller ones
@pytest.mark.parametrize("header", [f"bearer {API_KEY}", f"Bearer  {API_KEY}", f"BEARER {API_KEY}",
                                    f"Bearer \t {API_KEY}"])
def test_bearer_forms_the_policy_keys_accept(server, header):
    assert httpx.get(server.url + "/v1/models", headers={"Authorization": header}, timeout=30).status_code == 200


def test_key_errors_have_one_type_and_code(server):
    missing = assert_openai_error(httpx.get(server.url + "/v1/models", timeout=30), 401)
    wrong = assert_openai_error(httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer x"},
                                          timeout=30), 401)
    assert (missing["type"], missing["code"]) == (wrong["type"], wrong["code"]) == ("authentication_error",
                                                                                    "invalid_api_key")


def test_openapi_has_the_request_schemas(server):
    spec = httpx.get(server.url + "/openapi.json", headers=AUTH, timeout=30).json()
    for path, name in (("/v1/completions", "CompletionRequest"), ("/v1/chat/completions", "ChatCompletionRequest")):
        body = spec["paths"][path]["post"].get("requestBody")
        assert body is not None, f"{path} has no request schema"
        assert name in json.dumps(body)
    assert "CompletionRequest" in spec.get("components", {}).get("schemas", {})


# ---------------------------------------------------------------- 12: the queue-full 429, and 9: SIGTERM
def _stream_events(url: str, body: dict, out: list, headers: dict | None = None) -> None:
    """Read a stream's data lines into `out` (and the exception, if the connection breaks)."""
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=headers or {}, timeout=120) as response:
            out.append(response.status_code)
            if response.status_code != 200:  # refused before its stream began: keep the error body
                out.append(response.read().decode())
                return
            for line in response.iter_lines():
                if line.startswith("data: "):
                    out.append(line[6:])
    except httpx.HTTPError as error:
        out.append(error)


def test_queue_full_429_has_retry_after():
    remote = RemoteServer(["--model", tiny_model_dir(), "--max-model-len", "512", "--served-model-name", MODEL,
                           "--max-num-seqs", "1", "--max-waiting-requests", "1"])
    try:
        body = {"model": MODEL, "prompt": "queue", "max_tokens": 100, "ignore_eos": True}
        results: list[httpx.Response] = []
        threads = [threading.Thread(target=lambda: results.append(
            httpx.post(remote.url + "/v1/completions", json=body, timeout=120))) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        refused = [r for r in results if r.status_code == 429]
        assert refused and {r.status_code for r in results} == {200, 429}
        for response in refused:
            assert_openai_error(response, 429)
            assert int(response.headers["retry-after"]) >= 1
        assert_unharmed_open(remote)
    finally:
        remote.close()


def assert_unharmed_open(server: RemoteServer) -> None:
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200
    response = httpx.post(server.url + "/v1/completions", timeout=60,
                          json={"model": MODEL, "prompt": "hello", "max_tokens": 2})
    assert response.status_code == 200, response.text[:500]
    assert server.wait_idle()


def _was_refused(events: list) -> bool:
    """A request the drain ended before its stream began: a 503 with OpenAI's error body."""
    return len(events) == 2 and events[0] == 503 and "error" in json.loads(events[1])


def _ended_properly(events: list) -> bool:
    """A stream that either completed (a finish_reason, then [DONE]) or was ended with an error event and
    [DONE], or a request refused with 503 before its stream began."""
    if _was_refused(events):
        return True
    if not events or events[0] != 200 or events[-1] != "[DONE]":
        return False
    payloads = [json.loads(event) for event in events[1:-1]]
    finished = any(choice.get("finish_reason") for payload in payloads for choice in payload.get("choices", []))
    errored = any("error" in payload for payload in payloads)
    return finished or errored


def test_sigterm_drains_streams_refuses_new_requests_and_exits_zero():
    remote = RemoteServer(["--model", tiny_model_dir(), "--max-model-len", "1024", "--served-model-name", MODEL,
                           "--max-num-seqs", "1", "--shutdown-timeout", "3"])
    streams: list[list] = [[] for _ in range(3)]
    try:
        # One sequence at a time and 3 x 1000 tokens: more than the 3 s drain can finish.
        body = {"model": MODEL, "prompt": "drain", "max_tokens": 1000, "ignore_eos": True, "stream": True}
        threads = [threading.Thread(target=_stream_events, args=(remote.url, body, out)) for out in streams]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while len(streams[0]) < 3 and time.monotonic() < deadline:  # the first stream is under way
            time.sleep(0.05)
        remote.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        refused = httpx.post(remote.url + "/v1/completions", timeout=30,
                             json={"model": MODEL, "prompt": "late", "max_tokens": 2})
        assert_openai_error(refused, 503)
        health = httpx.get(remote.url + "/health", timeout=30)
        assert health.status_code == 503  # load balancers stop sending during the drain
        for thread in threads:
            thread.join(timeout=60)
        status = remote.process.wait(timeout=60)
        log = remote.log_text()
    finally:
        remote.close()
    assert status == 0, log[-3000:]
    for events in streams:
        assert _ended_properly(events), (events[:2], events[-3:], log[-3000:])
    interrupted = [events for events in streams
                   if _was_refused(events) or any("error" in json.loads(e) for e in events[1:-1])]
    assert interrupted, "3 x 1000 tokens one at a time finished inside a 3 s drain: the test proves nothing"
    assert "drain" in log


def test_sigterm_lets_a_short_stream_complete():
    remote = RemoteServer(["--model", tiny_model_dir(), "--max-model-len", "512", "--served-model-name", MODEL,
                           "--shutdown-timeout", "30"])
    events: list = []
    try:
        body = {"model": MODEL, "prompt": "short", "max_tokens": 40, "ignore_eos": True, "stream": True}
        thread = threading.Thread(target=_stream_events, args=(remote.url, body, events))
        thread.start()
        deadline = time.monotonic() + 60
        while len(events) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        remote.process.send_signal(signal.SIGTERM)
        thread.join(timeout=60)
        status = remote.process.wait(timeout=60)
    finally:
        remote.close()
    assert status == 0
    payloads = [json.loads(event) for event in events[1:-1]]
    assert events[-1] == "[DONE]" and not any("error" in payload for payload in payloads)
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(p["choices"][0]["text"] for p in payloads) != ""


# ---------------------------------------------------------------- 3, 5, 12 behind the router
# The catalogue's cases that don't depend on the server's flags: the router must answer each with OpenAI's body
# (its own 400 or the backend's, relayed), never retry it nor count it against the backend.
ROUTER_CASES = ["stop id = vocab, min_tokens 1", "logit_bias id past vocab", "prompt id past vocab", "deep nesting",
                "deep nesting, objects", "lone surrogate in content", "lone surrogate in model", "negative prompt ids",
                "invalid JSON", "not UTF-8", "body not an object", "integer too long", "n = 50000", "max_tokens true",
                "stream 'yes'", "temperature '0.5'", "temperature Infinity", "top_p NaN", "temperature 1e999",
                "seed 2**64", "max_completion_tokens true", "wrong key"]


@pytest.fixture(scope="module")
def router(server):
    from tests.e2e.router_support import RouterProcess
    config = {"backends": [{"name": "a", "url": server.url, "models": [MODEL], "engine": "serval",
                            "api_key": API_KEY}],
              "models": [{"name": MODEL, "backends": ["a"], "policy": "round_robin"}],
              "api_keys": [API_KEY], "health_check": {"interval_s": 0.5}}
    process = RouterProcess(config)
    yield process
    process.close()


@pytest.mark.parametrize("name", ROUTER_CASES)
def test_router_answers_hostile_requests_with_openais_error(router, name):
    probe = next(p for p in hostile_catalogue(vocab_size()) if p.name == name)
    assert_openai_error(send(router.url, probe), probe.status, probe.param)


def test_router_keeps_the_backend_after_request_faults(router, server):
    for _ in range(3):  # more than enough to open a breaker if these counted as the backend's failures
        for name in ROUTER_CASES:
            send(router.url, next(p for p in hostile_catalogue(vocab_size()) if p.name == name))
    for header in (f"bearer {API_KEY}", f"Bearer  {API_KEY}"):
        response = httpx.post(router.url + "/v1/completions", timeout=60, headers={"Authorization": header},
                              json={"model": MODEL, "prompt": "hello", "max_tokens": 2})
        assert response.status_code == 200, response.text[:500]
    assert httpx.get(router.url + "/health", timeout=30).status_code == 200
    assert_unharmed(server)
