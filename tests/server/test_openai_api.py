"""The OpenAI-compatible server through a real `serval serve` process, the official openai client and raw httpx."""
import asyncio
import json

import httpx
import openai
import pytest

from tests.e2e.server import API_KEY, RemoteServer, tiny_model_dir

MODEL = "tiny"
MAX_MODEL_LEN = 512


@pytest.fixture(scope="module")
def server():
    remote = RemoteServer(["--model", tiny_model_dir(), "--max-model-len", str(MAX_MODEL_LEN),
                           "--served-model-name", MODEL, "tiny-alias", "--max-num-seqs", "32"], api_key=API_KEY)
    yield remote
    remote.close()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def post(server, path, body, headers=None, raw: bytes | None = None) -> httpx.Response:
    return httpx.post(server.url + path, json=None if raw is not None else body, content=raw,
                      headers={**server.headers, "Content-Type": "application/json", **(headers or {})}, timeout=60)


def tokenize(server, **body) -> list[int]:
    response = post(server, "/tokenize", body)
    assert response.status_code == 200, response.text
    return response.json()["tokens"]


# ---------------------------------------------------------------- small endpoints
def test_models_health_version(server, client):
    assert [model.id for model in client.models.list().data] == [MODEL, "tiny-alias"]
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/version").json()["version"]


def test_tokenize_detokenize_roundtrip(server):
    tokens = tokenize(server, prompt="Hello, world")
    assert tokens
    assert post(server, "/detokenize", {"tokens": tokens}).json()["prompt"] == "Hello, world"
    bad = post(server, "/detokenize", {"tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


# ---------------------------------------------------------------- completions
def test_completion_text_and_usage(server, client):
    response = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0)
    (choice,) = response.choices
    assert choice.finish_reason == "length" and choice.text
    assert response.usage.prompt_tokens == len(tokenize(server, prompt="Once upon a time"))
    assert response.usage.completion_tokens == 6
    assert response.usage.total_tokens == response.usage.prompt_tokens + 6
    assert response.model == MODEL and response.id.startswith("cmpl-")


def test_completion_stream_equals_non_stream(client):
    kwargs = dict(model=MODEL, prompt="The quick brown fox", max_tokens=8, temperature=0)
    full = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
    assert text == full.choices[0].text
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) <= {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_completion_batch_of_token_id_prompts_with_n(server, client):
    first, second = tokenize(server, prompt="alpha beta"), tokenize(server, prompt="gamma")
    response = client.completions.create(model=MODEL, prompt=[first, second], max_tokens=3, temperature=0, n=2)
    assert sorted(choice.index for choice in response.choices) == [0, 1, 2, 3]
    by_index = {choice.index: choice.text for choice in response.choices}
    assert by_index[0] == by_index[1] and by_index[2] == by_index[3]  # greedy: the n samples agree
    single = client.completions.create(model=MODEL, prompt=second, max_tokens=3, temperature=0)
    assert by_index[2] == single.choices[0].text
    assert response.usage.prompt_tokens == len(first) + len(second)
    assert response.usage.completion_tokens == 12


def test_completion_echo_and_logprobs(server, client):
    prompt = "Echo me"
    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, echo=True,
                                         logprobs=3)
    choice = response.choices[0]
    assert choice.text.startswith(prompt)
    num_prompt = len(tokenize(server, prompt=prompt))
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == num_prompt + 4
    assert logprobs.token_logprobs[0] is None
    assert all(lp <= 0 for lp in logprobs.token_logprobs[num_prompt:])
    assert all(len(top) == 3 for top in logprobs.top_logprobs[num_prompt:])
    assert "".join(logprobs.tokens[num_prompt:]) == choice.text[len(prompt):]
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, echo=True,
                                            logprobs=3, stream=True))
    assert "".join(chunk.choices[0].text for chunk in chunks) == choice.text
    assert [t for chunk in chunks for t in chunk.choices[0].logprobs.tokens] == logprobs.tokens
    # Greedy: the chosen token is the most likely one.
    for token, logprob, top in zip(logprobs.tokens[num_prompt:], logprobs.token_logprobs[num_prompt:],
                                   logprobs.top_logprobs[num_prompt:]):
        assert logprob == pytest.approx(max(top.values()), abs=1e-5)


def test_completion_stop_string(client):
    base = client.completions.create(model=MODEL, prompt="Stop here", max_tokens=8, temperature=0).choices[0].text
    stop = base[len(base) // 2:len(base) // 2 + 3]
    assert stop.strip()
    response = client.completions.create(model=MODEL, prompt="Stop here", max_tokens=8, temperature=0, stop=[stop])
    choice = response.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.text == base[:base.index(stop)]


def test_completion_sampling_parameters_and_seed(client):
    kwargs = dict(model=MODEL, prompt="Random", max_tokens=6, temperature=1.0, seed=7, top_p=0.9,
                  presence_penalty=0.5, frequency_penalty=0.5, logit_bias={"42": 5.0}, user="tester",
                  extra_body={"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.1, "min_tokens": 2,
                              "ignore_eos": True})
    assert client.completions.create(**kwargs).choices[0].text == client.completions.create(**kwargs).choices[0].text


# ---------------------------------------------------------------- chat
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi"}]


def test_chat_text_and_usage(server, client):
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=5,
                                              temperature=0)
    (choice,) = response.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    assert response.usage.prompt_tokens == len(tokenize(server, messages=MESSAGES))
    assert response.usage.completion_tokens == 5
    assert response.id.startswith("chatcmpl-") and response.object == "chat.completion"


