"""POST /start_profile and /stop_profile on a real `serval serve` (vLLM's endpoints), with the engine in the server
process and in its own (--engine-process): the trace lands under SERVAL_TORCH_PROFILER_DIR and holds the engine's
step ranges (on the core's step thread, its output thread beside it); misuse is a 400 and the server keeps
serving; without the variable both endpoints are 404."""
import glob
import os

import httpx
import pytest

from serval.bench.traces import load_chrome_trace, summarize_steps
from serval.engine.profiler import PROFILER_DIR_ENV, TRACE_SUFFIX
from tests.e2e.server import RemoteServer, tiny_model_dir


def serve(*extra: str, env: dict | None = None) -> RemoteServer:
    return RemoteServer(["--model", tiny_model_dir(), "--max-model-len", "256", "--served-model-name", "tiny",
                         *extra], env=env)


def complete(server: RemoteServer) -> str:
    response = httpx.post(server.url + "/v1/completions", timeout=60,
                          json={"model": "tiny", "prompt": "Hello", "max_tokens": 6, "temperature": 0.0})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


@pytest.mark.parametrize("placement", ["--no-engine-process", "--engine-process"])
def test_profile_a_serving_run(placement, tmp_path):
    server = serve(placement, env={PROFILER_DIR_ENV: str(tmp_path)})
    try:
        before = complete(server)
        stop_first = httpx.post(server.url + "/stop_profile", timeout=60)
        assert stop_first.status_code == 400 and "not running" in stop_first.json()["error"]["message"]
        assert httpx.post(server.url + "/start_profile", timeout=60).status_code == 200
        again = httpx.post(server.url + "/start_profile", timeout=60)
        assert again.status_code == 400 and "already running" in again.json()["error"]["message"]
        assert complete(server) == before  # serving goes on under the profiler, unchanged
        stopped = httpx.post(server.url + "/stop_profile", timeout=120)
        assert stopped.status_code == 200, stopped.text
        (trace,) = glob.glob(os.path.join(tmp_path, "*" + TRACE_SUFFIX))
        assert trace in stopped.text
        events = load_chrome_trace(trace)
        summary = summarize_steps(events)
        assert summary["num_steps"] >= 6
        # torch's profiler recorded the step thread itself: its torch ops are in the trace, not only our ranges.
        step_tids = {e["tid"] for e in events if e.get("name") == "serval.step"}
        assert any(e.get("cat") == "cpu_op" and e["tid"] in step_tids for e in events)
        assert {"serval.step", "serval.schedule", "serval.execute", "serval.process_step"} <= set(
            summary["ranges_ms_per_step"]["engine"])
        if placement == "--engine-process":
            assert {"serval.send_step"} <= set(summary["ranges_ms_per_step"]["engine"])
            assert "serval.encode_send" in summary["ranges_ms_per_step"]["serval-core-output"]
            assert "serval.process_inputs" in summary["ranges_ms_per_step"]["serval-core-receiver"]
        assert complete(server) == before
    finally:
        server.close()


def test_profiler_endpoints_are_404_without_the_directory(monkeypatch):
    monkeypatch.delenv(PROFILER_DIR_ENV, raising=False)
    server = serve("--engine-process")
    try:
        for path in ("/start_profile", "/stop_profile"):
            response = httpx.post(server.url + path, timeout=60)
            assert response.status_code == 404 and PROFILER_DIR_ENV in response.json()["error"]["message"]
        assert complete(server)
    finally:
        server.close()
