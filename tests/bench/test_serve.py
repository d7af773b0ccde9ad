"""`serval bench serve` end to end: endpoints side by side (real stub servers), sweep, SLO, cost, reports."""
import dataclasses
import json
import socket

import pytest

from serval.bench.cli import main
from serval.bench.stub_server import stub_process


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def side_by_side(tmp_path_factory):
    """A fast and a slow stub, a flaky one and an unreachable one, swept at two rates."""
    result_dir = tmp_path_factory.mktemp("bench")
    with stub_process("--model", "m", "--ttft-ms", "20", "--itl-ms", "5") as fast, \
            stub_process("--model", "m", "--ttft-ms", "600", "--itl-ms", "5") as slow, \
            stub_process("--model", "m", "--fail-every", "2") as flaky:
        (result_dir / "endpoints.yaml").write_text(
            f"endpoints:\n  - {{name: fast, base_url: {fast}, engine: serval}}\n"
            f"  - {{name: slow, base_url: {slow}/v1, engine: vllm}}\n  - {{name: flaky, base_url: {flaky}}}\n"
            f"  - {{name: down, base_url: 'http://127.0.0.1:{free_port()}'}}\n")
        code = main(["serve", "--endpoints", str(result_dir / "endpoints.yaml"), "--model", "m",
                     "--tokenizer", "llama3", "--num-prompts", "8", "--input-len", "32", "--output-len", "4",
                     "--sweep", "20,40", "--slo", "ttft=300", "--slo-attainment", "0.9", "--gpu-hour-price", "2.5",
                     "--num-gpus", "2", "--result-dir", str(result_dir), "--disable-tqdm", "--seed", "3"])
    assert code == 0
    return result_dir, json.loads((result_dir / "summary.json").read_text())


def test_side_by_side_summary(side_by_side):
    _, report = side_by_side
    by_name = {e["endpoint"]["name"]: e for e in report["endpoints"]}
    assert list(by_name) == ["fast", "slow", "flaky", "down"]
    assert by_name["fast"]["best_rate_meeting_slo"] == 40.0 and len(by_name["fast"]["runs"]) == 2
    assert by_name["slow"]["best_rate_meeting_slo"] is None and len(by_name["slow"]["runs"]) == 1  # stops early
    assert by_name["slow"]["runs"][0]["summary"]["completed"] == 8
    assert by_name["flaky"]["runs"][0]["summary"]["errors"] == {"http_500": 4}
    assert by_name["down"]["runs"][0]["summary"]["errors"] == {"connect": 8}
    assert by_name["fast"]["endpoint"]["engine"] == "serval" and "api_key" not in by_name["fast"]["endpoint"]


def test_cost_uses_the_measured_throughput(side_by_side):
    _, report = side_by_side
    run = report["endpoints"][0]["runs"][0]
    expected = 2.5 * 2 / (run["summary"]["output_throughput"] * 3600) * 1e6
    assert run["cost"]["usd_per_1m_output_tokens"] == pytest.approx(expected)
    assert report["endpoints"][3]["runs"][0]["cost"]["usd_per_1m_output_tokens"] is None


def test_result_files(side_by_side):
    result_dir, report = side_by_side
    rows = [json.loads(line) for line in (result_dir / "requests.jsonl").read_text().splitlines()]
    assert len(rows) == 8 * (2 + 1 + 1 + 1)
    assert {row["endpoint"] for row in rows} == {"fast", "slow", "flaky", "down"}
    markdown = (result_dir / "report.md").read_text()
    assert "| Metric | fast | slow | flaky | down |" in markdown and "connect: 8" in markdown
    assert set(report["plots"]) == {"latency_cdf_rate_20.png", "latency_cdf_rate_40.png", "throughput_vs_rate.png",
                                    "ttft_vs_rate.png"}
    for name in report["plots"]:
        assert (result_dir / name).read_bytes()[:4] == b"\x89PNG"


def test_bad_arguments_are_reported_without_traceback(capsys):
    assert main(["serve", "--base-url", "http://127.0.0.1:1"]) == 2
    assert "--model is required" in capsys.readouterr().err
    assert main(["serve", "--base-url", "ftp://x", "--model", "m"]) == 2
    assert "allowed: http(s)" in capsys.readouterr().err


