"""Function calls and reasoning in the Responses API, through a real `serval serve --tool-call-parser hermes
--enable-auto-tool-choice --reasoning-parser qwen3` serving a tiny random-weight Qwen3 (Qwen3's real tokenizer and
chat template), called with the official openai client.

tool_choice "required" and a named function run the chat API's grammar, so even random weights give calls whose
arguments validate (jsonschema is the reference); the round trip (call, function_call_output, answer) renders the
conversation as transformers renders it; streamed events are the SDK's typed events in OpenAI's order and rebuild
the whole answer; a think section becomes a `reasoning` item and counts in usage's reasoning_tokens."""
from __future__ import annotations

import json

import jsonschema
import pytest
import transformers
from openai.types.responses import ResponseStreamEvent
from pydantic import TypeAdapter

from tests.e2e.server import RemoteServer
from tests.e2e.test_tools import forced_text_grammar
from tests.e2e.tiny_qwen3 import tiny_qwen3_dir
from tests.openai.tool_parsers.streaming import qwen3_tokenizer

MODEL = "tiny-qwen3"
EVENTS = TypeAdapter(ResponseStreamEvent)
WEATHER_PARAMETERS = {"type": "object", "additionalProperties": False, "required": ["city"],
                      "properties": {"city": {"type": "string", "maxLength": 8},
                                     "unit": {"type": "string", "enum": ["c", "f"]}}}
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
           "parameters": WEATHER_PARAMETERS}
NOW = {"type": "function", "name": "now", "description": "The time."}
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
ANSWER = {"type": "object", "additionalProperties": False, "required": ["verdict"],
          "properties": {"verdict": {"type": "string", "enum": ["yes", "no"]}}}


@pytest.fixture(scope="module")
def server():
    remote = RemoteServer(["--model", tiny_qwen3_dir(), "--max-model-len", "1024", "--served-model-name", MODEL,
                           "--tool-call-parser", "hermes", "--enable-auto-tool-choice", "--reasoning-parser", "qwen3"])
    yield remote
    remote.close()


@pytest.fixture(scope="module")
def client(server):
    return server.client(timeout=300)


def chat_tool(tool: dict) -> dict:
    return {"type": "function", "function": {key: tool[key] for key in ("name", "description", "parameters")
                                             if key in tool}}


def function_calls(response) -> list:
    return [item for item in response.output if item.type == "function_call"]


def test_function_call_round_trip(client):
    """Call (named tool, temperature 1), the tool's output as a function_call_output item, the final answer; the
    second turn's prompt is transformers' rendering of the whole conversation."""
    first = client.responses.create(model=MODEL, input="What is the weather in Paris?", tools=[WEATHER],
                                    tool_choice={"type": "function", "name": "get_weather"},
                                    parallel_tool_calls=False, temperature=1.0, max_output_tokens=64,
                                    extra_body=NO_THINKING)
    assert first.status == "completed"
    (call,) = function_calls(first)
    assert [item.type for item in first.output] == ["function_call"]
    assert call.name == "get_weather" and call.call_id.startswith("call") and call.status == "completed"
    arguments = json.loads(call.arguments)
    jsonschema.validate(arguments, WEATHER_PARAMETERS)
    second = client.responses.create(model=MODEL, previous_response_id=first.id, tools=[WEATHER], tool_choice="none",
                                     input=[{"type": "function_call_output", "call_id": call.call_id,
                                             "output": "22 C, sunny"}],
                                     temperature=0.0, max_output_tokens=8, extra_body=NO_THINKING)
    assert not function_calls(second) and [item.type for item in second.output] == ["message"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_qwen3_dir())
    messages = [{"role": "user", "content": "What is the weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": call.call_id, "type": "function",
                     "function": {"name": "get_weather", "arguments": arguments}}]},
                {"role": "tool", "tool_call_id": call.call_id, "name": "get_weather", "content": "22 C, sunny"}]
    text = tokenizer.apply_chat_template(messages, tools=[chat_tool(WEATHER)], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=False)
    assert second.usage.input_tokens == len(tokenizer.encode(text, add_special_tokens=False))
    # The same round trip without the store: the first answer's items sent back as input.
    manual = client.responses.create(
        model=MODEL, store=False, tools=[WEATHER], tool_choice="none", temperature=0.0, max_output_tokens=8,
        extra_body=NO_THINKING,
        input=[{"role": "user", "content": "What is the weather in Paris?"},
               *[item.model_dump(exclude_none=True) for item in first.output],
               {"type": "function_call_output", "call_id": call.call_id, "output": "22 C, sunny"}])
    assert manual.usage.input_tokens == second.usage.input_tokens and manual.output_text == second.output_text


