"""The first minutes against a real `serval serve`: the model's generation_config.json gives the defaults of
requests that leave them out (the request log shows the values used), and `--generation-config vllm` ignores it."""
import json
import shutil
import time

import httpx
import pytest

from tests.e2e.server import RemoteServer, tiny_model_dir


@pytest.fixture(scope="module")
def model_with_generation_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-with-generation-config")
    shutil.copytree(tiny_model_dir(), path, dirs_exist_ok=True)
    config = json.loads((path / "generation_config.json").read_text())
    config.update(do_sample=True, temperature=0.7, top_p=0.8)
    (path / "generation_config.json").write_text(json.dumps(config))
    return str(path)


def request_lines(server: RemoteServer, count: int, timeout: float = 30.0) -> list[dict]:
    """The first `count` request log lines, once written (a line is written as its response ends)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = [record for record in server.log_records() if record.get("message") == "request finished"]
        if len(lines) >= count:
            return lines[:count]
        time.sleep(0.1)
    raise AssertionError(f"fewer than {count} request lines:\n{server.log_text()[-3000:]}")


def _chat(server: RemoteServer, **fields) -> None:
    response = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields})
    assert response.status_code == 200, response.text


def test_requests_without_sampling_fields_use_the_models_generation_config(model_with_generation_config):
    server = RemoteServer(["--model", model_with_generation_config, "--max-model-len", "256"])
    try:
        applied = server.wait_for_log("sampling defaults")
        assert (applied["temperature"], applied["top_p"]) == (0.7, 0.8)
        _chat(server)
        _chat(server, temperature=0, top_p=1.0)
        first, second = request_lines(server, 2)
        assert (first["temperature"], first["top_p"]) == (0.7, 0.8)
        assert (second["temperature"], second["top_p"]) == (0, 1.0)
    finally:
        server.close()


def test_generation_config_vllm_ignores_the_file(model_with_generation_config):
    server = RemoteServer(["--model", model_with_generation_config, "--max-model-len", "256",
                           "--generation-config", "vllm"])
    try:
        _chat(server)
        line, = request_lines(server, 1)
        assert (line["temperature"], line["top_p"]) == (1.0, 1.0)
    finally:
        server.close()
