"""Active health checks and load scraping against a scripted backend on loopback."""
import asyncio

import aiohttp

from tests.e2e.router_support import ScriptedBackend
from serval.router.backends import build_backends
from serval.router.config import parse_config
from serval.router.health import check_all, health_path

METRICS = """# TYPE serval:num_requests_running gauge
serval:num_requests_running{{model_name="m"}} 2.0
# TYPE serval:num_requests_waiting gauge
serval:num_requests_waiting{{model_name="m"}} 3.0
# TYPE serval:kv_cache_usage_perc gauge
serval:kv_cache_usage_perc{{model_name="m"}} 0.5
# TYPE serval:time_to_first_token_seconds histogram
serval:time_to_first_token_seconds_count{{model_name="m"}} {count}
serval:time_to_first_token_seconds_sum{{model_name="m"}} {total}
"""


def check(backends) -> None:
    async def run():
        async with aiohttp.ClientSession() as session:
            await check_all(session, backends, timeout=2)
    asyncio.run(run())


def test_health_scraping_and_learned_context():
    scripted = ScriptedBackend()
    try:
        config = parse_config({"backends": [
            {"name": "s", "url": scripted.url, "models": ["stub"], "engine": "serval"},
            {"name": "generic", "url": scripted.url, "models": ["stub"]},
            {"name": "gone", "url": "http://127.0.0.1:9", "models": ["stub"], "engine": "vllm"}]})
        backends = build_backends(config)
        assert health_path(backends["s"]) == "/health" and health_path(backends["generic"]) == "/v1/models"
        scripted.metrics_text = METRICS.format(count=4, total=2.0)
        check(backends)
        serval = backends["s"]
        assert serval.healthy and serval.learned_max_context == 64  # from /v1/models max_model_len
        assert (serval.scraped_running, serval.scraped_waiting, serval.kv_cache_usage) == (2.0, 3.0, 0.5)
        assert serval.load() == 5.0 and serval.ttft_ewma is None  # one scrape: no interval to average over yet
        scripted.metrics_text = METRICS.format(count=6, total=3.0)  # two requests, 0.5 s each since
        check(backends)
        assert serval.ttft_ewma == 0.5
        assert backends["generic"].healthy and backends["generic"].scraped_running is None  # not scraped
        assert not backends["gone"].healthy and "Cannot connect" in backends["gone"].health_error
        scripted.mode = "down"
        check(backends)
        assert not serval.healthy and serval.health_error == "HTTP 503" and serval.scraped_running is None
        scripted.mode = "ok"
        check(backends)
        assert serval.healthy
    finally:
        scripted.close()
