"""The per-request guard session with real policies and real rails: the null session, keys and limits, input
rails, the classifier, output rails whole and streamed, release once; the observer feeding real metrics."""
import asyncio
import json
import logging

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram

from serval.guard.decisions import GuardRejection
from serval.guard.guard import Guard
from serval.guard.keys import hash_key
from serval.guard.session import GuardMetricsObserver, open_session, reload_policy

POLICY = f"""
keys:
  - {{id: a, sha256: {hash_key("sk-a")}, models: [m], max_concurrent_requests: 2}}
  - {{id: b, sha256: {hash_key("sk-b")}, token_budget: 100}}
input:
  max_prompt_tokens: 50
  deny: [{{name: bomb, pattern: "build a bomb", action: block}}]
  pii: [{{types: [secret], action: block}}, {{types: [email], action: redact}}]
output:
  pii: {{types: [email], action: redact}}
  deny: [{{name: falcon, pattern: "project falcon", action: stop}}]
audit: {{path: audit.jsonl}}
"""


@pytest.fixture
def guard(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "policy.yaml").write_text(POLICY)
    return Guard.from_file(str(tmp_path / "policy.yaml"))


def rejected(call) -> GuardRejection:
    with pytest.raises(GuardRejection) as info:
        call()
    return info.value


def test_null_session_passes_everything_through():
    session = open_session(None, "req-1")
    assert not session.active and session.ctx.request_id == "req-1"
    session.authenticate(None)
    session.admit("any")
    session.reserve(10**9, 10**9)
    assert session.check_input(["build a bomb"]) == ["build a bomb"]
    session.check_prompt_tokens(10**9)
    asyncio.run(session.classify([[{"role": "user", "content": "x"}]]))
    assert session.filter_whole("mail a@b.org") == ("mail a@b.org", False)
    stream = session.stream_filter()
    assert stream.push("a@b") == ("a@b", False) and stream.finish() == ("", False)
    session.release(1, 1)


def test_request_lifecycle(guard, tmp_path):
    session = open_session(guard, "req-1")
    assert session.active
    session.authenticate("Bearer sk-a")
    assert session.ctx.key_id == "a"
    session.admit("m")
    assert session.check_input(["mail me: bob@example.com", "hi"]) == ["mail me: [REDACTED:email]", "hi"]
    session.check_prompt_tokens(50)
    assert rejected(lambda: session.check_prompt_tokens(51)).code == "prompt_too_long"
    assert session.filter_whole("reach me at x@y.org") == ("reach me at [REDACTED:email]", False)
    assert session.filter_whole("about project falcon: secret") == ("about ", True)
    assert guard.keys.usage["a"].in_flight == 1
    session.release(5, 7)
    session.release(5, 7)  # acts once
    usage = guard.keys.usage["a"]
    assert (usage.in_flight, usage.tokens_total) == (0, 12)
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert {(r["rail"], r["action"], r["request_id"], r["key_id"]) for r in records} >= {
        ("input_pii", "redact", "req-1", "a"), ("output_pii", "redact", "req-1", "a"),
        ("output_deny", "stop", "req-1", "a")}


def test_rejections(guard):
    assert rejected(lambda: open_session(guard, "r").authenticate(None)).status == 401
    assert rejected(lambda: open_session(guard, "r").authenticate("Bearer sk-nope")).status == 401
    session = open_session(guard, "r")
    session.use_key(guard.keys.authenticate("bearer  sk-a"))
    error = rejected(lambda: session.admit("other"))
    assert (error.status, error.code, error.param) == (403, "model_not_allowed", "model")
    session.release(0, 0)  # never admitted: nothing to count out
    assert guard.keys.usage["a"].in_flight == 0
    session = open_session(guard, "r")
    session.authenticate("Bearer sk-a")
    session.admit("m")
    error = rejected(lambda: session.check_input(["how to build a bomb"]))
    assert (error.status, error.rail, error.param) == (400, "input_deny", "messages")
    error = rejected(lambda: session.check_input(["token sk-proj-" + "a1B2" * 10], "prompt"))
    assert (error.rail, error.param) == ("input_pii", "prompt")
    session.release(0, 0)


def test_concurrency_limit_and_release(guard):
    sessions = []
    for _ in range(2):
        session = open_session(guard, "r")
        session.authenticate("Bearer sk-a")
        session.admit("m")
        sessions.append(session)
    third = open_session(guard, "r")
    third.authenticate("Bearer sk-a")
    error = rejected(lambda: third.admit("m"))
    assert (error.status, error.rail, error.retry_after) == (429, "max_concurrent_requests", 1)
    sessions[0].release(1, 1)
    third.admit("m")


def test_stream_filters_per_choice(guard):
    session = open_session(guard, "r")
    choices = session.choice_filters(2)
    sent = {0: "", 1: ""}
    for index, delta in [(0, "mail fred@exa"), (1, "about project "), (0, "mple.com now"), (1, "falcon: x")]:
        text, stopped = choices.filter(index, delta, finished=False)
        sent[index] += text
        if stopped:
            assert index == 1 and choices.done(1)
    text, stopped = choices.filter(0, "", finished=True)
    sent[0] += text
    assert sent == {0: "mail [REDACTED:email] now", 1: "about "}
    assert choices.all_stopped is False and choices.filter(1, "more", finished=True) == ("", True)


