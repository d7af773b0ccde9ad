"""Load signals from serval:, vllm: and sglang: Prometheus text."""
from serval.router.scrape import parse_load_signals

SERVAL = """# TYPE serval:num_requests_running gauge
serval:num_requests_running{model_name="a"} 3.0
serval:num_requests_running{model_name="b"} 1.0
# TYPE serval:num_requests_waiting gauge
serval:num_requests_waiting{model_name="a"} 2.0
# TYPE serval:kv_cache_usage_perc gauge
serval:kv_cache_usage_perc{model_name="a"} 0.25
# TYPE serval:time_to_first_token_seconds histogram
serval:time_to_first_token_seconds_bucket{le="+Inf",model_name="a"} 4.0
serval:time_to_first_token_seconds_count{model_name="a"} 4.0
serval:time_to_first_token_seconds_sum{model_name="a"} 0.8
"""
VLLM = """# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 7.0
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 5.0
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="m"} 0.5
"""
SGLANG = """# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="m"} 2.0
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="m"} 9.0
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="m"} 0.75
"""


def test_serval_names_summed_over_models():
    signals = parse_load_signals(SERVAL)
    assert (signals.running, signals.waiting, signals.kv_cache_usage) == (4.0, 2.0, 0.25)
    assert (signals.ttft_sum, signals.ttft_count) == (0.8, 4.0)


def test_vllm_and_sglang_names():
    vllm = parse_load_signals(VLLM)
    assert (vllm.running, vllm.waiting, vllm.kv_cache_usage, vllm.ttft_count) == (5.0, 7.0, 0.5, None)
    sglang = parse_load_signals(SGLANG)
    assert (sglang.running, sglang.waiting, sglang.kv_cache_usage) == (2.0, 9.0, 0.75)


def test_unknown_metrics_give_no_signals():
    signals = parse_load_signals("# TYPE foo gauge\nfoo 1\n")
    assert signals.running is None and signals.waiting is None
