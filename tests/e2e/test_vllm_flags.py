"""A `vllm serve` deployment run as `serval serve`: its flags from a YAML file (`--config`, as vLLM reads it) with
one more on the command line; vLLM's compatibility flags are accepted as given (--trust-remote-code,
--tokenizer-mode auto, --pipeline-parallel-size 1, --data-parallel-size 1, --enable-log-requests),
--default-chat-template-kwargs reaches the chat template and the reasoning parser for every request that does not
set the variable itself, and --disable-fastapi-docs takes /openapi.json away. With --scheduling-policy priority a
request's `priority` (vLLM's field) orders the waiting requests. Values Serval can't serve are refused by name
(tests/test_cli.py; a priority without the priority scheduler: tests/e2e/test_api_fuzz.py)."""
import asyncio
import json
import os
import tempfile

import httpx
import pytest
import yaml

from tests.e2e.server import RemoteServer
from tests.e2e.tiny_qwen3 import tiny_qwen3_dir
from tests.openai.tool_parsers.streaming import qwen3_tokenizer

MODEL = "tiny-qwen3"
MESSAGES = [{"role": "user", "content": "Is it going to rain?"}]
DEFAULTS = {"enable_thinking": False}


@pytest.fixture(scope="module")
def server():
    settings = {"model": tiny_qwen3_dir(), "max_model_len": 512, "served-model-name": [MODEL],
                "reasoning-parser": "qwen3", "default-chat-template-kwargs": DEFAULTS, "trust-remote-code": True,
                "tokenizer-mode": "auto", "pipeline-parallel-size": 1, "data-parallel-size": 1,
                "enable-log-requests": True, "disable-fastapi-docs": True, "scheduling-policy": "priority",
                "max-num-seqs": 1}
    with tempfile.TemporaryDirectory(prefix="serval-config-") as directory:
        path = os.path.join(directory, "serve.yaml")
        with open(path, "w") as handle:
            yaml.safe_dump(settings, handle)
        remote = RemoteServer(["--config", path, "--max-model-len", "1024"])
        yield remote
        remote.close()


@pytest.fixture(scope="module")
def client(server):
    return server.client(timeout=120)


def template_tokens(**kwargs) -> int:
    text = qwen3_tokenizer().apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True, **kwargs)
    return len(qwen3_tokenizer().encode(text, add_special_tokens=False))


def test_the_default_kwargs_reach_the_template_and_the_parser(client):
    assert template_tokens(enable_thinking=False) != template_tokens()  # the variable changes the prompt
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0.0, max_tokens=8)
    assert response.usage.prompt_tokens == template_tokens(enable_thinking=False)
    (choice,) = response.choices
    assert choice.message.reasoning_content is None and choice.message.content  # no think section expected


def test_a_requests_own_kwargs_win(client):
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0.0, max_tokens=8,
                                              extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    assert response.usage.prompt_tokens == template_tokens(enable_thinking=True)
    (choice,) = response.choices
    # thinking on: a random-weight model cut off after 8 tokens is still in its thought
    assert choice.message.content is None and choice.message.reasoning_content


def test_responses_and_tokenize_render_as_chat_does(server, client):
    response = client.responses.create(model=MODEL, input=MESSAGES[0]["content"], max_output_tokens=8,
                                       temperature=0.0)
    assert response.usage.input_tokens == template_tokens(enable_thinking=False)
    tokenize = httpx.post(f"{server.url}/tokenize", json={"model": MODEL, "messages": MESSAGES}, timeout=30)
    assert tokenize.status_code == 200 and tokenize.json()["count"] == template_tokens(enable_thinking=False)
    asked = httpx.post(f"{server.url}/tokenize", json={"model": MODEL, "messages": MESSAGES,
                                                        "chat_template_kwargs": {"enable_thinking": True}}, timeout=30)
    assert asked.json()["count"] == template_tokens(enable_thinking=True)


def test_disable_fastapi_docs_takes_the_schema_away(server):
    assert httpx.get(f"{server.url}/openapi.json", timeout=30).status_code == 404
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200


def test_the_command_line_wins_over_the_file(server):
    (card,) = httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"]
    assert card["id"] == MODEL and card["max_model_len"] == 1024



def test_waiting_requests_start_in_priority_order(server):
    """One sequence at a time (max-num-seqs 1): while a long request runs, a priority-5 and then a priority--5
    request wait; the later one, with the lower number, runs first, as vLLM's priority scheduler orders them."""
    async def run() -> list[str]:
        client = server.async_client(timeout=120)
        finished = []

        async def ask(name: str, priority: int, max_tokens: int) -> None:
            await client.completions.create(model=MODEL, prompt="Count:", max_tokens=max_tokens, temperature=0.0,
                                            extra_body={"priority": priority, "ignore_eos": True})
            finished.append(name)

        long_stream = await client.completions.create(model=MODEL, prompt="Count:", max_tokens=300, stream=True,
                                                      extra_body={"ignore_eos": True})
        chunks = aiter(long_stream)
        await anext(chunks)  # running: the only sequence slot is taken
        low = asyncio.create_task(ask("low", 5, 2))
        await asyncio.sleep(0.3)  # queued first
        high = asyncio.create_task(ask("high", -5, 2))
        async for _ in chunks:
            pass
        finished.append("long")
        await asyncio.gather(low, high)
        return finished

    finished = asyncio.run(run())
    assert finished.index("high") < finished.index("low")


