"""The classifier rail against a real guard model: a second `serval serve` (the tiny random model, its verdict
forced into Llama Guard's format by the regex constraint) asked beside the main request's prefill. The random
model's verdicts are arbitrary but deterministic at temperature 0, so each prompt's verdict is read from the
guard server first and the main server must block exactly the unsafe ones."""
import asyncio

import httpx
import pytest

from tests.e2e.server import RemoteServer, free_port, tiny_model_dir
from serval.guard.classifier import MAX_VERDICT_TOKENS, VERDICT_REGEX, build_prompt, parse_verdict
from serval.guard.decisions import GuardRejection
from serval.guard.guard import Guard, RequestContext
from serval.guard.policy import parse_policy

# A 2-layer random model's verdict hardly depends on a short question, but long repetitive ones move it.
PROMPTS = ["hi", "word " * 150, "1 2 3 4 5 6 7 8 9 " * 30, "!!!!!!" * 100, "The cat sat on the mat. " * 20,
           "zzzz " * 150, "\u00e9\u00e0\u00fc " * 60, "\n" * 200, "safe safe safe " * 50]


@pytest.fixture(scope="module")
def guard_model():
    remote = RemoteServer(["--model", tiny_model_dir(), "--max-model-len", "1024", "--served-model-name", "guard"])
    yield remote
    remote.close()


@pytest.fixture(scope="module")
def server(guard_model, receiver, tmp_path_factory):
    path = tmp_path_factory.mktemp("classifier") / "policy.yaml"
    path.write_text(f"input:\n  classifier: {{url: '{guard_model.url}/v1', model: guard, action: block}}\n"
                    "  injection: {action: log}\n"
                    "audit: {path: audit.jsonl}\n")
    remote = RemoteServer(["--model", tiny_model_dir(), "--max-model-len", "1024", "--served-model-name", "tiny",
                           "--policy", str(path), "--otlp-traces-endpoint", receiver.url],
                          env={"OTEL_BSP_SCHEDULE_DELAY": "100"})
    yield remote
    remote.close()


def verdict_of(guard_model, text: str):
    response = httpx.post(guard_model.url + "/v1/completions", timeout=60, json={
        "model": "guard", "prompt": build_prompt([{"role": "user", "content": text}]), "temperature": 0,
        "max_tokens": MAX_VERDICT_TOKENS, "structured_outputs": {"regex": VERDICT_REGEX}})
    return parse_verdict(response.json()["choices"][0]["text"])


def test_unsafe_verdicts_block_and_safe_ones_pass(server, guard_model):
    verdicts = {text: verdict_of(guard_model, text) for text in PROMPTS}
    assert {v.safe for v in verdicts.values()} == {True, False}, "the prompts should get both verdicts"
    for text, verdict in verdicts.items():
        for stream in (False, True):
            response = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
                "model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": 3,
                "stream": stream})
            if verdict.safe:
                assert response.status_code == 200, response.text
            else:
                assert response.status_code == 400, response.text
                error = response.json()["error"]
                assert error["code"] == "content_policy_violation" and "classifier" in error["message"]
                assert all(code in error["message"] for code in verdict.categories)
    blocked = sum(not v.safe for v in verdicts.values())
    assert server.metric("serval:guard_decisions_total", rail="classifier", action="block") == 2 * blocked
    assert server.metric("serval:guard_latency_seconds_count", rail="classifier") == 2 * len(PROMPTS)
    assert server.wait_idle()  # blocked requests were aborted in the engine


def test_completions_are_classified_too(server, guard_model):
    unsafe = next(text for text in PROMPTS if not verdict_of(guard_model, text).safe)
    response = httpx.post(server.url + "/v1/completions", timeout=60,
                          json={"model": "tiny", "prompt": unsafe, "max_tokens": 2})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"


def test_each_rail_is_a_child_span_of_the_request(server, receiver, guard_model):
    safe = next(text for text in PROMPTS if verdict_of(guard_model, text).safe)
    response = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": [{"role": "user", "content": safe}], "max_tokens": 2})
    request_span = receiver.wait_for(lambda s: s["attributes"].get("gen_ai.response.id") == response.json()["id"])
    for rail in ("classifier", "injection"):
        span = receiver.wait_for(lambda s: s["name"] == f"guard {rail}"
                                 and s["parent_span_id"] == request_span["span_id"])
        assert span["trace_id"] == request_span["trace_id"] and span["attributes"]["serval.guard.rail"] == rail


def test_no_verdict_blocks_or_allows_as_the_policy_says():
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    for on_error, expected in (("block", 503), ("allow", None)):
        guard = Guard(parse_policy(f"input:\n  classifier: {{url: '{dead}', model: g, on_error: {on_error}, "
                                   "timeout_seconds: 5}\n"))

        async def run():
            try:
                await guard.classify_input([{"role": "user", "content": "hi"}], RequestContext("r"))
            finally:
                await guard.classifier_client.close()

        if expected is None:
            asyncio.run(run())
        else:
            with pytest.raises(GuardRejection) as error:
                asyncio.run(run())
            assert error.value.status == 503 and error.value.code == "classifier_unavailable"


def test_prompt_and_verdict_format():
    prompt = build_prompt([{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}])
    assert "User: hello\n\nAgent: hi" in prompt and "S14: Code Interpreter Abuse." in prompt
    assert parse_verdict(" safe\n").safe
    verdict = parse_verdict("unsafe\nS1,S10")
    assert not verdict.safe and verdict.categories == ("S1", "S10")
    with pytest.raises(ValueError, match="not a verdict"):
        parse_verdict("maybe")
