"""`serval serve --tensor-parallel-size 2` as a real process (one worker), through the openai client:
the same greedy text as the single-process engine; a worker killed mid-request ends that request with an error,
turns /health 503 and stops the server non-zero with nothing left behind; a server killed outright takes its
worker with it."""
from __future__ import annotations

import os
import signal

import httpx
import openai
import psutil
import pytest

from serval import LLM, SamplingParams
from tests.e2e.server import RemoteServer, tiny_model_dir

MODEL = "tiny"
PROMPTS = ["The capital of France is", "1, 2, 3,"]


def serve(extra: list[str] | None = None) -> RemoteServer:
    return RemoteServer(["--model", tiny_model_dir(), "--max-model-len", "512", "--served-model-name", MODEL,
                         "--tensor-parallel-size", "2", *(extra or [])])


def children_of(server: RemoteServer) -> list[psutil.Process]:
    """The worker, multiprocessing's fork server (the worker's parent) and its resource tracker."""
    return psutil.Process(server.process.pid).children(recursive=True)


def workers_of(server: RemoteServer) -> list[psutil.Process]:
    """The fork server's children: forked, they show its command line."""
    return [child for child in children_of(server) if "forkserver" in " ".join(child.parent().cmdline())]


def wait_gone(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    return alive


def test_greedy_completions_equal_the_single_process_engine_and_a_killed_server_takes_its_worker():
    llm = LLM(model=tiny_model_dir(), max_model_len=512)
    expected = [o.outputs[0].text for o in llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=16,
                                                                                   ignore_eos=True), use_tqdm=False)]
    server = serve()
    try:
        workers, children = workers_of(server), children_of(server)
        assert len(workers) == 1
        client = server.client()
        for prompt, text in zip(PROMPTS, expected):
            got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0.0,
                                            extra_body={"ignore_eos": True})
            assert got.choices[0].text == text
        chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=8, temperature=0.0, stream=True)
        assert "".join(chunk.choices[0].delta.content or "" for chunk in chat if chunk.choices)
        server.process.send_signal(signal.SIGKILL)  # no shutdown code runs: the worker must notice by itself
        server.process.wait(timeout=10)
        assert not wait_gone(children, timeout=15), "a child process outlived its server"
    finally:
        server.close()


def test_a_worker_killed_mid_request_errors_the_request_fails_health_and_leaves_no_process():
    server = serve()
    try:
        workers, children = workers_of(server), children_of(server)
        stream = server.client().completions.create(model=MODEL, prompt="Once upon a time", max_tokens=400,
                                                    temperature=0.0, stream=True, extra_body={"ignore_eos": True})
        with pytest.raises(openai.APIError):
            for number, _ in enumerate(stream):
                if number == 2:
                    os.kill(workers[0].pid, signal.SIGKILL)
        assert httpx.get(server.url + "/health", timeout=10).status_code == 503
        assert server.process.wait(timeout=60) != 0
        assert any("WorkerFailedError" in str(record.get("error", "")) for record in server.log_records()), \
            server.log_text()[-3000:]
        assert not wait_gone(children, timeout=5)
    finally:
        server.close()
