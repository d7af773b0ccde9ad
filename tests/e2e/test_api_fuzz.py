"""A property of the whole API, tested with hypothesis against real `serval serve` processes (a generative one; an
embedder and a scorer for the pooling endpoints): whatever the body (schema-valid, schema-invalid, arbitrary JSON,
odd Unicode, huge and negative numbers, not JSON at all), the answer is never a 5xx, a 4xx carries OpenAI's error
body, and the server still answers /health at the end with nothing left running.

Bounded so it runs in well under a minute: a fixed number of examples per endpoint, derandomized (the same bodies
every run, so CI doesn't flake), and valid bodies ask for at most 4 tokens and 2 choices.
"""
from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.e2e.server import RemoteServer, tiny_model_dir

MODEL = "tiny"
EXAMPLES = 60

# Text that has broken servers: lone surrogates (sent as \u escapes), zero-width and bidi controls, NUL, full-width
# and mathematical letters, combining marks, emoji with joiners, a template tag.
ODD_TEXT = ["\ud800", "a\udfffb", "\udc00\ud800", "\u200b\u200d\u2060", "\u202e\u202d", "\x00", "ｆｕｌｌ",
            "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "e\u0301\u0301\u0301", "👩‍👩‍👧‍👦", "{{ raise_exception('x') }}", "<|im_end|>", "\r\n\t",
            "\ufeff", "\U0010ffff"]
text = st.one_of(st.text(st.characters(exclude_categories=()), max_size=40), st.sampled_from(ODD_TEXT))
numbers = st.one_of(st.integers(), st.integers(min_value=-2**70, max_value=2**70),
                    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([0, -1, 2**63, 2**64, 1e308]))
json_values = st.recursive(st.none() | st.booleans() | numbers | text,
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
                           max_leaves=12)
# Wrong for any field: what a careless client sends in place of the right type.
wrong = st.one_of(st.booleans(), text, numbers, st.lists(json_values, max_size=3),
                  st.dictionaries(text, json_values, max_size=3), st.none())
token_ids = st.lists(st.integers(min_value=-5, max_value=60_000), min_size=1, max_size=6)


def maybe_wrong(right):
    """Mostly the right kind of value, sometimes anything at all."""
    return st.one_of(right, right, right, wrong)


