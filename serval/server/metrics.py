"""Prometheus metrics with vLLM's names under the `serval:` prefix, each labelled with model_name.

Engine gauges and counters are read from `engine.get_stats()` at scrape time by a custom collector: the
engine keeps cumulative totals, so there is nothing to increment and nothing to drift. Per-request
histograms are observed by the server when a request finishes, from the engine's RequestMetrics timestamps.
"""
from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from serval.outputs import RequestOutput

PREFIX = "serval:"
CONTENT_TYPE = CONTENT_TYPE_LATEST

# vLLM's buckets, so dashboards built for vLLM read the same.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
# Rails run in microseconds to milliseconds; the classifier-free rails should stay far under a token's time.
GUARD_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1.0)


class EngineStatsCollector:
    """Exports EngineStats at scrape time."""

    def __init__(self, model_name: str, get_stats: Callable) -> None:
        self.model_name = model_name
        self.get_stats = get_stats

    def describe(self):
        return []  # no registration-time scrape: the engine may still be starting

    def collect(self):
        stats = self.get_stats()
        gauges = [
            ("num_requests_running", "Number of requests in model execution batches.", stats.num_requests_running),
            ("num_requests_waiting", "Number of requests waiting to be processed.", stats.num_requests_waiting),
            ("kv_cache_usage_perc", "KV-cache usage: 1 means 100 percent.", stats.kv_cache_usage),
            ("num_kv_blocks", "Number of KV-cache blocks in the pool.", stats.num_blocks),
        ]
        counters = [
            ("prompt_tokens", "Number of prefill tokens processed.", stats.num_prompt_tokens),
            ("generation_tokens", "Number of generation tokens processed.", stats.num_generation_tokens),
            ("prefix_cache_queries", "Prefix-cache queries, in tokens.", stats.prefix_cache_queries),
            ("prefix_cache_hits", "Prefix-cache hits, in tokens.", stats.prefix_cache_hits),
            ("num_preemptions", "Cumulative number of preemptions.", stats.num_preemptions),
        ]
        for name, documentation, value in gauges:
            family = GaugeMetricFamily(PREFIX + name, documentation, labels=["model_name"])
            family.add_metric([self.model_name], float(value))
            yield family
        spec = stats.spec_decode
        if spec is not None:
            counters += [
                ("spec_decode_num_drafts", "Speculative verify steps, per request.", spec.num_drafts),
                ("spec_decode_num_draft_tokens", "Speculative tokens proposed.", spec.num_draft_tokens),
                ("spec_decode_num_accepted_tokens", "Speculative tokens accepted.", spec.num_accepted_tokens),
                ("spec_decode_num_disabled_steps", "Steps that did not speculate because the batch was at least "
                                                   "disable_by_batch_size.", spec.num_disabled_steps),
            ]
        for name, documentation, value in counters:
            family = CounterMetricFamily(PREFIX + name, documentation, labels=["model_name"])
            family.add_metric([self.model_name], float(value))
            yield family
        if spec is not None:
            family = CounterMetricFamily(PREFIX + "spec_decode_num_accepted_tokens_per_pos",
                                         "Speculative tokens accepted, per draft position.",
                                         labels=["model_name", "position"])
            for position, value in enumerate(spec.num_accepted_tokens_per_pos):
                family.add_metric([self.model_name, str(position)], float(value))
            yield family
        if getattr(stats, "max_lora", 0):
            yield lora_requests_info(stats)


