"""The router's guard session without processes: input rewriting, the SSE rewriter, usage and release."""
import asyncio
import hashlib
import json

import pytest
import yaml

from serval.guard.guard import Guard
from serval.openai.errors import APIError
from serval.router.guarding import RouterGuardSession

KEY = "sk-test-key"


@pytest.fixture
def guard(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump({
        "keys": [{"id": "k", "sha256": hashlib.sha256(KEY.encode()).hexdigest(), "token_budget": 100}],
        "input": {"pii": {"action": "redact"}},
        "output": {"pii": {"types": ["email"], "action": "redact"},
                   "deny": [{"name": "internal", "pattern": "project falcon", "action": "stop"}]}}))
    return Guard.from_file(str(path))


def admitted(guard, body) -> RouterGuardSession:
    session = RouterGuardSession(guard, "req-1")
    asyncio.run(session.admit(body, {"authorization": f"Bearer {KEY}"}))
    return session


def sse(payload) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def test_input_is_redacted_in_place_and_usage_is_asked_for(guard):
    body = {"model": "m", "stream": True, "messages": [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": [{"type": "text", "text": "I am eve@example.com"}]}]}
    session = RouterGuardSession(guard, "req-1")
    assert asyncio.run(session.admit(body, {"authorization": f"Bearer {KEY}"}))
    assert body["messages"][1]["content"][0]["text"] == "I am [REDACTED:email]"
    assert body["stream_options"] == {"include_usage": True} and not session.client_wants_usage


def test_rejections_become_openai_errors(guard):
    with pytest.raises(APIError) as info:
        asyncio.run(RouterGuardSession(guard, "r").admit({"model": "m", "prompt": "x"}, {}))
    assert info.value.status == 401 and info.value.code == "invalid_api_key"
    with pytest.raises(APIError) as info:
        admitted(guard, {"model": "m", "prompt": [1, 2, 3]})  # token ids: the rails could not read them
    assert info.value.status == 400 and info.value.param == "prompt"


def test_stream_rewriter_redacts_across_chunks_and_drops_the_routers_usage(guard):
    session = admitted(guard, {"model": "m", "prompt": "hi", "stream": True})
    rewriter = session.stream_rewriter(chat=False)
    stream = (sse({"choices": [{"index": 0, "text": "mail fred@exa"}]})
              + sse({"choices": [{"index": 0, "text": "mple.com now", "finish_reason": "length"}]})
              + sse({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}) + b"data: [DONE]\n\n")
    out = b"".join(rewriter.feed(stream[i:i + 7]) for i in range(0, len(stream), 7)) + rewriter.end()
    events = [json.loads(block[6:]) for block in out.decode().split("\n\n") if block.startswith("data: {")]
    assert "".join(e["choices"][0]["text"] for e in events) == "mail [REDACTED:email] now"
    assert not any(e.get("usage") for e in events) and out.endswith(b"data: [DONE]\n\n")
    session.release()
    assert (session.prompt_tokens, session.completion_tokens) == (3, 4)
    session.release()  # once only
    assert guard.keys.usage["k"].tokens_total == 7 and guard.keys.usage["k"].in_flight == 0


def test_stop_rail_ends_the_choice_and_the_stream(guard):
    session = admitted(guard, {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True})
    rewriter = session.stream_rewriter(chat=True)
    out = rewriter.feed(sse({"choices": [{"index": 0, "delta": {"content": "About project falcon: x"}}]}))
    event = json.loads(out.decode()[6:])
    assert event["choices"][0]["finish_reason"] == "content_filter"
    assert "falcon" not in event["choices"][0]["delta"]["content"] and rewriter.all_stopped
    assert rewriter.feed(sse({"choices": [{"index": 0, "delta": {"content": "more"}}]})) == b""


def test_whole_answers_are_filtered_and_charged(guard):
    session = admitted(guard, {"model": "m", "prompt": "hi"})
    content = json.dumps({"choices": [{"index": 0, "text": "reach gina@example.com"}],
                          "usage": {"prompt_tokens": 2, "completion_tokens": 5}}).encode()
    filtered = json.loads(session.filter_whole(content, chat=False))
    assert filtered["choices"][0]["text"] == "reach [REDACTED:email]"
    assert (session.prompt_tokens, session.completion_tokens) == (2, 5)


def test_admission_reserves_the_estimated_prompt_and_max_tokens(guard):
    """Budget 100: a request that may use more is refused up front; running requests' reservations count, and
    that refusal says when to retry."""
    with pytest.raises(APIError) as info:
        admitted(guard, {"model": "m", "prompt": "hi", "max_tokens": 60, "n": 2})  # up to 120 tokens
    assert info.value.status == 429 and info.value.code == "insufficient_quota"
    running = admitted(guard, {"model": "m", "prompt": "x" * 40, "max_tokens": 80})  # 10 + 80 reserved
    with pytest.raises(APIError) as info:
        admitted(guard, {"model": "m", "prompt": "hi", "max_tokens": 20})
    assert info.value.status == 429 and info.value.headers == {"Retry-After": "1"}
    running.release()  # no usage from the backend: charged the estimate, the rest of the reservation refunded
    assert guard.keys.usage["k"].tokens_total == 10
    admitted(guard, {"model": "m", "prompt": "hi", "max_tokens": 20}).release()
