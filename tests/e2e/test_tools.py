"""Tool calling through a real `serval serve --tool-call-parser hermes --enable-auto-tool-choice` serving a tiny
random-weight Qwen3 with Qwen3's real tokenizer and chat template, called with the official `openai` client.

tool_choice "required" and a named function are enforced by a grammar, so even random weights at temperature 1.0
give calls whose arguments validate against the tool's schema (jsonschema is the reference). Streamed and whole
responses are the same parse: at temperature 0 they agree, and the streamed argument fragments concatenate to the
whole response's arguments. With "auto" the model's own text is parsed; with "none" it is left alone. Malformed
tools and tool choices are 400s naming the field, and the server keeps serving."""
import json
import subprocess
import sys

import httpx
import jsonschema
import openai
import pytest

from tests.e2e.server import REPO_ROOT, RemoteServer
from tests.e2e.tiny_qwen3 import tiny_qwen3_dir
from tests.openai.tool_parsers.streaming import qwen3_tokenizer

MODEL = "tiny-qwen3"
MAX_N = 50
# Temperature-one samples per forced tool choice: two n=MAX_N requests, enough for "required" to pick every tool.
NUM_FORCED_SAMPLES = 100
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                            "parameters": {
    "type": "object", "additionalProperties": False, "required": ["city"],
    "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"type": "string", "enum": ["c", "f"]},
                   "days": {"type": "integer", "minimum": 1, "maximum": 7}}}}}
BOOK = {"type": "function", "function": {"name": "book_table", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["guests", "vip"],
    "properties": {"guests": {"type": "integer", "minimum": 1, "maximum": 9}, "vip": {"type": "boolean"},
                   "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "maxItems": 2}}}}}
NOW = {"type": "function", "function": {"name": "now", "description": "The time."}}
TOOLS = [WEATHER, BOOK, NOW]
SCHEMAS = {tool["function"]["name"]: tool["function"].get("parameters", {"type": "object"}) for tool in TOOLS}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server():
    remote = RemoteServer(["--model", tiny_qwen3_dir(), "--max-model-len", "1024", "--served-model-name", MODEL,
                           "--tool-call-parser", "hermes", "--enable-auto-tool-choice", "--max-n", str(MAX_N)])
    yield remote
    remote.close()


@pytest.fixture(scope="module")
def client(server):
    return server.client(timeout=300)


def added_token(text: str) -> int:
    return qwen3_tokenizer().convert_tokens_to_ids(text)


def assert_valid_calls(choice, allowed: set[str]) -> list:
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None and choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in allowed
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    return choice.message.tool_calls


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}],
                         ids=["required", "named"])
def test_forced_calls_validate_at_temperature_one(client, tool_choice):
    allowed = {"get_weather"} if isinstance(tool_choice, dict) else set(SCHEMAS)
    names, samples = set(), 0
    for seed in range(NUM_FORCED_SAMPLES // MAX_N):
        response = client.chat.completions.create(
            model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice=tool_choice, parallel_tool_calls=False,
            temperature=1.0, n=MAX_N, seed=seed, max_tokens=64)
        for choice in response.choices:
            calls = assert_valid_calls(choice, allowed)
            assert len(calls) == 1  # parallel_tool_calls=False
            names.add(calls[0].function.name)
            samples += 1
    assert samples == NUM_FORCED_SAMPLES
    assert names == allowed  # "required" really lets the model pick any of the tools


def test_parallel_calls_each_validate(client):
    response = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="required", temperature=1.0, n=16, seed=3,
        max_tokens=400)
    counts = [len(assert_valid_calls(choice, set(SCHEMAS))) for choice in response.choices
              if choice.finish_reason != "length"]
    assert counts and max(counts) > 1
    ids = [call.id for choice in response.choices for call in choice.message.tool_calls]
    assert len(ids) == len(set(ids))


def stream_choice(client, **body) -> dict:
    """A streamed choice put together as a client does: content, per-index calls, and the fragments seen."""
    content, calls, finish_reason = [], {}, None
    for chunk in client.chat.completions.create(stream=True, **body):
        (choice,) = chunk.choices
        delta = choice.delta
        if delta.content:
            content.append(delta.content)
        for item in delta.tool_calls or []:
            if item.index not in calls:  # the first delta of a call opens it: id, type and name
                assert item.id.startswith("call_") and item.type == "function" and item.function.name
                calls[item.index] = {"id": item.id, "name": item.function.name, "fragments": []}
            else:
                assert item.id is None and item.function.name is None
            if item.function.arguments:
                calls[item.index]["fragments"].append(item.function.arguments)
        finish_reason = choice.finish_reason or finish_reason
    assert list(calls) == list(range(len(calls)))
    return {"content": "".join(content) or None, "calls": [calls[index] for index in sorted(calls)],
            "finish_reason": finish_reason}


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "book_table"}},
                                         {"type": "function", "function": {"name": "now"}}],
                         ids=["required", "named", "parameterless"])