def test_against_a_serval_server(tmp_path):
    """The real thing: `serval serve` with the default model, completions and chat, usage from the server."""
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "serval.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                               "--max-model-len", "512", "--served-model-name", "smol", "--disable-log-requests",
                               "--disable-uvicorn-access-log"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "serval serve did not start"
                time.sleep(0.5)
        base = f"http://127.0.0.1:{port}"
        args = ["--tokenizer", "smollm2", "--num-prompts", "3", "--input-len", "24", "--output-len", "4",
                "--disable-tqdm", "--no-plots", "--max-concurrency", "3"]
        endpoints = tmp_path / "endpoints.yaml"
        endpoints.write_text(f"- {{name: serval, base_url: {base}, model: smol, engine: serval}}\n"
                             f"- {{name: wrong-model, base_url: {base}, model: nope}}\n")
        assert main(["serve", "--endpoints", str(endpoints), "--result-dir", str(tmp_path / "c"), *args]) == 0
        assert main(["serve", "--base-url", base, "--model", "smol", "--api", "chat", "--workload", "chat",
                     "--chat-turns", "3", "--result-dir", str(tmp_path / "chat"), *args]) == 0
    finally:
        server.terminate()
        server.wait(timeout=20)
    report = json.loads((tmp_path / "c" / "summary.json").read_text())
    good = report["endpoints"][0]["runs"][0]["summary"]
    assert good["completed"] == 3 and good["usage_from_server"]
    assert good["total_input_tokens"] == 3 * 24 and good["total_output_tokens"] == 3 * 4  # ignore_eos honoured
    assert good["tpot_ms"]["mean"] > 0 and good["itl_ms"]["mean"] > 0
    wrong = report["endpoints"][1]["runs"][0]["summary"]
    assert wrong["failed"] == 3 and list(wrong["errors"]) == ["http_404"]
    chat = json.loads((tmp_path / "chat" / "summary.json").read_text())["endpoints"][0]["runs"][0]["summary"]
    assert chat["completed"] == 3 and chat["total_output_tokens"] == 12
    rows = [json.loads(line) for line in (tmp_path / "chat" / "requests.jsonl").read_text().splitlines()]
    assert rows[1]["prompt_tokens"] > rows[0]["prompt_tokens"] + 24  # turn 2 carries turn 1 and its reply



def test_stub_servers_report_no_speculation(side_by_side):
    _, report = side_by_side
    assert all(run["summary"]["spec_decode"] is None for e in report["endpoints"] for run in e["runs"])


