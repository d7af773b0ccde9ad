"""API keys and their limits: authentication against SHA-256 digests, requests and tokens per minute (sliding
60-second windows), a total token budget and a cap on concurrent requests.

Usage lives in memory, keyed by key id, and survives a policy reload (a key's budget isn't reset by SIGHUP);
it does not survive a restart.

Tokens are reserved when a request is admitted (prompt + max_tokens: the most it can use) and settled when it
ends (the unused part refunded), so concurrent requests can't together spend more than the budget or the
per-minute limit: a request whose reservation doesn't fit is refused up front. A reservation's charge in the
per-minute window keeps its admission time and shrinks to the tokens actually used.

`python -m serval.guard.keys hash KEY` prints the digest to put in the policy file.
"""
from __future__ import annotations

import hashlib
import hmac
import math
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from serval.guard.decisions import GuardRejection
from serval.guard.policy import KeyPolicy

WINDOW_SECONDS = 60.0


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass
class TokenCharge:
    """Tokens counted against the per-minute window from `time`; a reservation's charge shrinks when settled."""
    time: float
    tokens: int


@dataclass
class Reservation:
    """Tokens held for one admitted request until it is settled by `KeyStore.release`."""
    key_id: str
    tokens: int
    charge: TokenCharge


@dataclass
class KeyUsage:
    request_times: deque = field(default_factory=deque)   # admission times in the window
    token_events: deque = field(default_factory=deque)    # TokenCharge, oldest first, in the window
    in_flight: int = 0
    reserved_tokens: int = 0                              # held by requests still running
    requests_total: int = 0
    prompt_tokens_total: int = 0
    completion_tokens_total: int = 0
    rejected_total: int = 0

    @property
    def tokens_total(self) -> int:
        return self.prompt_tokens_total + self.completion_tokens_total