def test_required_calls_validate_at_temperature_one(client):
    for seed in range(4):
        response = client.responses.create(model=MODEL, input="Weather, or the time?", tools=[WEATHER, NOW],
                                           tool_choice="required", temperature=1.0, max_output_tokens=96,
                                           extra_body={**NO_THINKING, "seed": seed})
        calls = function_calls(response)
        assert calls and [item.type for item in response.output] == ["function_call"] * len(calls)
        for call in calls:
            schema = WEATHER_PARAMETERS if call.name == "get_weather" else {"type": "object", "maxProperties": 0}
            if response.status == "completed" or call is not calls[-1]:
                jsonschema.validate(json.loads(call.arguments), schema)


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "name": "now"}], ids=["required", "named"])
def test_streamed_events_are_typed_ordered_and_equal_the_whole_answer(client, tool_choice):
    body = dict(model=MODEL, input="What is the weather in Paris?", tools=[WEATHER, NOW], tool_choice=tool_choice,
                parallel_tool_calls=False, temperature=0.0, max_output_tokens=64, extra_body=NO_THINKING)
    whole = client.responses.create(**body)
    events = [EVENTS.validate_python(event.to_dict()) for event in client.responses.create(stream=True, **body)]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    kinds = [event.type for event in events]
    deltas = kinds.count("response.function_call_arguments.delta")
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     *["response.function_call_arguments.delta"] * deltas, "response.function_call_arguments.done",
                     "response.output_item.done", "response.completed"]
    fragments = "".join(event.delta for event in events if event.type == "response.function_call_arguments.delta")
    (done,) = [event for event in events if event.type == "response.function_call_arguments.done"]
    final = events[-1].response
    (streamed_call,), (whole_call,) = function_calls(final), function_calls(whole)
    assert fragments == done.arguments == streamed_call.arguments == whole_call.arguments
    assert streamed_call.name == whole_call.name and events[2].item.name == whole_call.name
    assert done.item_id == streamed_call.id == events[2].item.id
    if isinstance(tool_choice, dict):
        assert whole_call.arguments == "{}"


def test_auto_parses_the_models_own_call_next_to_its_text(client):
    """With "auto" nothing constrains the model; a grammar stands in for a model that calls a tool on its own."""
    body = dict(model=MODEL, input="What is the weather in Paris?", tools=[WEATHER], tool_choice="auto",
                temperature=0.0, max_output_tokens=60,
                extra_body={**NO_THINKING, "structured_outputs": {"grammar": forced_text_grammar()}})
    whole = client.responses.create(**body)
    assert [item.type for item in whole.output] == ["message", "function_call"]
    assert whole.output_text == "Let me check."
    assert json.loads(function_calls(whole)[0].arguments) == {"city": "Paris"}
    events = [EVENTS.validate_python(event.to_dict()) for event in client.responses.create(stream=True, **body)]
    final = events[-1].response
    assert [item.type for item in final.output] == ["message", "function_call"]
    assert final.output_text == "Let me check." and function_calls(final)[0].arguments == \
        function_calls(whole)[0].arguments
    none = client.responses.create(**{**body, "tool_choice": "none"})
    assert [item.type for item in none.output] == ["message"] and none.output_text.startswith("Let me check.<tool")


def test_reasoning_is_an_item_and_counted_and_json_follows_it(client):
    """Thinking on, text.format json_schema: free thought, `</think>`, then the schema (the chat API's grammar)."""
    end_of_thought = str(qwen3_tokenizer().convert_tokens_to_ids("</think>"))
    body = dict(model=MODEL, input="Is it going to rain? Think first.", temperature=1.0,
                max_output_tokens=120, text={"format": {"type": "json_schema", "name": "answer", "schema": ANSWER}},
                extra_body={"seed": 3, "logit_bias": {end_of_thought: 10.0}})
    whole = client.responses.create(**body)
    assert whole.status == "completed"
    kinds = [item.type for item in whole.output]
    assert kinds in (["reasoning", "message"], ["message"])
    jsonschema.validate(json.loads(whole.output_text), ANSWER)
    reasoning = whole.output[0].content[0].text if kinds[0] == "reasoning" else ""
    assert "</think>" not in reasoning and '"verdict"' not in reasoning
    tokenizer = qwen3_tokenizer()
    assert whole.usage.output_tokens_details.reasoning_tokens == \
        len(tokenizer.encode(reasoning, add_special_tokens=False))
    events = [EVENTS.validate_python(event.to_dict()) for event in client.responses.create(stream=True, **body)]
    final = events[-1].response
    assert final.output_text == whole.output_text
    streamed = "".join(event.delta for event in events if event.type == "response.reasoning_text.delta")
    assert streamed == reasoning
    if reasoning:
        done = [event.type for event in events if event.type.startswith("response.reasoning_text")][-1]
        assert done == "response.reasoning_text.done"


@pytest.mark.parametrize("fields, param", [
    ({"tools": [WEATHER, WEATHER]}, "tools[1].name"),
    ({"tools": [{**WEATHER, "name": "bad name"}]}, "tools[0].name"),
    ({"tools": [{**WEATHER, "parameters": {"type": "array"}}]}, "tools[0].parameters"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": []}}, "tool_choice"),
], ids=["duplicate", "bad-name", "array-schema", "unknown-named", "required-without-tools", "allowed-tools"])
def test_bad_tools_are_400s_naming_the_field(server, client, fields, param):
    import httpx

    answer = httpx.post(server.url + "/v1/responses", json={"model": MODEL, "input": "hi", **fields}, timeout=60)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param, answer.json()
    assert client.responses.create(model=MODEL, input="alive?", max_output_tokens=2).status == "incomplete"
