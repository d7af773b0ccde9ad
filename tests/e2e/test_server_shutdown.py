"""SIGTERM drains (--shutdown-timeout): new requests get 503 with OpenAI's body while requests in flight finish;
a stream still open at the deadline ends with an error event and [DONE], and is logged; the process exits 0.

The stream under test is held open by not reading it: its events (n=8, 20 logprobs each) fill the socket buffers
long before it ends, so the server cannot finish it however fast the machine is."""
import json
import signal

import httpx
import pytest

from tests.e2e.server import RemoteServer, tiny_model_dir

MODEL = "tiny"
BIG_STREAM = {"model": MODEL, "messages": [{"role": "user", "content": "stream"}], "max_tokens": 450, "n": 8,
              "logprobs": True, "top_logprobs": 20, "ignore_eos": True, "stream": True}


def start(shutdown_timeout: float) -> RemoteServer:
    return RemoteServer(["--model", tiny_model_dir(), "--max-model-len", "512", "--served-model-name", MODEL,
                         "--shutdown-timeout", str(shutdown_timeout)])


def events(lines) -> list[str]:
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


def assert_refused_while_draining(server: RemoteServer) -> None:
    response = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1},
                          timeout=30)
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "server_error"
    assert httpx.get(server.url + "/health", timeout=30).status_code == 503  # load balancers: stop sending here


@pytest.mark.parametrize("deadline_passes", [False, True])
def test_sigterm_drains_and_exits_zero(deadline_passes):
    server = start(shutdown_timeout=2 if deadline_passes else 120)
    # The drain case reads its stream to the end: two choices outlast the checks made while draining by seconds;
    # the deadline case needs all eight to still be streaming when its 2 s run out.
    body = BIG_STREAM if deadline_passes else {**BIG_STREAM, "n": 2}
    try:
        with httpx.Client(timeout=120) as client, client.stream("POST", server.url + "/v1/chat/completions",
                                                                json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            first = next(lines)
            assert first.startswith("data: ")
            server.process.send_signal(signal.SIGTERM)
            server.wait_for_log("draining")
            assert_refused_while_draining(server)
            if deadline_passes:
                logged = server.wait_for_log("request ended at the shutdown deadline")
                assert logged["request_id"].startswith("chatcmpl-")
            rest = events(lines)
        assert rest[-1] == "[DONE]"
        last = json.loads(rest[-2])
        if deadline_passes:
            assert set(last["error"]) == {"message", "type", "param", "code"}
            assert "--shutdown-timeout" in last["error"]["message"]
        else:
            assert "error" not in last
            finished = [json.loads(event) for event in rest[:-1]]
            reasons = [choice["finish_reason"] for chunk in finished for choice in chunk["choices"]
                       if choice.get("finish_reason")]
            assert reasons == ["length"] * body["n"]
        assert server.process.wait(timeout=60) == 0
        assert server.wait_for_log("drained")["interrupted"] == (1 if deadline_passes else 0)
    finally:
        server.close()
