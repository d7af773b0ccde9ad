"""The router's metrics: own registry, backend gauges read live at scrape time."""
from prometheus_client import REGISTRY

from serval.router.backends import build_backends
from serval.router.config import parse_config
from serval.router.metrics import RouterMetrics


def test_names_labels_and_live_backend_gauges():
    backends = build_backends(parse_config({"backends": [{"name": "a", "url": "http://x:1", "models": ["m"]}],
                                            "breaker": {"failure_threshold": 1}}))
    metrics = RouterMetrics(backends, clock=lambda: 0.0)
    metrics.requests.labels("a", "m", "success").inc()
    metrics.decisions.labels("m", "cache_aware", "a", "cache_hit").inc()
    metrics.retries.labels("m", "backend_error").inc()
    metrics.fallbacks.labels("m", "m-long").inc()
    backends["a"].in_flight = 2
    backends["a"].breaker.record_failure(0.0)
    text = metrics.render().decode()
    for line in ('serval:router_requests_total{backend="a",model="m",outcome="success"} 1.0',
                 'serval:router_decisions_total{backend="a",model="m",policy="cache_aware",reason="cache_hit"} 1.0',
                 'serval:router_retries_total{model="m",outcome="backend_error"} 1.0',
                 'serval:router_fallbacks_total{fallback="m-long",model="m"} 1.0',
                 'serval:router_backend_in_flight{backend="a"} 2.0',
                 'serval:router_breaker_state{backend="a"} 1.0',
                 'serval:router_breaker_opened_total{backend="a"} 1.0',
                 'serval:router_backend_healthy{backend="a"} 1.0'):
        assert line in text, line
    assert 'serval:router_backend_ttft_ewma_seconds{backend="a"}' not in text  # no sample yet: no series
    assert REGISTRY.get_sample_value("serval:router_requests_total", {"backend": "a", "model": "m",
                                                                      "outcome": "success"}) is None
