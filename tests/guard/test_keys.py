"""API keys and limits, on a fake clock: no test waits for real time."""
import pytest

from serval.guard.decisions import GuardRejection
from serval.guard.keys import KeyStore, hash_key, main
from serval.guard.policy import KeyPolicy


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def store(clock=None, **limits) -> tuple[KeyStore, KeyPolicy]:
    key = KeyPolicy(id="k", sha256=hash_key("sk-good"), **limits)
    return KeyStore((key,), clock or Clock()), key


def rejected(call) -> GuardRejection:
    with pytest.raises(GuardRejection) as error:
        call()
    return error.value


def test_authenticate():
    keys, key = store()
    assert keys.authenticate("Bearer sk-good") is key
    assert rejected(lambda: keys.authenticate(None)).status == 401
    assert rejected(lambda: keys.authenticate("Bearer sk-bad")).code == "invalid_api_key"
    assert rejected(lambda: keys.authenticate("Basic sk-good")).status == 401


def test_models():
    keys, key = store(models=("llama",))
    keys.admit(key, "llama")
    error = rejected(lambda: keys.admit(key, "qwen"))
    assert (error.status, error.code, error.param) == (403, "model_not_allowed", "model")


def test_requests_per_minute_window_slides():
    clock = Clock()
    keys, key = store(clock, requests_per_minute=2)
    keys.admit(key, "m")
    clock.now += 20
    keys.admit(key, "m")
    error = rejected(lambda: keys.admit(key, "m"))
    assert (error.status, error.retry_after) == (429, 40)  # the first request leaves the window in 40 s
    clock.now += 40
    keys.admit(key, "m")
    assert keys.usage["k"].rejected_total == 1


def test_tokens_per_minute():
    clock = Clock()
    keys, key = store(clock, tokens_per_minute=100)
    keys.admit(key, "m")
    keys.release(key, 30, 40)
    clock.now += 10
    keys.admit(key, "m")
    keys.release(key, 20, 20)
    error = rejected(lambda: keys.admit(key, "m"))
    # 110 tokens in the window; once the first 70 age out (at +60 s from their charge) it is under the limit.
    assert error.status == 429 and error.retry_after == 50 and "tokens per minute" in error.message
    clock.now += 50
    keys.admit(key, "m")


def test_token_budget_and_concurrency():
    keys, key = store(token_budget=50, max_concurrent_requests=1)
    keys.admit(key, "m")
    error = rejected(lambda: keys.admit(key, "m"))
    assert (error.status, error.retry_after, error.rail) == (429, 1, "max_concurrent_requests")
    keys.release(key, 30, 25)
    error = rejected(lambda: keys.admit(key, "m"))
    assert (error.code, error.retry_after) == ("insufficient_quota", None)


def test_reload_keeps_usage():
    keys, key = store(token_budget=10)
    keys.admit(key, "m")
    keys.release(key, 10, 0)
    keys.set_keys((KeyPolicy(id="k", sha256=hash_key("sk-new"), token_budget=10),))
    new_key = keys.authenticate("Bearer sk-new")
    assert rejected(lambda: keys.admit(new_key, "m")).code == "insufficient_quota"
    assert rejected(lambda: keys.authenticate("Bearer sk-good")).status == 401


def test_hash_command(capsys):
    assert main(["hash", "sk-good"]) == 0
    assert capsys.readouterr().out.strip() == hash_key("sk-good")
    assert main([]) == 2


# ---------------------------------------------------------------- reservations (issue 13, defect 7)
def test_a_reservation_holds_the_budget_until_settled():
    keys, key = store(token_budget=100)
    keys.admit(key, "m")
    first = keys.reserve(key, 60)  # prompt + max_tokens
    keys.admit(key, "m")
    error = rejected(lambda: keys.reserve(key, 50))
    # Running requests hold the rest: worth retrying soon, unlike a spent budget.
    assert (error.status, error.code, error.rail, error.retry_after) == (429, "rate_limit_exceeded", "token_budget", 1)
    keys.release(key, 0, 0)
    keys.release(key, 10, 15, first)  # used 25 of 60: 35 refunded
    usage = keys.usage["k"]
    assert (usage.tokens_total, usage.reserved_tokens, usage.in_flight) == (25, 0, 0)
    keys.admit(key, "m")
    second = keys.reserve(key, 75)  # exactly what is left
    error = rejected(lambda: keys.admit(key, "m"))  # all of it reserved: nothing to admit against until it ends
    assert (error.code, error.rail, error.retry_after) == ("rate_limit_exceeded", "token_budget", 1)
    keys.release(key, 40, 35, second)
    error = rejected(lambda: keys.admit(key, "m"))
    assert (error.code, error.retry_after) == ("insufficient_quota", None)


def test_a_request_larger_than_what_is_left_is_refused_up_front():
    keys, key = store(token_budget=100)
    keys.admit(key, "m")
    keys.release(key, 50, 20, keys.reserve(key, 70))
    keys.admit(key, "m")
    error = rejected(lambda: keys.reserve(key, 31))
    assert (error.status, error.code, error.retry_after) == (429, "insufficient_quota", None)
    assert "30 tokens left" in error.message and "max_tokens" in error.message
    keys.release(key, 0, 0)
    assert keys.usage["k"].rejected_total == 1


def test_tokens_per_minute_reservations():
    clock = Clock()
    keys, key = store(clock, tokens_per_minute=100)
    keys.admit(key, "m")
    first = keys.reserve(key, 80)
    clock.now += 10
    keys.admit(key, "m")
    error = rejected(lambda: keys.reserve(key, 30))
    # 80 reserved 10 s ago leave 20: room for 30 once it ages out, 50 s from now.
    assert (error.status, error.rail, error.retry_after) == (429, "tokens_per_minute", 50)
    keys.release(key, 0, 0)
    keys.release(key, 20, 10, first)  # settled at 30: its charge keeps its time, the rest is refunded now
    keys.admit(key, "m")
    keys.release(key, 30, 40, keys.reserve(key, 70))
    error = rejected(lambda: keys.admit(key, "m"))
    assert (error.rail, error.retry_after) == ("tokens_per_minute", 50)
    too_large = rejected(lambda: keys.reserve(key, 101))
    assert (too_large.status, too_large.retry_after) == (429, None) and "Request too large" in too_large.message


def test_usage_beyond_the_reservation_is_charged_when_settled():
    # The router estimates prompt tokens from characters: a request may use more than it reserved.
    clock = Clock()
    keys, key = store(clock, tokens_per_minute=1000, token_budget=1000)
    keys.admit(key, "m")
    reservation = keys.reserve(key, 10)
    clock.now += 5
    keys.release(key, 8, 12, reservation)
    usage = keys.usage["k"]
    assert usage.tokens_total == 20 and [(c.time, c.tokens) for c in usage.token_events] == [(1000.0, 10),
                                                                                            (1005.0, 10)]
