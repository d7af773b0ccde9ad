"""A backend's live state: load from own and scraped counts, TTFT average, the model name it is sent."""
from serval.router.backends import Backend, build_backends
from serval.router.breaker import CircuitBreaker
from serval.router.config import BackendConfig, parse_config


def backend(**fields) -> Backend:
    return Backend(BackendConfig(name="a", url="http://127.0.0.1:1", models=["llama", "llama-alias"], **fields),
                   CircuitBreaker())


def test_load_is_the_larger_of_own_and_scraped_counts():
    b = backend(weight=2)
    b.in_flight = 3
    assert b.load() == 3 and b.weighted_load() == 1.5
    b.scraped_running, b.scraped_waiting = 4, 5  # other clients' requests too
    assert b.load() == 9


def test_ttft_average_and_model_names():
    b = backend()
    b.observe_ttft(1.0)
    b.observe_ttft(0.0)
    assert b.ttft_ewma == 0.7
    assert b.model_for("llama-alias") == "llama-alias" and b.model_for("public-name") == "llama"


def test_availability_needs_health_and_a_closed_breaker():
    backends = build_backends(parse_config({"backends": [{"name": "a", "url": "http://x:1", "models": ["m"]}],
                                            "breaker": {"failure_threshold": 1, "cooldown_s": 5}}))
    b = backends["a"]
    assert b.available(0)
    b.breaker.record_failure(0)
    assert not b.available(1) and "breaker open" in b.unavailable_reason(1)
    b.breaker.record_success()
    b.healthy, b.health_error = False, "ClientConnectorError"
    assert not b.available(1) and "unhealthy (ClientConnectorError)" == b.unavailable_reason(1)
    assert b.max_context is None
    b.learned_max_context = 512
    assert b.max_context == 512