class KeyStore:
    def __init__(self, keys: tuple[KeyPolicy, ...], clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self.usage: dict[str, KeyUsage] = {}
        self.set_keys(keys)

    def set_keys(self, keys: tuple[KeyPolicy, ...]) -> None:
        """Replace the keys (a policy reload); usage of ids that remain is kept."""
        with self._lock:
            self.by_digest = {key.sha256: key for key in keys}
            for key in keys:
                self.usage.setdefault(key.id, KeyUsage())

    def authenticate(self, authorization: str | None) -> KeyPolicy:
        """The key of an 'Authorization: Bearer KEY' header, or GuardRejection 401."""
        token = None
        if authorization and authorization[:7].lower() == "bearer ":
            token = authorization[7:].strip()
        if not token:
            raise GuardRejection(401, "Missing API key: send 'Authorization: Bearer <key>'.", "invalid_api_key",
                                 rail="api_key")
        digest = hash_key(token)
        # Digests are compared in constant time so response timing says nothing about near-miss keys.
        key = next((k for d, k in self.by_digest.items() if hmac.compare_digest(d, digest)), None)
        if key is None:
            raise GuardRejection(401, "Incorrect API key provided.", "invalid_api_key", rail="api_key")
        return key

    def admit(self, key: KeyPolicy, model: str) -> None:
        """Check the model and the limits and count the request in; raises GuardRejection 403 or 429.
        Every admitted request must be released exactly once."""
        if key.models is not None and model not in key.models:
            raise GuardRejection(403, f"The API key {key.id!r} may not use the model {model!r}; it may use "
                                      f"{list(key.models)}.", "model_not_allowed", rail="api_key", param="model")
        with self._lock:
            usage = self.usage.setdefault(key.id, KeyUsage())
            now = self.clock()
            self._expire(usage, now)
            try:
                self._check_limits(key, usage, now)
            except GuardRejection:
                usage.rejected_total += 1
                raise
            usage.request_times.append(now)
            usage.in_flight += 1
            usage.requests_total += 1

    def reserve(self, key: KeyPolicy, tokens: int) -> Reservation:
        """Hold `tokens` (prompt + max_tokens) against the budget and the per-minute window, or GuardRejection 429.
        The reservation must be handed back to `release`."""
        with self._lock:
            usage = self.usage.setdefault(key.id, KeyUsage())
            now = self.clock()
            self._expire(usage, now)
            try:
                self._check_reservation(key, usage, tokens, now)
            except GuardRejection:
                usage.rejected_total += 1
                raise
            charge = TokenCharge(now, tokens)
            if tokens:
                usage.token_events.append(charge)
            usage.reserved_tokens += tokens
            return Reservation(key.id, tokens, charge)

    def release(self, key: KeyPolicy, prompt_tokens: int, completion_tokens: int,
                reservation: Reservation | None = None) -> None:
        """Count the request out and charge what it used; with a reservation, settle it (refund the rest)."""
        used = prompt_tokens + completion_tokens
        with self._lock:
            usage = self.usage.setdefault(key.id, KeyUsage())
            usage.in_flight = max(0, usage.in_flight - 1)
            usage.prompt_tokens_total += prompt_tokens
            usage.completion_tokens_total += completion_tokens
            if reservation is None:
                if used:
                    usage.token_events.append(TokenCharge(self.clock(), used))
                return
            usage.reserved_tokens = max(0, usage.reserved_tokens - reservation.tokens)
            # The window keeps the admission time; a request that used more than it reserved (the router's
            # estimates) is charged the excess now.
            excess = max(0, used - reservation.charge.tokens)
            reservation.charge.tokens = min(used, reservation.charge.tokens)
            if excess:
                usage.token_events.append(TokenCharge(self.clock(), excess))

    def _check_limits(self, key: KeyPolicy, usage: KeyUsage, now: float) -> None:
        if key.token_budget is not None and usage.tokens_total + usage.reserved_tokens >= key.token_budget:
            if usage.tokens_total < key.token_budget:
                raise GuardRejection(429, f"The API key {key.id!r} has the rest of its token budget reserved by "
                                          "requests still running.", "rate_limit_exceeded", rail="token_budget",
                                     retry_after=1)
            raise GuardRejection(429, f"The API key {key.id!r} has used its token budget: {usage.tokens_total} of "
                                      f"{key.token_budget} tokens.", "insufficient_quota", rail="token_budget")
        if key.max_concurrent_requests is not None and usage.in_flight >= key.max_concurrent_requests:
            raise GuardRejection(429, f"The API key {key.id!r} has {usage.in_flight} requests running; its limit "
                                      f"is {key.max_concurrent_requests} at once.", "rate_limit_exceeded",
                                 rail="max_concurrent_requests", retry_after=1)
        if key.requests_per_minute is not None and len(usage.request_times) >= key.requests_per_minute:
            wait = usage.request_times[0] + WINDOW_SECONDS - now
            raise GuardRejection(429, f"The API key {key.id!r} is over its limit of {key.requests_per_minute} "
                                      "requests per minute.", "rate_limit_exceeded", rail="requests_per_minute",
                                 retry_after=_seconds(wait))
        if key.tokens_per_minute is not None:
            used = sum(charge.tokens for charge in usage.token_events)
            if used >= key.tokens_per_minute:
                raise GuardRejection(429, f"The API key {key.id!r} is over its limit of {key.tokens_per_minute} "
                                          f"tokens per minute ({used} used in the last minute).",
                                     "rate_limit_exceeded", rail="tokens_per_minute",
                                     retry_after=_seconds(_window_wait(usage, key.tokens_per_minute - 1, now)))

    def _check_reservation(self, key: KeyPolicy, usage: KeyUsage, tokens: int, now: float) -> None:
        if key.token_budget is not None:
            left = key.token_budget - usage.tokens_total
            if tokens > left:
                raise GuardRejection(429, f"The API key {key.id!r} has {max(0, left)} tokens left of its budget of "
                                          f"{key.token_budget}; this request may use up to {tokens} (prompt + "
                                          "max_tokens). Lower max_tokens.", "insufficient_quota",
                                     rail="token_budget")
            if tokens > left - usage.reserved_tokens:
                raise GuardRejection(429, f"The API key {key.id!r} has {usage.reserved_tokens} of its remaining "
                                          f"{left} budget tokens reserved by requests still running; this request "
                                          f"may use up to {tokens}.", "rate_limit_exceeded", rail="token_budget",
                                     retry_after=1)
        if key.tokens_per_minute is not None:
            if tokens > key.tokens_per_minute:
                raise GuardRejection(429, f"Request too large: it may use up to {tokens} tokens (prompt + "
                                          f"max_tokens); the API key {key.id!r} is limited to "
                                          f"{key.tokens_per_minute} tokens per minute. Lower max_tokens.",
                                     "rate_limit_exceeded", rail="tokens_per_minute")
            used = sum(charge.tokens for charge in usage.token_events)
            if used + tokens > key.tokens_per_minute:
                wait = _window_wait(usage, key.tokens_per_minute - tokens, now)
                raise GuardRejection(429, f"The API key {key.id!r} is over its limit of {key.tokens_per_minute} "
                                          f"tokens per minute ({used} used or reserved in the last minute; this "
                                          f"request may use up to {tokens}).", "rate_limit_exceeded",
                                     rail="tokens_per_minute", retry_after=_seconds(wait))

    @staticmethod
    def _expire(usage: KeyUsage, now: float) -> None:
        while usage.request_times and usage.request_times[0] <= now - WINDOW_SECONDS:
            usage.request_times.popleft()
        while usage.token_events and usage.token_events[0].time <= now - WINDOW_SECONDS:
            usage.token_events.popleft()


def _window_wait(usage: KeyUsage, allowed: int, now: float) -> float:
    """Seconds until the window's charges age out to `allowed` tokens or fewer."""
    used, wait = sum(charge.tokens for charge in usage.token_events), 0.0
    for charge in usage.token_events:
        if used <= allowed:
            break
        used -= charge.tokens
        wait = charge.time + WINDOW_SECONDS - now
    return wait


def _seconds(wait: float) -> int:
    return max(1, math.ceil(wait))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "hash":
        sys.stderr.write("usage: python -m serval.guard.keys hash KEY\n")
        return 2
    sys.stdout.write(hash_key(argv[1]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
