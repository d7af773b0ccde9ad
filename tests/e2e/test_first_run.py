"""The first minutes against a real `serval serve`: the ready banner's curl command and Python snippet work as
printed; the model's generation_config.json gives the defaults of requests that leave them out (the request log
shows the values used) and `--generation-config vllm` ignores it; a client that leaves mid-stream is logged with
the tokens it got; probes stay out of the access log; SIGINT when idle stops the process."""
import json
import os
import shutil
import signal
import subprocess
import sys
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


MODEL = "tiny"


@pytest.fixture(scope="module")
def server():
    remote = RemoteServer(["--model", tiny_model_dir(), "--max-model-len", "256", "--served-model-name", MODEL])
    yield remote
    remote.close()


def banner_commands(server: RemoteServer) -> dict[str, str]:
    """The banner's example commands by their program, once printed (it follows the port's binding)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        commands = {line.split()[0]: line.strip() for line in server.log_text().splitlines()
                    if line.startswith(("  curl ", "  python -c "))}
        if len(commands) == 2:
            return commands
        time.sleep(0.1)
    raise AssertionError(f"no ready banner:\n{server.log_text()[-3000:]}")


def run_shell(command: str) -> subprocess.CompletedProcess:
    """As a user would paste it into bash, with this interpreter as `python`."""
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PATH": path})


def test_the_banners_curl_command_works_as_printed(server):
    commands = banner_commands(server)
    assert f"http://127.0.0.1:{server.port}/v1" in commands["curl"] and "Authorization" not in commands["curl"]
    result = run_shell(commands["curl"])
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["object"] == "chat.completion" and answer["model"] == MODEL
    assert isinstance(answer["choices"][0]["message"]["content"], str)
    assert answer["usage"]["completion_tokens"] >= 1
    ready = server.wait_for_log("ready")
    assert ready["weights_mib"] > 0 and ready["kv_cache_mib"] > 0 and ready["kv_cache_tokens"] > 0


def test_the_banners_python_snippet_works_as_printed(server):
    result = run_shell(banner_commands(server)["python"])
    assert result.returncode == 0, result.stderr


def test_a_key_placeholder_only_when_a_key_is_required():
    keyed = RemoteServer(["--model", tiny_model_dir(), "--max-model-len", "256"], api_key="secret")
    try:
        commands = banner_commands(keyed)
        assert '-H "Authorization: Bearer $SERVAL_API_KEY"' in commands["curl"]
        result = run_shell("export SERVAL_API_KEY=secret; " + commands["curl"])
        assert json.loads(result.stdout)["object"] == "chat.completion", result.stdout
    finally:
        keyed.close()


def test_a_client_that_leaves_mid_stream_is_logged_with_its_tokens(server):
    body = {"model": MODEL, "prompt": "count", "max_tokens": 200, "ignore_eos": True, "stream": True}
    received = 0
    with httpx.Client(timeout=60) as client, client.stream("POST", server.url + "/v1/completions",
                                                           json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                received += 1  # one event per token while the stream runs
            if received == 5:
                break
    line, = _wait_for_status(server, 499)
    assert line["completion_tokens"] >= received and line["ttft_s"] is not None and line["finish_reason"] == "abort"


def _wait_for_status(server: RemoteServer, status: int) -> list[dict]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        lines = [record for record in server.log_records()
                 if record.get("message") == "request finished" and record.get("status") == status]
        if lines:
            return lines
        time.sleep(0.1)
    raise AssertionError(f"no request line with status {status}:\n{server.log_text()[-3000:]}")


def test_probes_stay_out_of_the_access_log(server):
    for path in ("/health", "/metrics", "/v1/models"):
        assert httpx.get(server.url + path, timeout=30).status_code == 200
    deadline = time.monotonic() + 30
    while not any("/v1/models" in str(record.get("message")) for record in server.log_records()):
        assert time.monotonic() < deadline, server.log_text()[-3000:]
        time.sleep(0.1)
    access = [str(record.get("message")) for record in server.log_records() if record.get("logger") == "uvicorn.access"]
    assert not [line for line in access if "/health" in line or "/metrics" in line]


def test_sigint_when_idle_stops_the_process():
    idle = RemoteServer(["--model", tiny_model_dir(), "--max-model-len", "256"])
    try:
        idle.process.send_signal(signal.SIGINT)
        assert idle.process.wait(timeout=30) == 0
        assert idle.wait_for_log("stopped")["exit_code"] == 0
    finally:
        idle.close()


def test_echo_with_max_tokens_0_scores_the_prompt(server):
    """What evaluation harnesses send: the prompt's logprobs, equal to transformers' log-softmax, nothing else."""
    import torch
    import transformers

    prompt = "The capital of France is Paris"
    response = httpx.post(server.url + "/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": prompt, "echo": True, "max_tokens": 0, "logprobs": 1})
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    assert response.json()["usage"]["completion_tokens"] == 0
    ids = httpx.post(server.url + "/tokenize", json={"model": MODEL, "prompt": prompt}, timeout=60).json()["tokens"]
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir(), torch_dtype=torch.float32)
    with torch.no_grad():
        log_softmax = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    expected = [None] + [log_softmax[i - 1, ids[i]].item() for i in range(1, len(ids))]
    got = choice["logprobs"]["token_logprobs"]
    assert len(got) == len(ids) and got[0] is None
    assert got[1:] == pytest.approx(expected[1:], abs=1e-4)


def test_max_tokens_0_without_prompt_logprobs_is_refused(server):
    response = httpx.post(server.url + "/v1/completions", timeout=60,
                          json={"model": MODEL, "prompt": "x", "max_tokens": 0})
    assert response.status_code == 400 and response.json()["error"]["param"] == "max_tokens"
