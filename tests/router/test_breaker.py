"""The circuit breaker: open after N consecutive failures, half-open after the cooldown, one probe at a time."""
from serval.router.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker


def test_opens_after_consecutive_failures_only():
    breaker = CircuitBreaker(failure_threshold=3, cooldown=10)
    breaker.record_failure(0)
    breaker.record_failure(0)
    breaker.record_success()  # resets the count
    breaker.record_failure(1)
    breaker.record_failure(1)
    assert breaker.current_state(1) == CLOSED and breaker.allows(1)
    breaker.record_failure(2)
    assert breaker.current_state(2) == OPEN and not breaker.allows(5) and breaker.times_opened == 1


def test_half_open_lets_one_probe_and_its_result_decides():
    breaker = CircuitBreaker(failure_threshold=1, cooldown=10)
    breaker.record_failure(0)
    assert not breaker.acquire(9.9)
    assert breaker.current_state(10) == HALF_OPEN and breaker.allows(10)
    assert breaker.acquire(10) and not breaker.acquire(10)  # the single probe slot
    breaker.record_failure(11)  # the probe failed: open again for a whole cooldown
    assert breaker.current_state(20) == OPEN and breaker.times_opened == 2
    assert breaker.acquire(21)
    breaker.record_success()
    assert breaker.current_state(21) == CLOSED and breaker.acquire(21) and breaker.acquire(21)


def test_release_frees_the_probe_without_deciding():
    breaker = CircuitBreaker(failure_threshold=1, cooldown=1)
    breaker.record_failure(0)
    assert breaker.acquire(1)
    breaker.release()  # e.g. the client went away
    assert breaker.current_state(1) == HALF_OPEN and breaker.acquire(1)