def test_continue_final_message_leaves_the_assistant_turn_open(client):
    """vLLM's continue_final_message (an assistant prefill): the prompt ends inside the last message, as
    transformers renders it; with a new turn asked for too it is a 400."""
    import openai
    messages = MESSAGES + [{"role": "assistant", "content": "The answer is"}]
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0.0,
                                              extra_body={"continue_final_message": True,
                                                          "add_generation_prompt": False})
    text = qwen3_tokenizer().apply_chat_template(messages, tokenize=False, add_generation_prompt=False,
                                                 continue_final_message=True, enable_thinking=False)
    assert text.endswith("The answer is")
    assert response.usage.prompt_tokens == len(qwen3_tokenizer().encode(text, add_special_tokens=False))
    closed = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1, temperature=0.0,
                                            extra_body={"add_generation_prompt": False})
    assert closed.usage.prompt_tokens > response.usage.prompt_tokens  # the turn closed: its end-of-turn tokens
    with pytest.raises(openai.BadRequestError, match="continue_final_message needs add_generation_prompt"):
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1,
                                       extra_body={"continue_final_message": True})


def test_truncate_prompt_tokens_keeps_the_last_tokens(server, client):
    """vLLM's truncate_prompt_tokens: the engine sees the prompt's last k tokens, so the answer is that of those
    tokens sent alone; -1 keeps up to the context length; 0 and more than the context are refused by name."""
    ids = [(7 * i + 3) % 1000 + 10 for i in range(40)]
    body = dict(model=MODEL, max_tokens=6, temperature=0.0)
    truncated = client.completions.create(prompt=ids, extra_body={"truncate_prompt_tokens": 9, "ignore_eos": True},
                                          **body)
    alone = client.completions.create(prompt=ids[-9:], extra_body={"ignore_eos": True}, **body)
    assert truncated.usage.prompt_tokens == 9 and truncated.choices[0].text == alone.choices[0].text
    whole = client.completions.create(prompt=ids, extra_body={"truncate_prompt_tokens": -1}, **body)
    assert whole.usage.prompt_tokens == len(ids)
    chat = client.chat.completions.create(messages=MESSAGES, extra_body={"truncate_prompt_tokens": 5}, **body)
    assert chat.usage.prompt_tokens == 5
    for keep in (0, 5000, "9"):
        answer = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": ids,
                                                                  "truncate_prompt_tokens": keep}, timeout=30)
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "truncate_prompt_tokens", keep


def sse_events(server, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{server.url}{path}", json={**body, "stream": True}, timeout=60) as response:
        assert response.status_code == 200
        return [json.loads(line[6:]) for line in response.iter_lines()
                if line.startswith("data: ") and line != "data: [DONE]"]


def test_return_token_ids_gives_the_prompt_and_the_generated_ids(server):
    """vLLM's return_token_ids: chat gives prompt_token_ids beside the choices (a stream: in its first chunk) and
    each choice its token_ids (a stream: each chunk's), completions both on each choice; the ids are the prompt the
    template made and the tokens whose text the answer is."""
    tokenizer = qwen3_tokenizer()
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 12, "temperature": 0.0, "ignore_eos": True,
            "return_token_ids": True}
    whole = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60).json()
    (choice,) = whole["choices"]
    assert whole["prompt_token_ids"] == tokenizer.encode(text, add_special_tokens=False)
    assert len(choice["token_ids"]) == whole["usage"]["completion_tokens"] == 12
    assert tokenizer.decode(choice["token_ids"], skip_special_tokens=True) == choice["message"]["content"]
    events = sse_events(server, "/v1/chat/completions", body)
    assert events[0]["prompt_token_ids"] == whole["prompt_token_ids"]
    assert all(event.get("prompt_token_ids") is None for event in events[1:])
    assert [i for event in events for c in event["choices"] for i in c.get("token_ids") or []] == choice["token_ids"]
    plain = httpx.post(f"{server.url}/v1/chat/completions", json={**body, "return_token_ids": False}, timeout=60)
    assert plain.json()["prompt_token_ids"] is None and plain.json()["choices"][0]["token_ids"] is None

    ids = [11, 22, 33, 44]
    completion = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": ids, "max_tokens": 5, "temperature": 0.0, "ignore_eos": True,
        "return_token_ids": True}).json()
    (choice,) = completion["choices"]
    assert choice["prompt_token_ids"] == ids and len(choice["token_ids"]) == 5
    assert tokenizer.decode(choice["token_ids"], skip_special_tokens=True) == choice["text"]


def test_cache_salt_keeps_prefix_cache_hits_within_a_salt(server):
    """vLLM's cache_salt: a prompt's blocks cached under one salt are hits for the same salt only (usage reports
    the cached prompt tokens); an empty salt is refused."""
    ids = [(13 * i + 5) % 900 + 20 for i in range(70)]  # this test's own prompt: nothing cached it before

    def cached_tokens(**extra) -> int:
        answer = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
            "model": MODEL, "prompt": ids, "max_tokens": 1, **extra})
        assert answer.status_code == 200, answer.text
        return answer.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert cached_tokens(cache_salt="tenant-1") == 0
    assert cached_tokens(cache_salt="tenant-1") > 0
    assert cached_tokens(cache_salt="tenant-2") == 0
    assert cached_tokens() == 0
    refused = httpx.post(f"{server.url}/v1/completions", timeout=60,
                         json={"model": MODEL, "prompt": ids, "max_tokens": 1, "cache_salt": ""})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "cache_salt"
