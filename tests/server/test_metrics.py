"""/metrics of a real server: vLLM's names under serval:, moving with traffic; disconnects free the KV cache."""
import time

import httpx
import pytest

from tests.e2e.server import RemoteServer, tiny_model_dir

MODEL = "tiny"
LABEL = {"model_name": MODEL}

ENGINE_METRICS = ["serval:num_requests_running", "serval:num_requests_waiting", "serval:kv_cache_usage_perc",
                  "serval:prompt_tokens_total", "serval:generation_tokens_total",
                  "serval:prefix_cache_queries_total", "serval:prefix_cache_hits_total",
                  "serval:num_preemptions_total"]
HISTOGRAMS = ["time_to_first_token_seconds", "inter_token_latency_seconds", "request_time_per_output_token_seconds",
              "e2e_request_latency_seconds", "request_queue_time_seconds", "request_prefill_time_seconds",
              "request_decode_time_seconds", "request_prompt_tokens", "request_generation_tokens"]


@pytest.fixture(scope="module")
def server():
    remote = RemoteServer(["--model", tiny_model_dir(), "--max-model-len", "1024", "--served-model-name", MODEL])
    yield remote
    remote.close()


def complete(server, **body) -> dict:
    response = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "temperature": 0, **body},
                          timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_all_metrics_are_exported_with_model_name(server):
    complete(server, prompt="warm up", max_tokens=3)
    names = {(name, labels) for name, labels in server.metrics()}
    for name in ENGINE_METRICS + [f"serval:{h}_count" for h in HISTOGRAMS] + [f"serval:{h}_bucket" for h in
                                                                            HISTOGRAMS]:
        assert any(sample == name and ("model_name", MODEL) in labels for sample, labels in names), name
    assert server.metric("serval:request_success_total", model_name=MODEL, finished_reason="length") >= 1
    assert server.metric("serval:http_requests_total", method="POST", handler="/v1/completions", status="200") >= 1


def test_counters_and_histograms_move_by_the_request(server):
    before = server.metrics()
    usage = complete(server, prompt="Counting tokens here", max_tokens=7)["usage"]
    after = server.metrics()

    def moved(name, **labels):
        key = (name, tuple(sorted({**LABEL, **labels}.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert moved("serval:prompt_tokens_total") == usage["prompt_tokens"]
    assert moved("serval:generation_tokens_total") == 7
    assert moved("serval:request_success_total", finished_reason="length") == 1
    for histogram in ["time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                      "request_prefill_time_seconds", "request_decode_time_seconds",
                      "request_time_per_output_token_seconds"]:
        assert moved(f"serval:{histogram}_count") == 1, histogram
    assert moved("serval:inter_token_latency_seconds_count") == 6  # 7 tokens, 6 gaps
    assert moved("serval:request_generation_tokens_sum") == 7
    assert moved("serval:request_prompt_tokens_sum") == usage["prompt_tokens"]
    assert moved("serval:time_to_first_token_seconds_sum") > 0


def test_prefix_cache_counters_move_on_a_repeated_prompt(server):
    prompt = "a shared prefix " * 20  # several full blocks
    complete(server, prompt=prompt, max_tokens=1)
    hits = server.metric("serval:prefix_cache_hits_total")
    queries = server.metric("serval:prefix_cache_queries_total")
    complete(server, prompt=prompt, max_tokens=1)
    assert server.metric("serval:prefix_cache_queries_total") > queries
    assert server.metric("serval:prefix_cache_hits_total") > hits


def test_gauges_show_a_running_request(server):
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60, json={
            "model": MODEL, "prompt": "long", "max_tokens": 900, "ignore_eos": True, "stream": True}) as response:
        lines = response.iter_lines()  # held: dropping the iterator closes the response
        next(lines)
        assert server.metric("serval:num_requests_running") == 1
        assert server.metric("serval:kv_cache_usage_perc") > 0
    assert server.wait_idle()


def test_stream_disconnect_aborts_and_frees_blocks(server):
    aborted = server.metric("serval:request_success_total", finished_reason="abort")
    generated = server.metric("serval:generation_tokens_total")
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60, json={
            "model": MODEL, "messages": [{"role": "user", "content": "go on"}], "max_tokens": 900,
            "ignore_eos": True, "stream": True}) as response:
        lines = response.iter_lines()
        for _ in range(4):
            next(lines)
    assert server.wait_idle()
    assert server.metric("serval:request_success_total", finished_reason="abort") == aborted + 1
    assert server.metric("serval:generation_tokens_total") - generated < 900


def test_non_stream_disconnect_aborts_and_frees_blocks(server):
    aborted = server.metric("serval:request_success_total", finished_reason="abort")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", timeout=httpx.Timeout(60, read=0.5), json={
            "model": MODEL, "prompt": "never read", "max_tokens": 900, "ignore_eos": True})
    assert server.wait_idle()
    deadline = time.monotonic() + 10
    while server.metric("serval:request_success_total", finished_reason="abort") == aborted:
        assert time.monotonic() < deadline, "the request was not aborted"
        time.sleep(0.1)
    records = [r for r in server.log_records() if r.get("message") == "request finished" and r["status"] == 499]
    assert records and records[-1]["finish_reason"] == "abort"


def test_one_json_log_line_per_request(server):
    response = complete(server, prompt="log me", max_tokens=2)
    time.sleep(0.2)
    (record,) = [r for r in server.log_records() if r.get("request_id") == response["id"]]
    assert record["message"] == "request finished" and record["model"] == MODEL and record["status"] == 200
    assert record["prompt_tokens"] == response["usage"]["prompt_tokens"] and record["completion_tokens"] == 2
    assert record["finish_reason"] == "length" and record["ttft_s"] >= 0 and record["total_s"] >= record["ttft_s"]
    bad = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "top_p": 5})
    assert bad.status_code == 400
    time.sleep(0.2)
    errors = [r for r in server.log_records() if r.get("message") == "request finished" and r["status"] == 400]
    assert errors and "top_p" in errors[-1]["error"]


def test_dashboard_queries_only_exported_metrics(server):
    import json
    import os
    import re

    from tests.e2e.server import REPO_ROOT
    with open(os.path.join(REPO_ROOT, "dashboards", "serval-grafana.json")) as f:
        dashboard = json.load(f)
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"serval:[a-z0-9_]+", target["expr"])}
    complete(server, prompt="for the dashboard", max_tokens=2)
    exported = {name for name, _ in server.metrics()}
    assert queried and queried <= exported, queried - exported