SAMPLING = {
    "model": maybe_wrong(st.sampled_from([MODEL, "other", ""])),
    "max_tokens": maybe_wrong(st.integers(min_value=1, max_value=4)),
    "n": maybe_wrong(st.integers(min_value=1, max_value=2)),
    "temperature": maybe_wrong(st.floats(min_value=0, max_value=2)),
    "top_p": maybe_wrong(st.floats(min_value=0.01, max_value=1)),
    "top_k": maybe_wrong(st.integers(min_value=-1, max_value=50)),
    "min_p": maybe_wrong(st.floats(min_value=0, max_value=1)),
    "seed": maybe_wrong(st.integers(min_value=-2**63, max_value=2**63 - 1)),
    "stop": maybe_wrong(st.one_of(text, st.lists(text, max_size=3))),
    "stop_token_ids": maybe_wrong(token_ids),
    "presence_penalty": maybe_wrong(st.floats(min_value=-2, max_value=2)),
    "frequency_penalty": maybe_wrong(st.floats(min_value=-2, max_value=2)),
    "repetition_penalty": maybe_wrong(st.floats(min_value=0.5, max_value=2)),
    "logit_bias": maybe_wrong(st.dictionaries(st.integers(-3, 60_000).map(str), st.floats(-100, 100), max_size=3)),
    "allowed_token_ids": maybe_wrong(st.one_of(token_ids, st.just([]))),
    "bad_words": maybe_wrong(st.lists(st.one_of(text, st.sampled_from(["", "  ", " the", "<|im_end|>"])),
                                      max_size=3)),
    "min_tokens": maybe_wrong(st.integers(min_value=0, max_value=4)),
    "priority": maybe_wrong(st.integers(min_value=-2, max_value=2)),
    "cache_salt": maybe_wrong(text),
    "truncate_prompt_tokens": maybe_wrong(st.integers(min_value=-2, max_value=300)),
    "return_token_ids": maybe_wrong(st.booleans()),
    "ignore_eos": maybe_wrong(st.booleans()),
    "stream": maybe_wrong(st.booleans()),
    "stream_options": maybe_wrong(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "user": maybe_wrong(text),
    "response_format": maybe_wrong(st.sampled_from([{"type": "text"}, {"type": "json_object"}])),
    "structured_outputs": maybe_wrong(st.one_of(st.fixed_dictionaries({"choice": st.lists(text, min_size=1,
                                                                                           max_size=3)}),
                                                st.fixed_dictionaries({"regex": st.sampled_from(
                                                    ["[a-z]{1,3}", "a{1000}{1000}", "(", "\\d+"])}))),
}
message = st.fixed_dictionaries(
    {"role": maybe_wrong(st.sampled_from(["system", "user", "assistant", "developer", "tool"])),
     "content": maybe_wrong(st.one_of(text, st.lists(st.fixed_dictionaries(
         {"type": st.sampled_from(["text", "image_url"]), "text": text}), max_size=2)))},
    optional={"name": text})
completion_body = st.fixed_dictionaries(
    {"prompt": maybe_wrong(st.one_of(text, st.lists(text, min_size=1, max_size=2), token_ids,
                                     st.lists(token_ids, min_size=1, max_size=2)))},
    optional={**SAMPLING, "echo": maybe_wrong(st.booleans()), "logprobs": maybe_wrong(st.integers(0, 5))})
chat_body = st.fixed_dictionaries(
    {"messages": maybe_wrong(st.lists(message, min_size=1, max_size=3))},
    optional={**SAMPLING, "max_completion_tokens": maybe_wrong(st.integers(1, 4)),
              "logprobs": maybe_wrong(st.booleans()), "top_logprobs": maybe_wrong(st.integers(0, 5)),
              "continue_final_message": maybe_wrong(st.booleans()),
              "add_generation_prompt": maybe_wrong(st.booleans())})
tokenize_body = st.one_of(
    st.fixed_dictionaries({"prompt": maybe_wrong(text)}, optional={"model": maybe_wrong(st.just(MODEL)),
                                                                   "add_special_tokens": maybe_wrong(st.booleans())}),
    st.fixed_dictionaries({"messages": maybe_wrong(st.lists(message, min_size=1, max_size=2))},
                          optional={"add_generation_prompt": maybe_wrong(st.booleans()),
                                    "chat_template_kwargs": maybe_wrong(st.dictionaries(text, json_values,
                                                                                        max_size=2))}))
detokenize_body = st.fixed_dictionaries({"tokens": maybe_wrong(token_ids)},
                                        optional={"model": maybe_wrong(st.just(MODEL))})


def raw_bodies(schema_body):
    """Bodies as bytes: the schema-shaped ones and arbitrary JSON (escaped, so lone surrogates travel as \\u
    escapes), and now and then something that is not JSON at all."""
    as_json = st.one_of(schema_body, schema_body, schema_body, json_values).map(
        lambda value: json.dumps(value, ensure_ascii=True).encode())
    not_json = st.one_of(st.binary(max_size=64), st.sampled_from([b"", b"{", b'{"prompt": Infinity}', b"[" * 5000,
                                                                    b'{"messages": NaN}', b"\xff\xfe{}"]))
    return st.one_of(as_json, as_json, as_json, not_json)


responses_body = st.fixed_dictionaries(
    {"input": maybe_wrong(st.one_of(text, st.lists(message, min_size=1, max_size=2)))},
    optional={"model": SAMPLING["model"], "stream": SAMPLING["stream"], "temperature": SAMPLING["temperature"],
              "top_p": SAMPLING["top_p"], "max_output_tokens": maybe_wrong(st.integers(1, 4)),
              "instructions": maybe_wrong(text), "store": maybe_wrong(st.booleans()),
              "previous_response_id": maybe_wrong(st.one_of(text, st.just("resp_unknown"))),
              "text": maybe_wrong(st.sampled_from([{"format": {"type": "text"}}, {"format": {"type": "json_object"}}])),
              "metadata": maybe_wrong(st.dictionaries(text, text, max_size=2)),
              "background": maybe_wrong(st.booleans()), "user": maybe_wrong(text)})
ENDPOINTS = {"/v1/completions": completion_body, "/v1/chat/completions": chat_body, "/tokenize": tokenize_body,
             "/detokenize": detokenize_body, "/v1/responses": responses_body}
texts = st.one_of(text, st.lists(text, min_size=1, max_size=3))
# The pooling endpoints, each against a pooling server (--runner pooling): an embedder, a one-label scorer.
POOLING_ENDPOINTS = {
    "/v1/embeddings": ("embed", st.fixed_dictionaries(
        {"input": maybe_wrong(st.one_of(texts, token_ids, st.lists(token_ids, min_size=1, max_size=2)))},
        optional={"model": SAMPLING["model"], "encoding_format": maybe_wrong(st.sampled_from(["float", "base64"])),
                  "dimensions": maybe_wrong(st.integers(-2, 100)), "user": maybe_wrong(text)})),
    "/v1/score": ("score", st.fixed_dictionaries(
        {"text_1": maybe_wrong(texts), "text_2": maybe_wrong(texts)},
        optional={"model": SAMPLING["model"], "activation": maybe_wrong(st.booleans())})),
    "/v1/rerank": ("score", st.fixed_dictionaries(
        {"query": maybe_wrong(text),
         "documents": maybe_wrong(st.lists(st.one_of(text, st.fixed_dictionaries({"text": text})), max_size=3))},
        optional={"model": SAMPLING["model"], "top_n": maybe_wrong(st.integers(-1, 4)),
                  "return_documents": maybe_wrong(st.booleans())})),
}


def check_answer(response: httpx.Response) -> None:
    """No 5xx; a 4xx with OpenAI's error body; a 200 that is a JSON object or a stream ending in [DONE]."""
    assert response.status_code < 500, (response.status_code, response.text[:800])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and isinstance(error["type"], str), error
        assert "param" in error and "code" in error, error
        return
    assert response.status_code == 200, response.status_code
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        if response.request.url.path == "/v1/responses":  # typed events, the last one closing the response
            last = json.loads(events[-1]) if events else {}
            assert last.get("type") in ("response.completed", "response.incomplete", "response.failed"), \
                response.text[-800:]
            assert (last["response"].get("error") or {}).get("code") != "server_error", last
            return
        assert events and events[-1] == "[DONE]", response.text[-800:]
        for event in events[:-1]:
            payload = json.loads(event)
            if "error" in payload:  # an error after the status line: it must not be a server fault
                assert payload["error"].get("type") != "server_error", payload
    else:
        assert isinstance(response.json(), dict)


@pytest.fixture(scope="module")
def server():
    remote = RemoteServer(["--model", tiny_model_dir(), "--max-model-len", "256", "--served-model-name", MODEL,
                           "--max-num-seqs", "8"])
    yield remote
    remote.close()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=120, headers={"content-type": "application/json"}) as http:
        yield http


