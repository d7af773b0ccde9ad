"""--max-waiting-requests: past the limit the server answers 429 with OpenAI's body, and keeps serving."""
import asyncio

import httpx
import pytest

from tests.e2e.server import RemoteServer, tiny_model_dir

MODEL = "tiny"


@pytest.fixture(scope="module")
def server():
    remote = RemoteServer(["--model", tiny_model_dir(), "--max-model-len", "512", "--served-model-name", MODEL,
                           "--max-num-seqs", "1", "--max-waiting-requests", "1"])
    yield remote
    remote.close()


def test_over_the_waiting_limit_is_429_and_the_rest_complete(server):
    body = {"model": MODEL, "prompt": "queue", "max_tokens": 150, "ignore_eos": True}

    async def burst():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(client.post(server.url + "/v1/completions", json=body) for _ in range(6)))

    responses = asyncio.run(burst())
    statuses = sorted(response.status_code for response in responses)
    assert 429 in statuses and 200 in statuses and set(statuses) == {200, 429}, statuses
    for response in responses:
        if response.status_code == 429:
            error = response.json()["error"]
            assert error["code"] == "rate_limit_exceeded" and "--max-waiting-requests" in error["message"]
            assert int(response.headers["Retry-After"]) >= 1
        else:
            assert response.json()["usage"]["completion_tokens"] == 150
    assert server.wait_idle()
    again = httpx.post(server.url + "/v1/completions", json={**body, "max_tokens": 2}, timeout=60)
    assert again.status_code == 200
