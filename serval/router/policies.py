"""Routing policies: which of a group's candidate backends gets a request.

Each policy is a small object with `choose(candidates, request) -> Decision`; it holds only its own state
(a round-robin position, prefix trees). Candidates arrive already filtered by the gateway (healthy, breaker
closed or probing, not yet tried, able to serve the request) and in config order, so every choice here is
deterministic given the backends' state: tests need no processes.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

from serval.router.backends import Backend
from serval.router.config import GroupConfig
from serval.router.prefix_tree import PrefixTree
from serval.router.request_info import RouteRequest

# cost: output tokens assumed when the request does not say (max_tokens absent).
DEFAULT_OUTPUT_TOKENS = 256


@dataclass
class Decision:
    backend: Backend
    reason: str  # why, for the decision metric and the log line: "cache_hit", "least_load", ...


class RoundRobin:
    """Each backend in turn, skipping those not available now. With unequal weights, smooth weighted round
    robin (nginx's): weights 2:1 give a, b, a, a, b, a."""

    def __init__(self) -> None:
        self.order: dict[str, int] = {}  # first-seen position: the rotation survives backends leaving
        self.last: str | None = None
        self.current: dict[str, float] = {}

    def choose(self, candidates: list[Backend], request: RouteRequest) -> Decision:
        for backend in candidates:
            self.order.setdefault(backend.name, len(self.order))
        if len({backend.config.weight for backend in candidates}) > 1:
            return Decision(self._weighted(candidates), "round_robin")
        last = self.order.get(self.last, -1)
        chosen = next((b for b in candidates if self.order[b.name] > last), candidates[0])
        self.last = chosen.name
        return Decision(chosen, "round_robin")

    def _weighted(self, candidates: list[Backend]) -> Backend:
        total = sum(backend.config.weight for backend in candidates)
        for backend in candidates:
            self.current[backend.name] = self.current.get(backend.name, 0.0) + backend.config.weight
        chosen = max(candidates, key=lambda backend: self.current[backend.name])  # first on ties
        self.current[chosen.name] -= total
        self.last = chosen.name
        return chosen


class LeastRequests:
    """Fewest outstanding requests (divided by weight); ties go round robin so idle backends share work."""

    def __init__(self) -> None:
        self.tie_breaker = RoundRobin()

    def choose(self, candidates: list[Backend], request: RouteRequest) -> Decision:
        return Decision(_least_loaded(candidates, self.tie_breaker, request), "least_load")


class CacheAware:
    """SGLang's cache-aware routing: the backend whose recent prompts share the longest prefix with this one,
    when that covers more than cache_threshold of it; otherwise the least loaded (then the one with the
    smallest tree, i.e. the most cache to spare). When loads are too uneven (gap > balance_abs_threshold and
    max > min * balance_rel_threshold), load wins over cache: a hot prefix must not pile onto one replica."""

    def __init__(self, group: GroupConfig) -> None:
        self.group = group
        self.trees: dict[str, PrefixTree] = {}

    def tree(self, backend: Backend) -> PrefixTree:
        if backend.name not in self.trees:
            self.trees[backend.name] = PrefixTree(self.group.max_tree_chars)
        return self.trees[backend.name]

    def choose(self, candidates: list[Backend], request: RouteRequest) -> Decision:
        loads = [backend.weighted_load() for backend in candidates]
        highest, lowest = max(loads), min(loads)
        if (highest - lowest > self.group.balance_abs_threshold
                and highest > lowest * self.group.balance_rel_threshold):
            chosen = min(candidates, key=lambda backend: backend.weighted_load())
            reason = "imbalanced"
        else:
            matches = [self.tree(backend).match(request.text) for backend in candidates]
            best = max(range(len(candidates)), key=lambda i: (matches[i], -loads[i]))
            if request.text and matches[best] / len(request.text) > self.group.cache_threshold:
                chosen, reason = candidates[best], "cache_hit"
            else:
                chosen = min(candidates, key=lambda b: (b.weighted_load(), self.tree(b).num_chars))
                reason = "least_load"
        if request.text:
            self.tree(chosen).insert(request.text)
        return Decision(chosen, reason)


class Session:
    """Sticky sessions by rendezvous (highest-random-weight) hashing of the session key: a consistent hash,
    so when a backend leaves or joins only its own share of sessions moves. Requests without a key (no
    header, no `user`) go to the least loaded."""

    def __init__(self) -> None:
        self.fallback = RoundRobin()

    def choose(self, candidates: list[Backend], request: RouteRequest) -> Decision:
        if not request.session_key:
            return Decision(_least_loaded(candidates, self.fallback, request), "no_session_key")
        return Decision(max(candidates, key=lambda b: _rendezvous_score(request.session_key, b)), "session_hash")


class Cost:
    """The cheapest backend for this request at its estimated tokens (price per 1M input and output tokens);
    ties by load. The gateway has already dropped backends that cannot meet its context or capabilities."""

    def __init__(self) -> None:
        self.tie_breaker = RoundRobin()

    def choose(self, candidates: list[Backend], request: RouteRequest) -> Decision:
        costs = {backend.name: estimated_cost(backend, request) for backend in candidates}
        cheapest = min(costs.values())
        tied = [backend for backend in candidates if costs[backend.name] <= cheapest * (1 + 1e-9)]
        return Decision(_least_loaded(tied, self.tie_breaker, request), "cheapest")


class Latency:
    """Lowest recent time to first token (an exponentially weighted average per backend, from the router's
    own streams and the backends' TTFT histograms). A backend with no sample yet is tried first, so each
    gets measured; ties by load."""

    def __init__(self) -> None:
        self.tie_breaker = RoundRobin()

    def choose(self, candidates: list[Backend], request: RouteRequest) -> Decision:
        unmeasured = [backend for backend in candidates if backend.ttft_ewma is None]
        if unmeasured:
            return Decision(_least_loaded(unmeasured, self.tie_breaker, request), "unmeasured")
        fastest = min(backend.ttft_ewma for backend in candidates)
        tied = [backend for backend in candidates if backend.ttft_ewma <= fastest]
        return Decision(_least_loaded(tied, self.tie_breaker, request), "lowest_ttft")


def make_policy(group: GroupConfig):
    if group.policy == "round_robin":
        return RoundRobin()
    if group.policy == "least_requests":
        return LeastRequests()
    if group.policy == "cache_aware":
        return CacheAware(group)
    if group.policy == "session":
        return Session()
    if group.policy == "cost":
        return Cost()
    if group.policy == "latency":
        return Latency()
    raise ValueError(f"invalid policy {group.policy!r} for model group {group.name!r}")


def estimated_cost(backend: Backend, request: RouteRequest) -> float:
    output_tokens = request.max_tokens if request.max_tokens is not None else DEFAULT_OUTPUT_TOKENS
    return (backend.config.input_price * request.estimated_prompt_tokens
            + backend.config.output_price * output_tokens) / 1e6


def _least_loaded(candidates: list[Backend], tie_breaker: RoundRobin, request: RouteRequest) -> Backend:
    """Fewest outstanding requests; among equals, the emptiest KV cache when the backends report it (the one
    least likely to preempt), then round robin."""
    def key(backend: Backend) -> tuple[float, float]:
        return backend.weighted_load(), backend.kv_cache_usage or 0.0

    lowest = min(key(backend) for backend in candidates)
    tied = [backend for backend in candidates if key(backend) <= lowest]
    return tied[0] if len(tied) == 1 else tie_breaker.choose(tied, request).backend


def _rendezvous_score(key: str, backend: Backend) -> float:
    """Weighted rendezvous hashing: -weight / ln(u), u uniform in (0, 1) from a stable hash of key+backend."""
    digest = hashlib.blake2b(f"{key}\x00{backend.name}".encode(), digest_size=8).digest()
    uniform = (int.from_bytes(digest, "big") + 1) / (2 ** 64 + 2)
    return -backend.config.weight / math.log(uniform)
