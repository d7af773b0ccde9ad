"""The router's Prometheus metrics, in their own registry (the server's live in another; one process may
hold both in tests). Backend gauges are read from the live Backend objects at scrape time.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from serval.router.breaker import STATE_VALUES

PREFIX = "serval:router_"
CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0,
                   80.0, 160.0, 640.0)

# Outcomes of one attempt on one backend (serval:router_requests_total's outcome label):
SUCCESS = "success"  # relayed a 2xx
CLIENT_ERROR = "client_error"  # relayed an answer the request caused (4xx, or a 5xx blaming it): never retried
BACKEND_ERROR = "backend_error"  # the backend's 5xx, refused or reset before the first byte: retried elsewhere
TIMEOUT = "timeout"  # connect or read timeout before the first byte: retried elsewhere
OVERLOADED = "overloaded"  # the backend's 429: retried elsewhere, not held against its breaker
CONTEXT_EXCEEDED = "context_length_exceeded"  # the backend's context was too short: fallback group, if any
STREAM_ERROR = "stream_error"  # failed after the first byte reached the client: reported in the stream
CLIENT_DISCONNECT = "client_disconnect"
NO_BACKEND = "no_backend"  # the 503 when no backend can serve (backend label "none")


class BackendCollector:
    def __init__(self, backends: dict, clock) -> None:
        self.backends, self.clock = backends, clock

    def describe(self):
        return []

    def collect(self):
        now = self.clock()
        gauges = {
            "backend_healthy": ("1 while active health checks pass.", lambda b: float(b.healthy)),
            "backend_in_flight": ("Requests the router has outstanding at the backend.", lambda b: b.in_flight),
            "breaker_state": ("Circuit breaker: 0 closed, 1 open, 2 half-open.",
                              lambda b: STATE_VALUES[b.breaker.current_state(now)]),
            "backend_waiting_requests": ("Waiting requests scraped from the backend's metrics.",
                                         lambda b: b.scraped_waiting),
            "backend_kv_cache_usage_perc": ("KV-cache usage scraped from the backend's metrics (1 = full).",
                                            lambda b: b.kv_cache_usage),
            "backend_ttft_ewma_seconds": ("Exponentially weighted time to first token.", lambda b: b.ttft_ewma),
        }
        for name, (documentation, read) in gauges.items():
            family = GaugeMetricFamily(PREFIX + name, documentation, labels=["backend"])
            for backend in self.backends.values():
                value = read(backend)
                if value is not None:
                    family.add_metric([backend.name], float(value))
            yield family
        opened = CounterMetricFamily(PREFIX + "breaker_opened", "Times the backend's breaker opened.",
                                     labels=["backend"])
        for backend in self.backends.values():
            opened.add_metric([backend.name], float(backend.breaker.times_opened))
        yield opened


class RouterMetrics:
    def __init__(self, backends: dict, clock) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(BackendCollector(backends, clock))
        self.requests = Counter(PREFIX + "requests", "Attempts by backend, model group and outcome.",
                                ["backend", "model", "outcome"], registry=self.registry)
        self.decisions = Counter(PREFIX + "decisions", "Policy decisions by model group, policy, backend, reason.",
                                 ["model", "policy", "backend", "reason"], registry=self.registry)
        self.retries = Counter(PREFIX + "retries", "Requests sent again to another backend, by the failed "
                               "attempt's outcome.", ["model", "outcome"], registry=self.registry)
        self.fallbacks = Counter(PREFIX + "fallbacks", "Context-window fallbacks from one model group to another.",
                                 ["model", "fallback"], registry=self.registry)
        self.request_latency = Histogram(PREFIX + "request_duration_seconds",
                                         "Client request arrival to the end of the response, by model group.",
                                         ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.first_byte_latency = Histogram(PREFIX + "time_to_first_byte_seconds",
                                            "Request sent to a backend until its first body bytes (for streams "
                                            "roughly the time to first token).", ["backend"],
                                            buckets=LATENCY_BUCKETS, registry=self.registry)

        # The guard's names, as `serval serve --policy` exports them (fed by serval.guard.session.GuardMetricsObserver).
        self.guard_decisions = Counter("serval:guard_decisions", "Guard decisions by rail and action.",
                                       ["rail", "action"], registry=self.registry)
        self.guard_latency = Histogram("serval:guard_latency_seconds", "Time per guard rail run.", ["rail"],
                                       buckets=LATENCY_BUCKETS, registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
