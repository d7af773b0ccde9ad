"""Faults inside the server, through a real process with injected faults (tests/e2e/faulty_serve.py): an
unexpected error answers 500 "internal error" with the request id and logs the details, never sending them; a dead
engine makes /health fail and the process exit non-zero, so a supervisor restarts it."""
import httpx
import pytest

from tests.e2e.faulty_serve import INTERNAL_ERROR_MARKER, KILL_ENGINE_MARKER, SECRET
from tests.e2e.server import RemoteServer, tiny_model_dir

MODEL = "tiny"
ARGS = ["--model", tiny_model_dir(), "--max-model-len", "256", "--served-model-name", MODEL]


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def completion(server: RemoteServer, prompt: str, **extra) -> httpx.Response:
    return httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2,
                                                            **extra}, timeout=60)


@pytest.fixture(scope="module")
def server():
    remote = RemoteServer(ARGS, module="tests.e2e.faulty_serve")
    yield remote
    remote.close()


@pytest.mark.parametrize("stream", [False, True])
def test_an_internal_error_says_internal_error_and_the_request_id_and_logs_the_rest(server, stream):
    response = completion(server, f"please {INTERNAL_ERROR_MARKER}", stream=stream)
    error = assert_openai_error(response, 500)
    assert error["type"] == "server_error" and SECRET not in response.text
    assert error["message"].startswith("internal error") and "cmpl-" in error["message"]
    request_id = error["message"].split("request id ")[1].rstrip(")")
    logged = [record for record in server.log_records() if record.get("request_id") == request_id]
    assert any(SECRET in str(record.get("exception", "")) for record in logged), logged
    assert httpx.get(server.url + "/health").status_code == 200
    assert completion(server, "an ordinary request").status_code == 200


def test_a_dead_engine_fails_health_and_the_process_exits_non_zero():
    remote = RemoteServer(ARGS, module="tests.e2e.faulty_serve")
    try:
        assert completion(remote, "warm up").status_code == 200
        error = assert_openai_error(completion(remote, f"please {KILL_ENGINE_MARKER}"), 503)
        assert SECRET not in error["message"]
        assert remote.process.wait(timeout=120) != 0
        assert any(record.get("message", "").startswith("the engine has stopped") for record in remote.log_records())
    finally:
        remote.close()