def lora_requests_info(stats) -> GaugeMetricFamily:
    """vLLM's lora_requests_info: the adapters of running and waiting requests as labels (comma-separated),
    the value the time of the scrape."""
    family = GaugeMetricFamily(PREFIX + "lora_requests_info", "Running stats on LoRA requests.",
                               labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
    family.add_metric([str(stats.max_lora), ",".join(stats.running_lora_adapters),
                       ",".join(stats.waiting_lora_adapters)], time.time())
    return family


class KeyUsageCollector:
    """Per-key usage from the guard's KeyStore at scrape time (it keeps the totals; nothing here can drift)."""

    def __init__(self, key_store) -> None:
        self.key_store = key_store

    def describe(self):
        return []

    def collect(self):
        usage = dict(self.key_store.usage)
        requests = CounterMetricFamily(PREFIX + "guard_key_requests", "Requests admitted per API key.",
                                       labels=["key_id"])
        rejected = CounterMetricFamily(PREFIX + "guard_key_rejected_requests",
                                       "Requests refused for a key's limits or budget.", labels=["key_id"])
        tokens = CounterMetricFamily(PREFIX + "guard_key_tokens", "Tokens charged per API key.",
                                     labels=["key_id", "kind"])
        running = GaugeMetricFamily(PREFIX + "guard_key_requests_running", "Requests in flight per API key.",
                                    labels=["key_id"])
        for key_id, key_usage in sorted(usage.items()):
            requests.add_metric([key_id], key_usage.requests_total)
            rejected.add_metric([key_id], key_usage.rejected_total)
            tokens.add_metric([key_id, "prompt"], key_usage.prompt_tokens_total)
            tokens.add_metric([key_id, "completion"], key_usage.completion_tokens_total)
            running.add_metric([key_id], key_usage.in_flight)
        yield from (requests, rejected, tokens, running)


class ServerMetrics:
    """One registry per server: the engine's collector, the request histograms and the HTTP counters."""

    def __init__(self, model_name: str, get_stats: Callable) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.registry.register(EngineStatsCollector(model_name, get_stats))
        labels = ["model_name"]

        def histogram(name: str, documentation: str, buckets) -> Histogram:
            return Histogram(PREFIX + name, documentation, labels, buckets=buckets,
                             registry=self.registry).labels(model_name)

        self.time_to_first_token = histogram("time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self.inter_token_latency = histogram("inter_token_latency_seconds", "Time between tokens.", ITL_BUCKETS)
        self.time_per_output_token = histogram("request_time_per_output_token_seconds",
                                               "Decode time divided by the output tokens after the first.",
                                               ITL_BUCKETS)
        self.e2e_latency = histogram("e2e_request_latency_seconds", "Arrival to finish.", REQUEST_BUCKETS)
        self.queue_time = histogram("request_queue_time_seconds", "Arrival to first scheduled.", REQUEST_BUCKETS)
        self.prefill_time = histogram("request_prefill_time_seconds", "First scheduled to first token.",
                                      REQUEST_BUCKETS)
        self.decode_time = histogram("request_decode_time_seconds", "First token to last token.", REQUEST_BUCKETS)
        self.prompt_tokens = histogram("request_prompt_tokens", "Prompt tokens per request.", TOKEN_BUCKETS)
        self.generation_tokens = histogram("request_generation_tokens", "Generated tokens per request.",
                                           TOKEN_BUCKETS)
        self.request_success = Counter(PREFIX + "request_success", "Finished requests by finish reason.",
                                       ["model_name", "finished_reason"], registry=self.registry)
        self.http_requests = Counter(PREFIX + "http_requests", "HTTP requests by method, route and status.",
                                     ["method", "handler", "status"], registry=self.registry)
        self.http_latency = Histogram(PREFIX + "http_request_duration_seconds", "HTTP request handling time.",
                                      ["method", "handler"], buckets=REQUEST_BUCKETS, registry=self.registry)
        self.guard_decisions = Counter(PREFIX + "guard_decisions", "Guard rail decisions by rail and action.",
                                       ["rail", "action"], registry=self.registry)
        self.guard_latency = Histogram(PREFIX + "guard_latency_seconds", "Time one guard rail took on one check.",
                                       ["rail"], buckets=GUARD_BUCKETS, registry=self.registry)

    def add_key_usage(self, key_store) -> None:
        self.registry.register(KeyUsageCollector(key_store))

    def observe_guard_decision(self, rail: str, action: str) -> None:
        self.guard_decisions.labels(rail, action).inc()

    def observe_guard_latency(self, rail: str, seconds: float) -> None:
        self.guard_latency.labels(rail).observe(seconds)

    def observe_tokens(self, num_new_tokens: int, seconds_since_previous: float) -> None:
        """Inter-token latency: a step that brought k tokens counts as k gaps of a k-th of the time."""
        for _ in range(num_new_tokens):
            self.inter_token_latency.observe(seconds_since_previous / num_new_tokens)

    def observe_finished(self, output: RequestOutput, now: float | None = None) -> None:
        """Histograms and the success counter for one engine request, from its own timestamps."""
        now = time.monotonic() if now is None else now
        reasons = [completion.finish_reason or "abort" for completion in output.outputs]
        for reason in reasons:
            self.request_success.labels(self.model_name, reason).inc()
        num_generated = sum(len(completion.token_ids) for completion in output.outputs)
        self.prompt_tokens.observe(len(output.prompt_token_ids))
        self.generation_tokens.observe(num_generated)
        metrics = output.metrics
        if metrics is None:
            return
        finished = metrics.finished_time or now
        self.e2e_latency.observe(finished - metrics.arrival_time)
        if metrics.first_scheduled_time is not None:
            self.queue_time.observe(metrics.first_scheduled_time - metrics.arrival_time)
        if metrics.first_token_time is None:
            return
        self.time_to_first_token.observe(metrics.first_token_time - metrics.arrival_time)
        if metrics.first_scheduled_time is not None:
            self.prefill_time.observe(metrics.first_token_time - metrics.first_scheduled_time)
        last = metrics.last_token_time or finished
        self.decode_time.observe(last - metrics.first_token_time)
        num_first_choice = len(output.outputs[0].token_ids) if output.outputs else 0
        if num_first_choice > 1:
            self.time_per_output_token.observe((last - metrics.first_token_time) / (num_first_choice - 1))

    def observe_http(self, method: str, handler: str, status: int, seconds: float) -> None:
        self.http_requests.labels(method, handler, str(status)).inc()
        self.http_latency.labels(method, handler).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
