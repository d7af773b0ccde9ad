"""Each policy's choice, from backends' state alone: no processes, no clock."""
from collections import Counter

from serval.router.backends import Backend
from serval.router.breaker import CircuitBreaker
from serval.router.config import BackendConfig, GroupConfig
from serval.router.policies import (CacheAware, Cost, LeastRequests, Latency, RoundRobin, Session, estimated_cost,
                                    make_policy)
from serval.router.request_info import RouteRequest


def backends(*names, **fields) -> list[Backend]:
    return [Backend(BackendConfig(name=name, url="http://127.0.0.1:1", models=["m"], **fields), CircuitBreaker())
            for name in names]


def req(text: str = "hello", **fields) -> RouteRequest:
    return RouteRequest(model="m", text=text, **fields)


def names(policy, candidates, requests) -> list[str]:
    return [policy.choose(candidates, request).backend.name for request in requests]


def test_round_robin_cycles_and_respects_weights():
    assert names(RoundRobin(), backends("a", "b", "c"), [req()] * 6) == ["a", "b", "c", "a", "b", "c"]
    a, b = backends("a", "b")
    a.config.weight = 2
    assert names(RoundRobin(), [a, b], [req()] * 6) == ["a", "b", "a", "a", "b", "a"]


def test_round_robin_skips_a_missing_backend_without_losing_its_place():
    policy = RoundRobin()
    a, b, c = backends("a", "b", "c")
    assert names(policy, [a, b, c], [req()] * 2) == ["a", "b"]
    assert names(policy, [a, c], [req()] * 3) == ["c", "a", "c"]  # b is down


def test_least_requests_picks_the_least_loaded_and_rotates_ties():
    a, b, c = backends("a", "b", "c")
    a.in_flight, b.in_flight, c.in_flight = 2, 0, 1
    assert LeastRequests().choose([a, b, c], req()).backend is b
    b.scraped_waiting = 5  # the backend says it is busier than the router alone knows
    assert LeastRequests().choose([a, b, c], req()).backend is c
    idle = backends("x", "y")
    assert names(LeastRequests(), idle, [req()] * 4) == ["x", "y", "x", "y"]
    idle[0].kv_cache_usage, idle[1].kv_cache_usage = 0.9, 0.2  # equal load: the emptier KV cache
    assert names(LeastRequests(), idle, [req()] * 2) == ["y", "y"]


def test_cache_aware_sticks_prefixes_to_a_backend_and_spreads_new_ones():
    policy = CacheAware(GroupConfig(name="m", backends=["a", "b"]))
    a, b = backends("a", "b")
    system_1, system_2 = "You are a pirate. " * 20, "You are a lawyer. " * 20
    first = policy.choose([a, b], req(system_1 + "q1"))
    assert first.reason == "least_load" and first.backend is a
    second = policy.choose([a, b], req(system_2 + "q1"))
    assert second.reason == "least_load" and second.backend is b  # equal load: the smaller tree
    for question in ("q2", "q3", "another question"):
        assert policy.choose([a, b], req(system_1 + question)).backend is a
        decision = policy.choose([a, b], req(system_2 + question))
        assert decision.backend is b and decision.reason == "cache_hit"


def test_cache_aware_ignores_the_cache_when_load_is_too_uneven():
    group = GroupConfig(name="m", backends=["a", "b"], balance_abs_threshold=4, balance_rel_threshold=1.5)
    policy = CacheAware(group)
    a, b = backends("a", "b")
    prompt = "shared system prompt " * 10
    assert policy.choose([a, b], req(prompt + "1")).backend is a
    a.in_flight = 4  # gap 4: not above the threshold
    assert policy.choose([a, b], req(prompt + "2")).backend is a
    a.in_flight = 5
    decision = policy.choose([a, b], req(prompt + "3"))
    assert decision.backend is b and decision.reason == "imbalanced"


def test_cache_aware_threshold_decides_between_cache_and_load():
    policy = CacheAware(GroupConfig(name="m", backends=["a", "b"], cache_threshold=0.5))
    a, b = backends("a", "b")
    policy.choose([a, b], req("abcdefgh"))  # -> a
    a.in_flight = 1
    assert policy.choose([a, b], req("abcd" + "z" * 10)).backend is b  # 4/14 matched: load decides
    assert policy.choose([a, b], req("abcdefg" + "z")).backend is a  # 7/8 matched: cache decides


def test_session_is_sticky_and_only_moves_the_removed_backends_sessions():
    policy = Session()
    a, b, c = backends("a", "b", "c")
    sessions = [f"user-{i}" for i in range(300)]
    before = {key: policy.choose([a, b, c], req(session_key=key)).backend.name for key in sessions}
    assert before == {key: policy.choose([a, b, c], req(session_key=key)).backend.name for key in sessions}
    assert min(Counter(before.values()).values()) > 60  # spread over all three
    after = {key: policy.choose([a, c], req(session_key=key)).backend.name for key in sessions}
    moved = [key for key in sessions if before[key] != after[key]]
    assert moved and all(before[key] == "b" for key in moved)
    assert policy.choose([a, b, c], req()).reason == "no_session_key"


def test_cost_picks_the_cheapest_for_the_request():
    cheap_in, cheap_out = backends("cheap-in", input_price=0.1, output_price=2.0) + \
        backends("cheap-out", input_price=1.0, output_price=0.2)
    long_prompt = req("x" * 40_000, max_tokens=10)  # ~10k prompt tokens
    long_output = req("short", max_tokens=2000)
    assert Cost().choose([cheap_in, cheap_out], long_prompt).backend is cheap_in
    assert Cost().choose([cheap_in, cheap_out], long_output).backend is cheap_out
    assert estimated_cost(cheap_in, long_prompt) == (0.1 * 10_000 + 2.0 * 10) / 1e6


def test_latency_measures_everyone_then_prefers_the_fastest():
    a, b = backends("a", "b")
    a.observe_ttft(0.5)
    assert Latency().choose([a, b], req()).reason == "unmeasured"
    b.observe_ttft(0.2)
    decision = Latency().choose([a, b], req())
    assert decision.backend is b and decision.reason == "lowest_ttft"
    for _ in range(5):
        b.observe_ttft(2.0)  # b got slow: the average follows within a few requests
    assert Latency().choose([a, b], req()).backend is a


def test_make_policy_covers_every_name():
    for policy in ("round_robin", "least_requests", "cache_aware", "session", "cost", "latency"):
        assert make_policy(GroupConfig(name="m", backends=["a"], policy=policy)) is not None
