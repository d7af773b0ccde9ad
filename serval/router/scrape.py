"""Load signals from a backend's Prometheus text: running and waiting requests, KV-cache usage, TTFT totals.

Serval and vLLM share names under their own prefixes; SGLang names them differently. Samples of one name
are summed over their labels (a server may serve several models).
"""
from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

# signal -> metric names that carry it, first match wins per prefix family
NAMES = {
    "running": ("serval:num_requests_running", "vllm:num_requests_running", "sglang:num_running_reqs"),
    "waiting": ("serval:num_requests_waiting", "vllm:num_requests_waiting", "sglang:num_queue_reqs"),
    "kv_cache_usage": ("serval:kv_cache_usage_perc", "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc",
                       "sglang:token_usage"),
    "ttft_sum": ("serval:time_to_first_token_seconds_sum", "vllm:time_to_first_token_seconds_sum",
                 "sglang:time_to_first_token_seconds_sum"),
    "ttft_count": ("serval:time_to_first_token_seconds_count", "vllm:time_to_first_token_seconds_count",
                   "sglang:time_to_first_token_seconds_count"),
}


@dataclass
class LoadSignals:
    running: float | None = None
    waiting: float | None = None
    kv_cache_usage: float | None = None
    ttft_sum: float | None = None  # cumulative: the health loop turns deltas into a recent mean
    ttft_count: float | None = None


def parse_load_signals(text: str) -> LoadSignals:
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    signals = LoadSignals()
    for signal, names in NAMES.items():
        value = next((totals[name] for name in names if name in totals), None)
        setattr(signals, signal, value)
    return signals
