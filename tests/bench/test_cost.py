"""Cost arithmetic: $ per 1M tokens from GPU-hour price, GPU count and throughput."""
import pytest

from serval.bench.cost import dollars_per_million, run_cost


def test_dollars_per_million_tokens():
    # 2 GPUs at $2/h = $4/h; 1000 tok/s = 3.6M tok/h -> $1.111 per 1M tokens
    assert dollars_per_million(1000.0, 2.0, 2) == pytest.approx(4.0 / 3.6)
    assert dollars_per_million(0.0, 2.0, 1) is None


def test_run_cost_at_measured_and_slo_throughput():
    summary = {"output_throughput": 500.0, "total_token_throughput": 2000.0, "good_output_throughput": 250.0,
               "good_total_token_throughput": 1000.0}
    cost = run_cost(summary, gpu_hour_price=3.6, num_gpus=1)
    assert cost["usd_per_1m_output_tokens"] == pytest.approx(2.0)
    assert cost["usd_per_1m_total_tokens"] == pytest.approx(0.5)
    assert cost["usd_per_1m_output_tokens_at_slo"] == pytest.approx(4.0)
    assert cost["usd_per_1m_total_tokens_at_slo"] == pytest.approx(1.0)
    assert run_cost(summary, None, 1) is None
    with pytest.raises(ValueError, match="--num-gpus"):
        run_cost(summary, 1.0, 0)
