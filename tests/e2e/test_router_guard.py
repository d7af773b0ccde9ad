"""The guard at the router: `serval route --policy` applies `serval serve`'s policy file (keys, model lists,
budgets, input and output rails) before routing, in front of backends that run no guard of their own: a real
`serval serve` without --policy, and a scripted backend whose output the test chooses."""
import hashlib

import httpx
import pytest
import yaml

from tests.e2e.router_support import RouterProcess, ScriptedBackend, start_servers
from tests.e2e.server import tiny_model_dir

KEY_A, KEY_B = "sk-team-a-secret", "sk-team-b-secret"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    (real,) = start_servers([["--model", tiny_model_dir(), "--max-model-len", "256", "--served-model-name", "tiny"]])
    scripted = ScriptedBackend(model="stub")
    policy = {
        "keys": [{"id": "team-a", "sha256": hashlib.sha256(KEY_A.encode()).hexdigest(), "models": ["tiny"],
                  "token_budget": 400},
                 {"id": "team-b", "sha256": hashlib.sha256(KEY_B.encode()).hexdigest()}],
        "input": {"deny": [{"name": "weapons", "pattern": "build an? bomb", "action": "block"}],
                  "pii": {"action": "redact"}},
        "output": {"pii": {"types": ["email"], "action": "redact"},
                   "deny": [{"name": "internal", "pattern": "project falcon", "action": "stop"}]}}
    path = tmp_path_factory.mktemp("policy") / "policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    config = {"backends": [{"name": "real", "url": real.url, "models": ["tiny"], "engine": "serval"},
                           {"name": "scripted", "url": scripted.url, "models": ["stub"]}],
              "policy": "round_robin", "health_check": {"interval_s": 1}}
    router = RouterProcess(config, ["--policy", str(path)])
    yield router, real, scripted
    router.close()
    real.close()
    scripted.close()


def post(router, body, key=KEY_B, path="/v1/completions"):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(router.url + path, json=body, headers=headers, timeout=60)


def test_keys_and_model_lists(setup):
    router, _, _ = setup
    for key in (None, "sk-wrong"):
        response = post(router, {"model": "tiny", "prompt": "hi", "max_tokens": 2}, key=key)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    refused = post(router, {"model": "stub", "prompt": "hi"}, key=KEY_A)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "model_not_allowed"
    assert post(router, {"model": "tiny", "prompt": "hi", "max_tokens": 2}, key=KEY_A).status_code == 200


def test_input_rails_block_and_redact_before_any_backend_sees_the_text(setup):
    router, _, scripted = setup
    seen = len(scripted.requests)
    blocked = post(router, {"model": "stub", "prompt": "how do I build a bomb"})
    assert blocked.status_code == 400 and blocked.json()["error"]["code"] == "content_policy_violation"
    assert len(scripted.requests) == seen  # refused at the router
    # The real engine echoes the prompt it was given: the address never reached it.
    echoed = post(router, {"model": "tiny", "prompt": "Mail bob@example.com today", "max_tokens": 2, "echo": True})
    assert echoed.status_code == 200
    text = echoed.json()["choices"][0]["text"]
    assert text.startswith("Mail [REDACTED:email] today") and "bob@example.com" not in text
    chat = post(router, {"model": "stub", "messages": [{"role": "user", "content": "I am carol@example.org"}]},
                path="/v1/chat/completions")
    assert chat.status_code == 200
    assert scripted.requests[-1]["messages"][0]["content"] == "I am [REDACTED:email]"


def test_output_rails_on_a_stream_split_across_chunks(setup):
    router, _, scripted = setup
    scripted.chunks = ["Write to ", "dave@exa", "mple.com", " for help."]
    try:
        with httpx.stream("POST", router.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY_B}"},
                          json={"model": "stub", "messages": [{"role": "user", "content": "hi"}], "stream": True},
                          timeout=60) as response:
            raw = response.read().decode()
        assert raw.endswith("data: [DONE]\n\n")
        text = "".join(event["choices"][0]["delta"].get("content") or "" for event in _events(raw)
                       if event["choices"])
        assert text == "Write to [REDACTED:email] for help."
        whole = post(router, {"model": "stub", "prompt": "hi"})
        assert whole.json()["choices"][0]["text"] == "Write to [REDACTED:email] for help."
        scripted.chunks = ["Status of project ", "falcon: secret", " details"]
        stopped = post(router, {"model": "stub", "prompt": "hi"})
        choice = stopped.json()["choices"][0]
        assert choice["finish_reason"] == "content_filter" and "falcon" not in choice["text"]
    finally:
        scripted.chunks = None


def test_budget_is_charged_from_backend_usage_even_when_the_client_did_not_ask_for_it(setup):
    router, _, _ = setup
    body = {"model": "tiny", "prompt": "Count", "max_tokens": 40, "ignore_eos": True, "stream": True}
    statuses = []
    for _ in range(12):  # ~45 tokens each against a 400-token budget
        with httpx.stream("POST", router.url + "/v1/completions", json=body,
                          headers={"Authorization": f"Bearer {KEY_A}"}, timeout=60) as response:
            raw = response.read().decode()
            statuses.append(response.status_code)
            if response.status_code == 200:
                assert not any(event.get("usage") for event in _events(raw))  # the router's own ask, removed
            else:
                assert response.status_code == 429 and '"insufficient_quota"' in raw
    assert statuses[0] == 200 and statuses[-1] == 429
    assert router.metric("serval:guard_decisions_total", rail="token_budget", action="reject") >= 1
    assert router.metric("serval:guard_decisions_total", rail="input_pii", action="redact") >= 1


def _events(raw: str) -> list[dict]:
    import json
    return [json.loads(block[6:]) for block in raw.split("\n\n") if block.startswith("data: {")]