def test_classifier_unavailable_blocks_with_503(tmp_path):
    # A real HTTP client against a port nothing listens on: no verdict, and on_error defaults to block.
    (tmp_path / "p.yaml").write_text("input:\n  classifier: {url: 'http://127.0.0.1:9/v1', model: g, "
                                     "timeout_seconds: 2}\n")
    guard = Guard.from_file(str(tmp_path / "p.yaml"))

    async def run():
        session = open_session(guard, "r")
        try:
            with pytest.raises(GuardRejection) as info:
                await session.classify([[{"role": "user", "content": "hi"}]])
            return info.value
        finally:
            await guard.aclose()

    error = asyncio.run(run())
    assert (error.status, error.code) == (503, "classifier_unavailable")


def test_metrics_observer_counts_decisions_and_latencies(guard):
    registry = CollectorRegistry()
    decisions = Counter("serval:guard_decisions", "d", ["rail", "action"], registry=registry)
    latency = Histogram("serval:guard_latency_seconds", "l", ["rail"], registry=registry)
    guard.observers.append(GuardMetricsObserver(decisions, latency))
    session = open_session(guard, "r")
    session.check_input(["bob@example.com"])
    session.filter_whole("about project falcon")
    assert registry.get_sample_value("serval:guard_decisions_total", {"rail": "input_pii", "action": "redact"}) == 1
    assert registry.get_sample_value("serval:guard_decisions_total", {"rail": "output_deny", "action": "stop"}) == 1
    assert registry.get_sample_value("serval:guard_latency_seconds_count", {"rail": "input_deny"}) == 1


def test_reload_policy_keeps_the_running_one_on_a_bad_file(guard, tmp_path, caplog):
    path = tmp_path / "policy.yaml"
    path.write_text("input:\n  injection:\n    action: blok\n")
    with caplog.at_level(logging.ERROR):
        reload_policy(guard)
    assert "policy reload failed" in caplog.text and guard.policy.input_deny
    path.write_text("input:\n  deny: [{name: x, pattern: xyzzy}]\n")
    reload_policy(guard)
    assert guard.policy.input_deny[0].name == "x" and guard.policy.keys is None
    reload_policy(None)  # no policy: logged, nothing else


# ---------------------------------------------------------------- budgets under concurrency (issue 13, defect 7)
BUDGET_POLICY = f"""
keys:
  - {{id: budget, sha256: {hash_key("sk-budget")}, token_budget: 200}}
  - {{id: tpm, sha256: {hash_key("sk-tpm")}, tokens_per_minute: 300}}
"""


def test_concurrent_requests_never_spend_more_than_the_budget(tmp_path):
    """The issue's case: 16 concurrent requests under a 200-token budget were served 614 tokens. Each request
    here uses its whole reservation (prompt 10 + max_tokens 30), the worst case for the budget."""
    (tmp_path / "p.yaml").write_text(BUDGET_POLICY)
    guard = Guard.from_file(str(tmp_path / "p.yaml"))
    served, refusals = [], []

    async def request(number: int) -> None:
        session = open_session(guard, f"req-{number}")
        session.authenticate("Bearer sk-budget")
        prompt_tokens, max_tokens, completion_tokens = 10, 30, 0
        try:
            session.admit("m")
            session.reserve(prompt_tokens, max_tokens)
            for _ in range(max_tokens):  # decoding: every request is admitted before any finishes
                await asyncio.sleep(0)
                completion_tokens += 1
            served.append(prompt_tokens + completion_tokens)
        except GuardRejection as rejection:
            refusals.append((rejection.status, rejection.code, rejection.retry_after))
        finally:
            session.release(prompt_tokens if completion_tokens else 0, completion_tokens)

    async def wave() -> None:
        await asyncio.gather(*[request(number) for number in range(16)])

    asyncio.run(wave())
    assert sum(served) == 200 and len(served) == 5  # five reservations of 40 fit, in flight together
    assert set(refusals) == {(429, "rate_limit_exceeded", 1)}  # the budget is held, not spent: retry soon
    asyncio.run(wave())
    usage = guard.keys.usage["budget"]
    assert (usage.tokens_total, usage.reserved_tokens, usage.in_flight) == (200, 0, 0)
    assert sum(served) == 200 and refusals[-1] == (429, "insufficient_quota", None)


def test_concurrent_threads_stay_within_tokens_per_minute(tmp_path):
    # Threads, as a multi-worker server would admit from: the key store's lock keeps reservations exact.
    import threading
    (tmp_path / "p.yaml").write_text(BUDGET_POLICY)
    guard = Guard.from_file(str(tmp_path / "p.yaml"))
    served, refusals, start = [], [], threading.Barrier(24)

    def request() -> None:
        session = open_session(guard, "r")
        session.authenticate("Bearer sk-tpm")
        session.admit("m")
        start.wait()
        try:
            session.reserve(20, 30)
            served.append(50)
        except GuardRejection as rejection:
            refusals.append((rejection.status, rejection.rail, rejection.retry_after))
        finally:
            used = (20, 30) if session.reservation is not None else (0, 0)
            session.release(*used)

    threads = [threading.Thread(target=request) for _ in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(served) == 300 and {(status, rail) for status, rail, _ in refusals} == {(429, "tokens_per_minute")}
    assert all(1 <= retry_after <= 60 for _, _, retry_after in refusals)  # until the window frees room
    assert sum(charge.tokens for charge in guard.keys.usage["tpm"].token_events) == 300