def test_acceptance_from_a_speculating_serval_server(tmp_path):
    """`serval serve --speculative-config` (n-gram on a tiny model, whose greedy text repeats): the run's summary
    carries the server's acceptance, the difference of its /metrics counters over the run."""
    import httpx

    from serval.bench.server_metrics import spec_decode_counters
    from tests.e2e.server import RemoteServer, tiny_model_dir

    server = RemoteServer([tiny_model_dir(), "--served-model-name", "tiny", "--max-model-len", "256",
                           "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}'])
    try:
        before = spec_decode_counters(server.url)
        assert before == {"spec_decode_num_drafts": 0.0, "spec_decode_num_draft_tokens": 0.0,
                          "spec_decode_num_accepted_tokens": 0.0}
        endpoints = tmp_path / "endpoints.yaml"  # greedy: a random model's greedy text repeats, so n-grams match
        endpoints.write_text(f"- {{name: serval, base_url: {server.url}, model: tiny, "
                             f"extra_body: {{temperature: 0}}}}\n")
        args = ["serve", "--endpoints", str(endpoints), "--tokenizer", "smollm2", "--num-prompts", "4",
                "--input-len", "16", "--output-len", "48", "--disable-tqdm", "--no-plots", "--max-concurrency", "2",
                "--result-dir", str(tmp_path / "spec")]
        assert main(args) == 0
        after = spec_decode_counters(server.url)
        metrics_text = httpx.get(server.url + "/metrics").text
    finally:
        server.close()
    summary = json.loads((tmp_path / "spec" / "summary.json").read_text())["endpoints"][0]["runs"][0]["summary"]
    spec = summary["spec_decode"]
    assert spec is not None, metrics_text[:2000]
    assert spec["num_drafts"] == after["spec_decode_num_drafts"] > 0
    assert spec["num_draft_tokens"] == after["spec_decode_num_draft_tokens"] <= 3 * spec["num_drafts"]
    assert spec["num_accepted_tokens"] == after["spec_decode_num_accepted_tokens"] <= spec["num_draft_tokens"]
    assert spec["acceptance_rate"] == spec["num_accepted_tokens"] / spec["num_draft_tokens"]
    assert "Spec decode acceptance rate" in (tmp_path / "spec" / "report.md").read_text()


def test_each_rate_draws_its_own_prompts():
    """A sweep's rates get different prompts of the same lengths' distribution; --reuse-prompts and jsonl repeat."""
    from serval.bench.loadgen import LoadConfig
    from serval.bench.serve import ServeConfig, warmups_per_rate, workloads_per_rate
    from serval.bench.tokenizer import load_tokenizer
    from serval.bench.workloads import WorkloadConfig, build_workload

    tokenizer = load_tokenizer("llama3")
    workload = WorkloadConfig("random", num_prompts=6, input_len=48, output_len=4, seed=5)
    config = ServeConfig(workload=workload, load=LoadConfig(), rates=[8.0, 2.0, 4.0])
    per_rate = workloads_per_rate(config, tokenizer)
    assert sorted(per_rate) == [2.0, 4.0, 8.0]
    prompts = {rate: [request.user for request in requests] for rate, requests in per_rate.items()}
    assert prompts[2.0] == [request.user for request in build_workload(workload, tokenizer)]  # the lowest: --seed
    assert not set(prompts[2.0]) & set(prompts[4.0]) and not set(prompts[4.0]) & set(prompts[8.0])
    assert all(request.prompt_len == 48 for requests in per_rate.values() for request in requests)
    reused = workloads_per_rate(dataclasses.replace(config, reuse_prompts=True), tokenizer)
    assert [r.user for r in reused[2.0]] == [r.user for r in reused[8.0]] == prompts[2.0]
    # Warm-ups get prompts of their own at each rate; without warm-ups (or reusing prompts) the run's own first ones.
    config.load.num_warmups = 3
    warmups = warmups_per_rate(config, tokenizer)
    assert [len(warmups[rate]) for rate in (2.0, 4.0, 8.0)] == [3, 3, 3]
    measured = {prompt for rate_prompts in prompts.values() for prompt in rate_prompts}
    assert not measured & {request.user for requests in warmups.values() for request in requests}
    assert warmups[2.0][0].user != warmups[4.0][0].user
    assert set(warmups_per_rate(dataclasses.replace(config, reuse_prompts=True), tokenizer).values()) == {None}


def test_prefix_cache_hit_rate_from_a_serval_server(tmp_path):
    """Against a real `serval serve`: a sweep's second rate finds nothing of the first's prompts in the prefix
    cache, unless --reuse-prompts sends them again, and no rate finds its warm-ups' prompts; the report reads the
    server's own counters."""
    from tests.e2e.server import RemoteServer, tiny_model_dir

    server = RemoteServer([tiny_model_dir(), "--served-model-name", "tiny", "--max-model-len", "256"])
    try:
        def sweep(name, *extra):
            args = ["serve", "--base-url", server.url, "--model", "tiny", "--tokenizer", "smollm2", "--num-prompts",
                    "4", "--input-len", "96", "--output-len", "2", "--sweep", "50,100", "--disable-tqdm",
                    "--no-plots", "--result-dir", str(tmp_path / name), "--seed", "11" if name == "reused" else "7",
                    *extra]
            assert main(args) == 0
            runs = json.loads((tmp_path / name / "summary.json").read_text())["endpoints"][0]["runs"]
            return [run["summary"]["prefix_cache"] for run in runs]

        fresh = sweep("fresh", "--num-warmups", "2")
        reused = sweep("reused", "--reuse-prompts")
    finally:
        server.close()
    assert all(cache["queried_tokens"] >= 4 * 96 for cache in fresh + reused)
    assert fresh[0]["hit_rate"] < 0.2 and fresh[1]["hit_rate"] < 0.2 and reused[0]["hit_rate"] < 0.2
    assert reused[1]["hit_rate"] > 0.8  # every full block of the same four prompts
