"""A circuit breaker per backend: closed → open after N consecutive failures → half-open after a cooldown.

Half-open lets exactly one probe request through; its success closes the breaker, its failure re-opens it
for another cooldown. Time is passed in, so the state machine is a pure function of its inputs (tests
need no clock).
"""
from __future__ import annotations

from dataclasses import dataclass

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
STATE_VALUES = {CLOSED: 0, OPEN: 1, HALF_OPEN: 2}  # the breaker-state gauge's values


@dataclass
class CircuitBreaker:
    failure_threshold: int = 3
    cooldown: float = 10.0
    state: str = CLOSED
    consecutive_failures: int = 0
    opened_at: float = 0.0
    probe_in_flight: bool = False
    times_opened: int = 0

    def current_state(self, now: float) -> str:
        if self.state == OPEN and now - self.opened_at >= self.cooldown:
            self.state, self.probe_in_flight = HALF_OPEN, False
        return self.state

    def allows(self, now: float) -> bool:
        """Could a request go to this backend now? (Does not reserve the probe slot: see acquire.)"""
        state = self.current_state(now)
        return state == CLOSED or (state == HALF_OPEN and not self.probe_in_flight)

    def acquire(self, now: float) -> bool:
        """Called when a request is sent; in half-open, the first caller takes the single probe slot."""
        state = self.current_state(now)
        if state == CLOSED:
            return True
        if state == HALF_OPEN and not self.probe_in_flight:
            self.probe_in_flight = True
            return True
        return False

    def record_success(self) -> None:
        self.state, self.consecutive_failures, self.probe_in_flight = CLOSED, 0, False

    def record_failure(self, now: float) -> None:
        self.consecutive_failures += 1
        if self.state == HALF_OPEN or self.consecutive_failures >= self.failure_threshold:
            if self.state != OPEN:
                self.times_opened += 1
            self.state, self.opened_at, self.probe_in_flight = OPEN, now, False

    def release(self) -> None:
        """A request ended with neither success nor failure (a client error, a disconnect): free the probe."""
        self.probe_in_flight = False
