"""The load generator against real HTTP: a stub server (serval.bench.stub_server) emitting tokens at known times."""
import socket

import numpy as np
import pytest

from serval.bench.endpoints import Endpoint
from serval.bench.loadgen import LoadConfig, arrival_intervals, run_endpoint
from serval.bench.stub_server import stub_process
from serval.bench.tokenizer import load_tokenizer
from serval.bench.workloads import BenchRequest

SLACK = 0.15  # seconds of scheduling noise allowed on a shared 2-core machine running two test workers


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("llama3")


@pytest.fixture(scope="module")
def timed_stub():
    with stub_process("--model", "m", "--ttft-ms", "100", "--itl-ms", "20") as url:
        yield url


def requests(count, words=4, output_len=5, **fields):
    return [BenchRequest(user=" ".join(["word"] * words), output_len=output_len, prompt_len=words, **fields)
            for _ in range(count)]


def quiet(**kwargs):
    return LoadConfig(progress=False, **kwargs)


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_times_match_the_servers_schedule(timed_stub, tokenizer, api):
    results = run_endpoint(Endpoint("stub", timed_stub, "m", api=api), requests(4), quiet(), tokenizer)
    for result in results:
        assert result.success, result.error
        assert (result.prompt_tokens, result.output_tokens, result.usage_from_server) == (4, 5, True)
        assert 0.1 <= result.ttft < 0.1 + SLACK
        # A first chunk read late (a loaded machine) lengthens the TTFT by what it takes from the first ITL
        assert len(result.itl) == 4 and 0.08 - 0.005 <= sum(result.itl) + (result.ttft - 0.1)
        assert sum(result.itl) < 0.08 + SLACK
        assert result.e2el == pytest.approx(result.ttft + sum(result.itl), abs=0.01)
        assert result.tpot == pytest.approx((result.e2el - result.ttft) / 4)
        assert result.output_text == " tok" * 5


def test_chunks_of_several_tokens_and_counting_without_usage(tokenizer):
    with stub_process("--tokens-per-chunk", "2", "--itl-ms", "10", "--no-usage") as url:
        [result] = run_endpoint(Endpoint("stub", url, "any"), requests(1, output_len=5), quiet(), tokenizer)
    assert result.success and not result.usage_from_server
    assert len(result.itl) == 2  # ITL is per chunk: chunks of 2, 2, 1 tokens
    assert result.output_tokens == len(tokenizer.encode(" tok" * 5))
    assert result.prompt_tokens == 4  # the benchmark tokenizer's count stands when the server gives none


def test_max_concurrency_queues_in_the_client(timed_stub, tokenizer):
    results = run_endpoint(Endpoint("stub", timed_stub, "m"), requests(3), quiet(max_concurrency=1), tokenizer)
    ordered = sorted(results, key=lambda r: r.sent)
    for previous, result in zip(ordered, ordered[1:]):
        assert result.sent >= previous.end - 0.005
    assert ordered[2].wait >= 2 * 0.18 - 0.01  # two whole requests (100 + 4*20 ms each) ahead of it
    assert ordered[2].e2e == pytest.approx(ordered[2].wait + ordered[2].e2el)


def test_poisson_arrivals_follow_the_seeded_schedule(timed_stub, tokenizer):
    config = quiet(request_rate=20.0, seed=7)
    results = run_endpoint(Endpoint("stub", timed_stub, "m"), requests(6, output_len=1), config, tokenizer)
    gaps = arrival_intervals(np.random.default_rng(7), 20.0, 1.0)
    expected = np.cumsum([0.0] + [next(gaps) for _ in range(6)][1:6])
    assert [r.scheduled for r in results] == pytest.approx(list(expected))
    assert all(0 <= r.wait < SLACK for r in results)


def test_gamma_burstiness_keeps_the_mean_rate():
    for burstiness in (0.5, 1.0, 4.0):
        gaps = arrival_intervals(np.random.default_rng(0), 10.0, burstiness)
        sample = np.array([next(gaps) for _ in range(20000)])
        assert sample.mean() == pytest.approx(0.1, rel=0.05)
        assert sample.var() == pytest.approx(0.01 / burstiness, rel=0.1)  # gamma: var = mean^2 / shape


def test_duration_cycles_the_workload(tokenizer):
    with stub_process() as url:
        results = run_endpoint(Endpoint("stub", url, "m"), requests(2, output_len=2),
                               quiet(request_rate=40.0, duration=0.5), tokenizer)
    assert len(results) > 4 and all(r.success for r in results) and max(r.scheduled for r in results) <= 0.5


def test_chat_turns_carry_the_replies(tokenizer):
    workload = [BenchRequest(user="a b c", output_len=3, prompt_len=3, conversation_id=0, turn=0),
                BenchRequest(user="d e", output_len=2, prompt_len=2, conversation_id=0, turn=1),
                BenchRequest(user="f", output_len=2, prompt_len=1, conversation_id=1, turn=0)]
    with stub_process("--itl-ms", "5") as url:
        results = run_endpoint(Endpoint("stub", url, "m", api="chat"), workload, quiet(), tokenizer)
    first, second, other = results
    assert second.sent >= first.end  # the next turn waits for the reply
    assert second.prompt_tokens == 3 + 3 + 2  # stub counts words of all messages: user, reply "tok tok tok", user
    assert other.prompt_tokens == 1


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_errors_are_counted_by_type(tokenizer):
    unreachable = run_endpoint(Endpoint("down", f"http://127.0.0.1:{free_port()}", "m"), requests(3), quiet(), tokenizer)
    assert [r.error_type for r in unreachable] == ["connect"] * 3
    with stub_process("--model", "m", "--fail-every", "2") as url:
        flaky = run_endpoint(Endpoint("flaky", url, "m"), requests(6, output_len=1), quiet(max_concurrency=1), tokenizer)
        wrong_model = run_endpoint(Endpoint("wrong", url, "other"), requests(2), quiet(), tokenizer)
    assert sorted(str(r.error_type) for r in flaky) == ["None"] * 3 + ["http_500"] * 3
    assert [r.error_type for r in wrong_model] == ["http_404"] * 2 and "not found" in wrong_model[0].error