def test_chat_stream_equals_non_stream(client):
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=7, temperature=0)
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert content == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 7 and chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_chat_roles_and_content_parts(client):
    messages = [{"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]},
                {"role": "assistant", "content": "Hi."},
                {"role": "tool", "content": "42", "tool_call_id": "call_1"},
                {"role": "user", "content": "And?"}]
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, temperature=0)
    assert response.choices[0].message.content is not None


def test_chat_logprobs_and_n(client):
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0,
                                              logprobs=True, top_logprobs=3, n=2)
    assert [choice.index for choice in response.choices] == [0, 1]
    for choice in response.choices:
        content = choice.logprobs.content
        assert len(content) == 4
        assert "".join(entry.token for entry in content) == choice.message.content
        for entry in content:
            assert len(entry.top_logprobs) == 3
            values = [top.logprob for top in entry.top_logprobs]
            assert values == sorted(values, reverse=True)
            assert entry.logprob == pytest.approx(values[0], abs=1e-5)


def test_concurrent_requests_match_sequential(client, server):
    prompts = [f"Request number {i} says" for i in range(16)]
    expected = [client.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0).choices[0].text
                for p in prompts]

    async def run_all():
        async with server.async_client() as async_client:
            async def one(i):
                if i % 2:
                    stream = await async_client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=6,
                                                                   temperature=0, stream=True)
                    return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])
                response = await async_client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=6,
                                                                 temperature=0)
                return response.choices[0].text
            return await asyncio.gather(*(one(i) for i in range(16)))

    assert asyncio.run(run_all()) == expected


# ---------------------------------------------------------------- errors
def assert_error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_malformed_json_is_400(server, path):
    assert_error(post(server, path, None, raw=b'{"model": "tiny", "prompt": '), 400)
    assert_error(post(server, path, None, raw=b"\xff\xfe"), 400)


def test_invalid_parameters_are_400(server):
    completion = {"model": MODEL, "prompt": "x", "max_tokens": 2}
    assert_error(post(server, "/v1/completions", {"model": MODEL}), 400, param="prompt")
    assert_error(post(server, "/v1/completions", {**completion, "temperature": -1}), 400, param="temperature")
    assert_error(post(server, "/v1/completions", {**completion, "top_p": 2}), 400, param="top_p")
    assert_error(post(server, "/v1/completions", {**completion, "max_tokens": 0}), 400, param="max_tokens")
    assert_error(post(server, "/v1/completions", {**completion, "n": 0}), 400, param="n")
    assert_error(post(server, "/v1/completions", {**completion, "temperature": "hot"}), 400, param="temperature")
    assert_error(post(server, "/v1/completions", {**completion, "logit_bias": {"x": 1}}), 400, param="logit_bias")
    assert_error(post(server, "/v1/completions", {**completion, "prompt": [10**9]}), 400, param="prompt")
    assert_error(post(server, "/v1/completions", {**completion, "prompt": []}), 400, param="prompt")
    assert_error(post(server, "/v1/completions", {**completion, "stream_options": {"include_usage": True}}), 400)
    chat = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2}
    assert_error(post(server, "/v1/chat/completions", {**chat, "messages": [{"role": "wizard", "content": "x"}]}),
                 400, param="messages.0.role")
    assert_error(post(server, "/v1/chat/completions", {**chat, "messages": []}), 400, param="messages")
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]
    assert_error(post(server, "/v1/chat/completions", {**chat, "messages": image}), 400)
    assert_error(post(server, "/v1/chat/completions", {**chat, "top_logprobs": 2}), 400)


def test_context_length_errors_say_tokens_and_limit(server, client):
    long_prompt = [100] * (MAX_MODEL_LEN + 10)
    error = assert_error(post(server, "/v1/completions", {"model": MODEL, "prompt": long_prompt}), 400,
                         code="context_length_exceeded")
    assert str(MAX_MODEL_LEN) in error["message"] and str(MAX_MODEL_LEN + 10) in error["message"]
    error = assert_error(post(server, "/v1/completions", {"model": MODEL, "prompt": [100] * 10,
                                                          "max_tokens": MAX_MODEL_LEN}), 400, param="max_tokens")
    assert f"{MAX_MODEL_LEN + 10} tokens" in error["message"]
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 600}])


def test_unknown_model_is_404(server, client):
    assert_error(post(server, "/v1/completions", {"model": "gpt-9", "prompt": "x"}), 404, param="model",
                 code="model_not_found")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=MESSAGES)
    assert client.completions.create(model="tiny-alias", prompt="x", max_tokens=1).model == MODEL


def test_api_key_required(server):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    assert_error(httpx.post(server.url + "/v1/completions", json=body), 401, code="invalid_api_key")
    assert_error(httpx.post(server.url + "/v1/completions", json=body,
                            headers={"Authorization": "Bearer wrong"}), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(server.url + "/health").status_code == 200  # only /v1 is guarded


def test_unknown_route_is_404_error_body(server):
    assert_error(httpx.get(server.url + "/v1/nothing", headers=server.headers), 404)


def test_server_survives_bad_input(server, client):
    for raw in [b"", b"[]", b"null", b'{"prompt": {"a": 1}}', b'"text"', json.dumps({"prompt": [[1], "a"]}).encode()]:
        response = post(server, "/v1/completions", None, raw=raw)
        assert response.status_code == 400, (raw, response.text)
    assert client.completions.create(model=MODEL, prompt="still up", max_tokens=1).choices[0].text is not None