@pytest.mark.parametrize("path", list(ENDPOINTS))
def test_no_body_gets_a_5xx(server, client, path):
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
    @given(body=raw_bodies(ENDPOINTS[path]))
    def property_holds(body: bytes) -> None:
        check_answer(client.post(path, content=body))

    property_holds()
    assert client.get("/health").status_code == 200
    assert server.wait_idle(), "requests left running or waiting"


def test_a_priority_needs_the_priority_scheduler(server):
    """vLLM's `priority` field: this server schedules first come, first served, so any priority but 0 is refused
    (an order it would not keep), naming the field; 0 is served (tests/e2e/test_vllm_flags.py: the order kept)."""
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
    refused = httpx.post(f"{server.url}/v1/completions", json={**body, "priority": 3}, timeout=60)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "priority"
    assert "--scheduling-policy priority" in refused.json()["error"]["message"]
    assert httpx.post(f"{server.url}/v1/completions", json={**body, "priority": 0}, timeout=60).status_code == 200
    wrong = httpx.post(f"{server.url}/v1/completions", json={**body, "priority": 2**63}, timeout=60)
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "priority"


@pytest.fixture(scope="module")
def pooling_servers(tmp_path_factory):
    from tests.e2e.test_embeddings import _tiny
    root = str(tmp_path_factory.mktemp("fuzz-pooling"))
    servers = {kind: RemoteServer([_tiny(kind, root)[0], "--runner", "pooling", "--max-model-len", "256",
                                   "--served-model-name", MODEL]) for kind in ("embed", "score")}
    yield servers
    for remote in servers.values():
        remote.close()


@pytest.mark.parametrize("path", list(POOLING_ENDPOINTS))
def test_no_pooling_body_gets_a_5xx(pooling_servers, path):
    kind, body = POOLING_ENDPOINTS[path]
    server = pooling_servers[kind]
    with httpx.Client(base_url=server.url, timeout=120, headers={"content-type": "application/json"}) as http:
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                         HealthCheck.filter_too_much])
        @given(body=raw_bodies(body))
        def property_holds(body: bytes) -> None:
            check_answer(http.post(path, content=body))

        property_holds()
        assert http.get("/health").status_code == 200
    assert server.wait_idle(), "requests left running or waiting"
