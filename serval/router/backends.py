"""A backend's live state: its config plus what the router knows of it now (in flight, health, load, TTFT).

Policies read this; the gateway updates in_flight and TTFT as requests run; the health loop updates health
and the scraped load signals. One object per backend, shared by every group that uses it.
"""
from __future__ import annotations

from dataclasses import dataclass

from serval.router.breaker import CircuitBreaker
from serval.router.config import BackendConfig, RouterConfig

# Weight of the newest TTFT sample in the moving average: ~the last 5 requests dominate.
TTFT_EWMA_ALPHA = 0.3


@dataclass
class Backend:
    config: BackendConfig
    breaker: CircuitBreaker
    in_flight: int = 0
    healthy: bool = True  # from active health checks; True until one fails
    health_error: str | None = None
    # From the backend's /metrics (None: not offered or not scraped yet).
    scraped_running: float | None = None
    scraped_waiting: float | None = None
    kv_cache_usage: float | None = None
    ttft_ewma: float | None = None  # seconds
    scraped_ttft_totals: tuple[float, float] | None = None  # (sum, count) of its TTFT histogram at the last scrape
    learned_max_context: int | None = None  # from its /v1/models max_model_len

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def max_context(self) -> int | None:
        return self.config.max_context or self.learned_max_context

    def model_for(self, group_name: str) -> str:
        """The model name to send: the group's own when this backend serves it, else its first."""
        return group_name if group_name in self.config.models else self.config.models[0]

    def load(self) -> float:
        """Outstanding requests. The router's own count is exact but misses other clients; the backend's
        running + waiting covers them but lags a scrape interval; the larger of the two, so neither
        double-counts the router's own requests."""
        scraped = (self.scraped_running or 0.0) + (self.scraped_waiting or 0.0)
        return max(float(self.in_flight), scraped)

    def weighted_load(self) -> float:
        return self.load() / self.config.weight

    def observe_ttft(self, seconds: float) -> None:
        if self.ttft_ewma is None:
            self.ttft_ewma = seconds
        else:
            self.ttft_ewma = TTFT_EWMA_ALPHA * seconds + (1 - TTFT_EWMA_ALPHA) * self.ttft_ewma

    def available(self, now: float) -> bool:
        return self.healthy and self.breaker.allows(now)

    def unavailable_reason(self, now: float) -> str:
        if not self.healthy:
            return f"unhealthy ({self.health_error})"
        return f"circuit breaker {self.breaker.current_state(now)}"


def build_backends(config: RouterConfig) -> dict[str, Backend]:
    return {name: Backend(backend, CircuitBreaker(config.failure_threshold, config.cooldown))
            for name, backend in config.backends.items()}
