"""Active health checks and load scraping: one loop, every backend checked concurrently each interval.

A backend is healthy while its health endpoint answers 2xx (/health on the engines that have one, /v1/models
on a generic OpenAI-compatible server). Engines with Prometheus metrics are scraped in the same pass for
queue length, KV-cache usage and mean TTFT. Health is separate from the circuit breaker: the breaker reacts
to real requests failing, the checks catch a dead backend before a request has to.
"""
from __future__ import annotations

import asyncio
import json
import logging

import aiohttp

from serval.router.backends import Backend
from serval.router.config import SCRAPED_ENGINES
from serval.router.scrape import parse_load_signals

logger = logging.getLogger(__name__)


def health_path(backend: Backend) -> str:
    return "/v1/models" if backend.config.engine == "openai-compatible" else "/health"


def _headers(backend: Backend) -> dict:
    return {"Authorization": f"Bearer {backend.config.api_key}"} if backend.config.api_key else {}


async def _get(session: aiohttp.ClientSession, backend: Backend, path: str, timeout: float) -> tuple[int, bytes]:
    async with session.get(backend.config.url + path, headers=_headers(backend),
                           timeout=aiohttp.ClientTimeout(total=timeout)) as response:
        return response.status, await response.read()


async def check_backend(session: aiohttp.ClientSession, backend: Backend, timeout: float) -> None:
    try:
        status, _ = await _get(session, backend, health_path(backend), timeout)
        ok, error = 200 <= status < 300, None if 200 <= status < 300 else f"HTTP {status}"
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        ok, error = False, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if ok != backend.healthy:
        logger.warning("backend health changed", extra={"backend": backend.name, "healthy": ok, "error": error})
    backend.healthy, backend.health_error = ok, error
    if not ok:
        backend.scraped_running = backend.scraped_waiting = None
        return
    if backend.max_context is None:
        await _learn_max_context(session, backend, timeout)
    if backend.config.scrape_metrics and backend.config.engine in SCRAPED_ENGINES:
        await scrape_backend(session, backend, timeout)


async def scrape_backend(session: aiohttp.ClientSession, backend: Backend, timeout: float) -> None:
    try:
        status, body = await _get(session, backend, "/metrics", timeout)
        if status != 200:
            raise ValueError(f"HTTP {status}")
        signals = parse_load_signals(body.decode("utf-8", errors="replace"))
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        logger.debug("cannot scrape backend metrics", extra={"backend": backend.name, "error": str(exc)})
        return
    previous = backend.scraped_ttft_totals
    backend.scraped_running, backend.scraped_waiting = signals.running, signals.waiting
    backend.kv_cache_usage = signals.kv_cache_usage
    if signals.ttft_sum is not None and signals.ttft_count is not None:
        backend.scraped_ttft_totals = (signals.ttft_sum, signals.ttft_count)
        # The mean TTFT of the requests that finished since the last scrape, whoever sent them.
        if previous is not None and signals.ttft_count > previous[1]:
            backend.observe_ttft((signals.ttft_sum - previous[0]) / (signals.ttft_count - previous[1]))


async def _learn_max_context(session: aiohttp.ClientSession, backend: Backend, timeout: float) -> None:
    try:
        status, body = await _get(session, backend, "/v1/models", timeout)
        cards = json.loads(body).get("data", []) if status == 200 else []
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, AttributeError):
        return
    lengths = [card.get("max_model_len") for card in cards if isinstance(card, dict)]
    lengths = [length for length in lengths if isinstance(length, int) and length > 0]
    if lengths:
        backend.learned_max_context = min(lengths)


async def health_loop(session: aiohttp.ClientSession, backends: dict[str, Backend], interval: float,
                      timeout: float) -> None:
    while True:
        await check_all(session, backends, timeout)
        await asyncio.sleep(interval)


async def check_all(session: aiohttp.ClientSession, backends: dict[str, Backend], timeout: float) -> None:
    await asyncio.gather(*(check_backend(session, backend, timeout) for backend in backends.values()))
