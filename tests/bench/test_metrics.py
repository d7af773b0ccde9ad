"""Metric arithmetic on hand-timed requests: every number checked against the formula in docs/bench.md."""
import pytest

from serval.bench.metrics import RequestResult, meets_slo, parse_slo, summarize


def timed(index, scheduled, sent, ttft, itl, output_tokens, prompt_tokens=10, error_type=None):
    end = sent + ttft + sum(itl)
    return RequestResult(index=index, scheduled=scheduled, sent=sent, end=end, ttft=ttft, itl=list(itl),
                         prompt_tokens=prompt_tokens, output_tokens=output_tokens, usage_from_server=True,
                         error_type=error_type)


def test_per_request_formulas():
    result = timed(0, scheduled=1.0, sent=1.5, ttft=0.2, itl=[0.1, 0.1, 0.2], output_tokens=4)
    assert result.e2el == pytest.approx(0.6)
    assert result.wait == pytest.approx(0.5)
    assert result.e2e == pytest.approx(1.1)
    assert result.tpot == pytest.approx((0.6 - 0.2) / 3)
    assert timed(1, 0, 0, 0.2, [], output_tokens=1).tpot is None  # vLLM: TPOT needs two tokens


def test_summary_matches_vllm_definitions():
    results = [timed(0, 0.0, 0.0, 0.1, [0.05] * 9, 10), timed(1, 0.5, 0.5, 0.3, [0.1] * 4, 5, prompt_tokens=20),
               timed(2, 1.0, 1.0, 0.0, [], 0, error_type="http_500")]
    results[2].end = 1.1
    summary = summarize(results, parse_slo("ttft=200,tpot=60"))
    assert (summary["completed"], summary["failed"], summary["errors"]) == (2, 1, {"http_500": 1})
    assert summary["duration_s"] == pytest.approx(1.2)  # first arrival 0.0 to last byte 1.2 (request 1)
    assert summary["total_input_tokens"] == 30 and summary["total_output_tokens"] == 15
    assert summary["request_throughput"] == pytest.approx(2 / 1.2)
    assert summary["output_throughput"] == pytest.approx(15 / 1.2)
    assert summary["total_token_throughput"] == pytest.approx(45 / 1.2)
    assert summary["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert summary["ttft_ms"]["p99"] == pytest.approx(100 + 200 * 0.99)  # numpy linear interpolation
    assert summary["tpot_ms"]["mean"] == pytest.approx((50.0 + 100.0) / 2)
    assert summary["itl_ms"]["mean"] == pytest.approx((9 * 50 + 4 * 100) / 13)
    assert summary["itl_ms"]["median"] == pytest.approx(50.0)
    assert summary["e2el_ms"]["mean"] == pytest.approx((550 + 700) / 2)
    # goodput: request 0 meets ttft<=200 and tpot<=60; request 1 misses ttft; the failure never counts
    assert summary["good_requests"] == 1
    assert summary["slo_attainment"] == pytest.approx(1 / 3)
    assert summary["request_goodput"] == pytest.approx(1 / 1.2)
    assert summary["good_output_throughput"] == pytest.approx(10 / 1.2)


def test_e2e_slo_counts_client_wait():
    waited = timed(0, scheduled=0.0, sent=0.5, ttft=0.1, itl=[0.1], output_tokens=2)
    assert meets_slo(waited, parse_slo("e2el=700"))
    assert not meets_slo(waited, parse_slo("e2e=600"))
    assert meets_slo(timed(1, 0, 0, 0.1, [], 1), parse_slo("tpot=1"))  # one token: TPOT counts as 0


@pytest.mark.parametrize("text", ["ttft", "ttft=abc", "latency=5", "ttft=-1"])
def test_bad_slo_says_what_is_allowed(text):
    with pytest.raises(ValueError, match="--slo"):
        parse_slo(text)


def test_no_requests_and_no_completions():
    assert summarize([])["request_throughput"] == 0.0
    failed = RequestResult(index=0, scheduled=0.0, sent=0.0, end=0.1, error_type="connect")
    summary = summarize([failed])
    assert summary["ttft_ms"]["mean"] is None and summary["errors"] == {"connect": 1}