def test_streamed_equals_whole_at_temperature_zero(client, tool_choice):
    body = dict(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice=tool_choice, temperature=0.0,
                max_tokens=120)
    (whole,) = client.chat.completions.create(**body).choices
    streamed = stream_choice(client, **body)
    assert streamed["finish_reason"] == whole.finish_reason == "tool_calls"
    assert streamed["content"] == whole.message.content is None
    assert [(call["name"], "".join(call["fragments"])) for call in streamed["calls"]] == \
        [(call.function.name, call.function.arguments) for call in whole.message.tool_calls]
    assert_valid_calls(whole, set(SCHEMAS))
    if isinstance(tool_choice, dict) and tool_choice["function"]["name"] == "now":
        assert [call.function.arguments for call in whole.message.tool_calls] == ["{}"] * len(streamed["calls"])


def forced_text_grammar() -> str:
    """Text, then one hermes call, spelled the way the model would write it (markers as their tokens)."""
    call = json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})
    return (f'start: "Let me check." <[{added_token("<tool_call>")}]> {json.dumps(chr(10) + call + chr(10))} '
            f'<[{added_token("</tool_call>")}]>\n')


def test_auto_parses_the_models_own_calls(client):
    """With "auto" nothing constrains the model; a grammar stands in for a model that calls a tool on its own."""
    body = dict(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="auto", temperature=0.0, max_tokens=60,
                extra_body={"structured_outputs": {"grammar": forced_text_grammar()}})
    (whole,) = client.chat.completions.create(**body).choices
    assert whole.finish_reason == "tool_calls"
    assert whole.message.content == "Let me check."
    assert [(call.function.name, json.loads(call.function.arguments)) for call in whole.message.tool_calls] == \
        [("get_weather", {"city": "Paris"})]
    streamed = stream_choice(client, **body)
    assert streamed["content"] == "Let me check." and streamed["finish_reason"] == "tool_calls"
    assert [json.loads("".join(call["fragments"])) for call in streamed["calls"]] == [{"city": "Paris"}]


def test_none_leaves_the_text_alone(client):
    (choice,) = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="none", temperature=0.0, max_tokens=60,
        extra_body={"structured_outputs": {"grammar": forced_text_grammar()}}).choices
    assert not choice.message.tool_calls and choice.finish_reason == "stop"
    assert choice.message.content.startswith("Let me check.<tool_call>\n{")


def test_history_with_calls_and_results_renders_as_transformers_does(client):
    """The prompt the server built from a conversation with a call and its result has the token count of
    transformers' own rendering of the same conversation (arguments as dicts, as HF templates take them)."""
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    response = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=1,
                                              temperature=0.0)
    hf_messages = [*MESSAGES, {"role": "assistant", "content": "", "tool_calls": [
        {**call, "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    tokenizer = qwen3_tokenizer()
    text = tokenizer.apply_chat_template(hf_messages, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert "<tool_call>" in text and "<tool_response>" in text and '"name": "now"' in text
    assert response.usage.prompt_tokens == len(tokenizer.encode(text, add_special_tokens=False))


BAD_REQUESTS = [
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [NOW, NOW]}, "tools[1].function.name"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "missing"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "f", "arguments": "[1]"}}]}]}, "messages.0.tool_calls[0].function.arguments"),
    ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),
]


@pytest.mark.parametrize("fields, param", BAD_REQUESTS)
def test_bad_tool_requests_are_400s_naming_the_param(server, fields, param):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, **fields}
    response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    (choice,) = server.client().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2).choices
    assert choice.finish_reason == "length"


def test_openai_client_sees_the_400(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=4,
                                       tool_choice={"type": "function", "function": {"name": "missing"}})
    assert raised.value.body["param"] == "tool_choice" and "get_weather" in raised.value.body["message"]


@pytest.mark.parametrize("flags, valid", [(["--tool-call-parser", "bogus"], "hermes, llama3_json"),
                                          (["--reasoning-parser", "bogus"], "openai_gptoss, qwen3"),
                                          (["--enable-auto-tool-choice"], "--tool-call-parser")])
def test_unknown_parser_names_are_refused_at_start(flags, valid):
    process = subprocess.run([sys.executable, "-m", "serval.cli", "serve", "--model", tiny_qwen3_dir(), *flags],
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert process.returncode == 2
    assert valid in process.stdout + process.stderr
